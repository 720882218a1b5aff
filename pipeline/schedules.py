"""Every per-step schedule of a training run, in one place: precomputed and indexed by the global
step (as in DINO). The learning rate (scaled by the total batch / 256, linear warm-up, then
cosine), the weight decay and the teacher's EMA momentum (cosine), the steps of the first
``freeze_last_layer`` epochs during which the prototypes are frozen, and how one step's values
are written into the optimizer's param groups."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import Config


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine to ``final``."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    rest = total_steps - warmup_steps
    t = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(rest, 1)))
    out = np.concatenate([warm, cos])
    assert len(out) == total_steps
    return out


@dataclass
class Schedules:
    """Per-step values, precomputed: learning rate, weight decay, teacher momentum; and
    ``freeze_steps``, the number of first steps whose prototype gradient is cancelled."""
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    freeze_steps: int = 0

    def at(self, step: int) -> tuple[float, float, float]:
        """(lr, wd, momentum) of ``step``, as Python floats."""
        return float(self.lr[step]), float(self.wd[step]), float(self.momentum[step])

    def frozen(self, step: int) -> bool:
        """Whether the prototypes are frozen at ``step`` (the first ``freeze_last_layer`` epochs)."""
        return step < self.freeze_steps


def make_schedules(cfg: Config, total_steps: int, per_epoch: int, world: int) -> Schedules:
    """Cosine schedules; the lr is scaled by the total batch / 256 and warms up first."""
    batch_total = cfg.batch_size * world
    return Schedules(
        lr=cosine_schedule(cfg.lr * batch_total / 256.0, cfg.min_lr, total_steps, cfg.warmup_epochs * per_epoch),
        wd=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total_steps),
        momentum=cosine_schedule(cfg.momentum_teacher, 1.0, total_steps),
        freeze_steps=cfg.freeze_last_layer * per_epoch,
    )


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """This step's lr (times each group's ``lr_scale``) and the weight decay of the regularized group."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if g.get("name") == "regularized":
            g["weight_decay"] = wd
