"""Devices per trial on one machine: ``--gpus`` cut into ``CUDA_VISIBLE_DEVICES`` slices of
``--gpus-per-trial`` GPUs, handed to trials as they start and returned when they end, and the
``torchrun`` command line of a trial that runs as several processes (``--gpus-per-trial`` > 1 on
GPUs, ``--nproc-per-trial`` with gloo on CPU).

Everything is checked before the first trial starts; misuse is a one-line :class:`SweepError`.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from .spec import SweepError

#: how many GPUs this machine has, for a controller that cannot see them (a login node) and for
#: tests on CPU; unset: ``torch.cuda.device_count()``
GPU_COUNT_ENV = "PROTOWATCH_GPU_COUNT"


def gpu_count() -> int:
    """The GPUs the trials may use: ``$PROTOWATCH_GPU_COUNT`` if set, else what torch sees."""
    raw = os.environ.get(GPU_COUNT_ENV)
    if raw is not None:
        try:
            return max(0, int(raw))
        except ValueError:
            raise SweepError(f"{GPU_COUNT_ENV}={raw!r} is not a number of GPUs: set it to e.g. 4, or unset it") from None
    import torch

    return torch.cuda.device_count()


def parse_gpus(text: str, count: Optional[int] = None) -> list[int]:
    """``--gpus 0,1,2,3`` or ``all`` -> the GPU indices, each checked against the machine."""
    count = gpu_count() if count is None else count
    if text.strip() == "all":
        if count == 0:
            raise SweepError("--gpus all: this machine has no CUDA GPU (torch.cuda.device_count() is 0); "
                             f"drop --gpus to run on CPU, or set {GPU_COUNT_ENV}")
        return list(range(count))
    try:
        gpus = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise SweepError(f"--gpus {text!r}: expected GPU indices such as 0,1,2,3 or `all`") from None
    if not gpus:
        raise SweepError(f"--gpus {text!r}: expected GPU indices such as 0,1,2,3 or `all`")
    if len(set(gpus)) != len(gpus):
        raise SweepError(f"--gpus {text!r}: a GPU is listed twice; list each once")
    bad = [g for g in gpus if g < 0 or g >= count]
    if bad:
        have = f"0-{count - 1}" if count else "none"
        raise SweepError(f"--gpus {text!r}: GPU {bad[0]} does not exist (this machine has {count}: {have}); "
                         "see nvidia-smi")
    return gpus


def gpu_slices(gpus: Sequence[int], per_trial: int) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each slot: consecutive groups of ``per_trial``
    GPUs (the remainder, if any, stays idle). Indices are the machine's; when this process
    itself runs under a ``CUDA_VISIBLE_DEVICES`` mask they index into it."""
    if per_trial < 1:
        raise SweepError(f"--gpus-per-trial must be >= 1, got {per_trial}")
    if per_trial > len(gpus):
        raise SweepError(f"--gpus-per-trial {per_trial} is larger than the {len(gpus)} GPU(s) of --gpus "
                         f"{','.join(map(str, gpus))}: list more GPUs or ask for fewer per trial")
    outer = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    names = [outer[g] if g < len(outer) else str(g) for g in gpus]
    return [",".join(names[i:i + per_trial]) for i in range(0, len(names) - per_trial + 1, per_trial)]


class SlicePool:
    """The free slices; the sweep's main thread takes one when a trial starts and gives it back
    when the trial ends, whatever its outcome."""

    def __init__(self, slices: Sequence[str]) -> None:
        self.free = list(slices)

    def take(self) -> str:
        if not self.free:
            raise RuntimeError("no free GPU slice: more trials running than slices")
        return self.free.pop(0)

    def give_back(self, s: Optional[str]) -> None:
        if s is not None and s not in self.free:
            self.free.append(s)


def torchrun_command(command: Sequence[str], nproc: int, rendezvous: Optional[Sequence[str]] = None) -> list[str]:
    """The trial's command run by ``torchrun`` as ``nproc`` processes per node: this Python's
    ``${interpreter}`` in it becomes ``python -m torch.distributed.run [rendezvous] --nproc_per_node N``.
    ``rendezvous``: torchrun's arguments for several nodes; default ``--standalone`` (one node, a
    free port, so trials side by side do not collide)."""
    cmd = [str(c) for c in command]
    if sys.executable not in cmd:
        raise SweepError("a trial of several processes (--gpus-per-trial > 1, --nproc-per-trial, --nodes-per-trial) "
                         "runs under torchrun, which needs ${interpreter} in the sweep's command")
    i = cmd.index(sys.executable)
    rdzv = list(rendezvous) if rendezvous is not None else ["--standalone"]
    return cmd[:i] + [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={nproc}"] + cmd[i + 1:]
