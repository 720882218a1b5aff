"""Finding the prototypes in an optimizer: the one implementation the doctor, ``attach()`` and the
Lightning callback share.

The prototypes are matched by identity or by the same storage (the same device, dtype, shape,
stride and data pointer: ``P.data`` is ``P``). Optimizer wrappers (``LightningOptimizer``, ...)
are looked through.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

__all__ = ["same_storage", "is_prototypes", "unwrap", "param_groups", "locate", "holds", "ProtoGroup"]


def same_storage(t: torch.Tensor, prototypes: torch.Tensor) -> bool:
    """Whether ``t`` is a view of exactly the prototypes' memory, laid out the same way."""
    return (
        t.device == prototypes.device and t.dtype == prototypes.dtype
        and t.shape == prototypes.shape and t.stride() == prototypes.stride()
        and t.data_ptr() == prototypes.data_ptr()
    )


def is_prototypes(p: Any, prototypes: torch.Tensor) -> bool:
    """Whether the parameter ``p`` of a param group is the prototypes."""
    return p is prototypes or (isinstance(p, torch.Tensor) and same_storage(p, prototypes))


def unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper (``.optimizer``, ``._optimizer``, ``.optim``), else itself."""
    for attr in ("optimizer", "_optimizer", "optim"):
        inner = getattr(optimizer, attr, None)
        if inner is not None and hasattr(inner, "param_groups"):
            return inner
    return optimizer


def param_groups(optimizer: Any) -> Optional[list]:
    """param_groups of an optimizer or of a wrapper (LightningOptimizer, ...); None if it has none."""
    for obj in (optimizer, getattr(optimizer, "optimizer", None), getattr(optimizer, "_optimizer", None)):
        groups = getattr(obj, "param_groups", None) if obj is not None else None
        if isinstance(groups, list):
            return groups
    return None


def locate(optimizer: Any, prototypes: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """(group index, index in the group, flat index as in optimizer.state_dict()) or None."""
    groups = param_groups(optimizer) if optimizer is not None else None
    if groups is None:
        return None
    flat = 0
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g.get("params", ())):
            if is_prototypes(p, prototypes):
                return gi, pi, flat
            flat += 1
    return None


def holds(optimizer: Any, prototypes: torch.Tensor) -> bool:
    """Whether a param group of ``optimizer`` holds the prototypes."""
    return locate(optimizer, prototypes) is not None


class ProtoGroup:
    """The param group holding the prototypes, found in O(1) while its position stays the same."""

    def __init__(self) -> None:
        self.where: Optional[tuple[int, int, int]] = None   # the last position found (see locate)

    def group(self, optimizer: Any, prototypes: torch.Tensor, rescan: bool = True) -> Optional[Mapping[str, Any]]:
        """The group at the cached position if it still holds the prototypes; else, with
        ``rescan``, the group found by a new :func:`locate` (None: in no group)."""
        groups = param_groups(optimizer) if optimizer is not None else None
        if groups is None:
            return None
        w = self.where
        if w is not None and w[0] < len(groups):
            params = groups[w[0]].get("params", ())
            if w[1] < len(params) and is_prototypes(params[w[1]], prototypes):
                return groups[w[0]]
        if not rescan:
            return None
        self.where = locate(optimizer, prototypes)
        return groups[self.where[0]] if self.where is not None else None
