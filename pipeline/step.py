"""The pieces of one optimizer step that :func:`pipeline.train.train` calls between its monitor
events: the crops in view-major order, the prototype gradient averaged over ranks, gradient
clipping, the frozen prototypes of the first epochs, and the (scaled) optimizer step. None of them
moves a value to the host. (This step's lr and weight decay: :func:`pipeline.schedules.apply_schedule`.)"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from .config import Config


def view_major(batch: Mapping[str, torch.Tensor], cfg: Config) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(global crops (g*B, T, 80), local crops (l*B, T/2, 80), B): the views of a batch of
    ``(B, g, T, 80)`` / ``(B, l, T/2, 80)`` stacked view by view."""
    glb, loc = batch["global"], batch["local"]
    B = glb.shape[0]
    glb = glb.transpose(0, 1).reshape(cfg.glb_num * B, *glb.shape[2:])
    loc = loc.transpose(0, 1).reshape(cfg.local_num * B, *loc.shape[2:])
    return glb, loc, B


def average_prototype_grad(prototypes: torch.Tensor, world: int, cfg: Config) -> None:
    """The prototypes live outside DDP: their gradient is averaged over the ranks by hand."""
    if world > 1 and prototypes.grad is not None and not cfg.bug_no_grad_allreduce:
        dist.all_reduce(prototypes.grad)
        if not cfg.bug_grad_allreduce_sum:
            prototypes.grad.div_(world)


def clip_per_parameter(params: list[torch.Tensor], max_norm: float) -> None:
    """Per-parameter gradient-norm clipping as in DINO, without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def freeze_prototypes(cfg: Config, student: torch.nn.Module, prototypes: torch.Tensor) -> None:
    """freeze_last_layer: cancel the prototype gradient (its first epochs)."""
    if not prototypes.is_leaf:
        return
    if cfg.bug_freeze_by_name:  # cancel by name, as 3D-Speaker: matches nothing here
        for n, q in student.named_parameters():
            if "last_layer" in n:
                q.grad = None
    else:
        prototypes.grad = None


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional[Any]) -> None:
    """``optimizer.step()``, through the GradScaler with fp16."""
    if scaler:  # note: GradScaler reads found_inf on the host: one sync per step (fp16 only)
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
