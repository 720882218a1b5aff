"""The one place the monitors ask ``torch.distributed`` for the rank and the world size."""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["rank_and_world", "world_size"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    """The world size of the initialised process group; 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
