"""The health doctor's static and per-step checks: leaf, gradient, optimizer membership, lr,
and the replica fingerprint.

:class:`StaticChecks` is one group of the doctor's checks (see :mod:`monitors.health.settings`):
built with the settings and the doctor's report function, it owns its counters and reads Python
attributes (``is_leaf``, ``.grad is None``, the param groups, a CPU lr) as they happen, never a
device value; the doctor's hooks call its methods.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from ..core.cadence import on_multiple
from ..core.codes import PROTO_LR_ZERO, PROTO_NO_GRAD, PROTO_NOT_IN_OPTIMIZER, PROTO_NOT_LEAF, fix_of
from ..core.events import RunContext
from .optimizer_lookup import ProtoGroup, param_groups
from .settings import DoctorSettings, Report


def _lr(group: Mapping[str, Any]) -> Optional[float]:
    """A group's lr as a Python float, or None when reading it would sync (lr on the GPU)."""
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor):
        return float(lr) if lr.device.type == "cpu" and lr.numel() == 1 else None
    return float(lr) if isinstance(lr, (int, float)) else None


class StaticChecks:
    """The checks of the doctor that read attributes, not values (see the module docstring)."""

    def __init__(self, settings: DoctorSettings, report: Report) -> None:
        self.settings, self.report = settings, report
        self.nograd_steps = 0        # consecutive checked steps without a prototype gradient
        self.lr_zero_steps = 0       # consecutive steps with lr 0 in the prototypes' group only
        self.grad_checked_step = -1  # the last step PROTO_NO_GRAD counted
        self._group = ProtoGroup()   # the prototypes' param group, cached position
        self._last_static = -1
        self._proj: Optional[torch.Tensor] = None

    def static_due(self, step: int) -> bool:
        """Whether the optimizer membership is re-checked at ``step`` (every ``static_every``)."""
        every = self.settings.static_every
        return step - self._last_static >= every or on_multiple(step, every)

    def _groups(self, ctx: RunContext) -> Optional[list]:
        """The optimizer's param groups (None without an optimizer)."""
        return param_groups(ctx.optimizer) if ctx.optimizer is not None else None

    def proto_group(self, ctx: RunContext, rescan: bool) -> Optional[Mapping[str, Any]]:
        """The param group holding the prototypes (O(1) with the cached position)."""
        return self._group.group(ctx.optimizer, ctx.prototypes, rescan=rescan)

    def check_optimizer(self, ctx: RunContext) -> Optional[Mapping[str, Any]]:
        """PROTO_NOT_IN_OPTIMIZER; returns the prototypes' group."""
        self._last_static = ctx.step
        if ctx.optimizer is None:
            return None
        group = self.proto_group(ctx, rescan=True)
        if group is None:
            P = ctx.prototypes
            self.report(ctx, PROTO_NOT_IN_OPTIMIZER, "error", (
                f"the prototypes {tuple(P.shape)} are in no param group of the optimizer "
                f"({type(ctx.optimizer).__name__}), so optimizer.step() never changes them. "
                f"Fix: {fix_of(PROTO_NOT_IN_OPTIMIZER)}."
                + (" (They are also not a leaf tensor: see PROTO_NOT_LEAF.)" if not P.is_leaf else "")
            ))
        return group

    def _others_have_grad(self, ctx: RunContext) -> bool:
        P = ctx.prototypes
        groups = self._groups(ctx)
        params: list = []
        if groups is not None:
            params = [p for g in groups for p in g.get("params", ())]
        if not params and ctx.model is not None:
            params = list(ctx.model.parameters())
        if not params:
            return True  # cannot tell: assume the rest of the model trains
        return any(p is not P and isinstance(p, torch.Tensor) and p.grad is not None for p in params)

    def check_not_leaf(self, ctx: RunContext) -> bool:
        P = ctx.prototypes
        if P.is_leaf:
            return False
        self.report(ctx, PROTO_NOT_LEAF, "error", (
            f"the prototypes are not a leaf tensor (grad_fn={type(P.grad_fn).__name__}): they are "
            "a copy of the parameter, so they never get a .grad and no optimizer can step them. "
            "This is the nn.Parameter(x).cuda() / .to(copy=True) trap. Fix: "
            f"{fix_of(PROTO_NOT_LEAF)}."
        ))
        return True

    def grad_step_check(self, ctx: RunContext, grad_missing: bool) -> None:
        """PROTO_NO_GRAD: count consecutive steps without a gradient (once per step)."""
        self.grad_checked_step = ctx.step
        if not grad_missing:
            self.nograd_steps = 0
            return
        if not self._others_have_grad(ctx):
            return  # nothing has gradients (accumulation step, eval): not our business
        P = ctx.prototypes
        if ctx.step < ctx.freeze_steps:
            self.report(ctx, PROTO_NO_GRAD, "info", (
                f"the prototypes get no gradient at step {ctx.step}: expected during the freeze "
                f"(freeze_steps={ctx.freeze_steps}, e.g. freeze_last_layer cancels it)."
            ))
            return
        self.nograd_steps += 1
        why = "requires_grad is False" if not P.requires_grad else "they are not used in the loss or the gradient is cancelled"
        if self.nograd_steps > self.settings.patience:
            self.report(ctx, PROTO_NO_GRAD, "error", (
                f"the prototypes got no gradient for {self.nograd_steps} consecutive steps while the "
                f"rest of the model did ({why}). Fix: {fix_of(PROTO_NO_GRAD)}."
            ))
        else:
            self.report(ctx, PROTO_NO_GRAD, "info", (
                f"the prototypes got no gradient at step {ctx.step} while the rest of the model did "
                f"({why}); an error follows after {self.settings.patience} such steps in a row."
            ))

    def check_lr(self, ctx: RunContext, group: Optional[Mapping[str, Any]]) -> Optional[float]:
        """PROTO_LR_ZERO from Python floats; returns the prototypes' lr (None if unknown)."""
        if group is None:
            return None
        lr = _lr(group)
        if lr is None or lr != 0.0:
            self.lr_zero_steps = 0
            return lr
        groups = self._groups(ctx) or [group]
        others = [_lr(g) for g in groups if g is not group]
        all_zero = all(x == 0.0 for x in others if x is not None)
        if all_zero or ctx.step < ctx.freeze_steps:
            self.lr_zero_steps = 0
            why = "every param group has lr 0 (a warm-up starting at 0)" if all_zero else \
                f"an intended freeze (freeze_steps={ctx.freeze_steps})"
            self.report(ctx, PROTO_LR_ZERO, "info", (
                f"the prototypes' lr is 0 at step {ctx.step}: {why}; they do not move this step."
            ))
            return lr
        self.lr_zero_steps += 1
        if self.lr_zero_steps > self.settings.patience:
            self.report(ctx, PROTO_LR_ZERO, "warning", (
                f"the prototypes' param group has had lr 0 for {self.lr_zero_steps} steps while other "
                f"groups train (lr up to {max(x for x in others if x is not None):g}): the prototypes "
                f"are frozen. Likely cause: {fix_of(PROTO_LR_ZERO)}."
            ))
        else:
            self.report(ctx, PROTO_LR_ZERO, "info", (
                f"the prototypes' param group has lr 0 at step {ctx.step} while other groups train; "
                f"a warning follows after {self.settings.patience} such steps in a row."
            ))
        return lr

    def _fingerprint(self, P: torch.Tensor) -> torch.Tensor:
        """(3,) float64: sum, sum of squares, projection on a fixed random vector (same seed
        on every rank)."""
        x = P.detach().reshape(-1).to(torch.float64)
        if self._proj is None or self._proj.numel() != x.numel() or self._proj.device != x.device:
            g = torch.Generator().manual_seed(20250101)
            self._proj = (torch.rand(x.numel(), generator=g, dtype=torch.float64) - 0.5).to(x.device)
        return torch.stack([x.sum(), (x * x).sum(), (x * self._proj).sum()])

    def replica_gap(self, P: torch.Tensor) -> torch.Tensor:
        """Largest relative disagreement of the fingerprint across ranks (a collective)."""
        f = self._fingerprint(P)
        both = torch.cat([f, -f])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        mx, mn = both[:3], -both[3:]
        return ((mx - mn) / (1.0 + mx.abs())).amax()

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"nograd_steps": self.nograd_steps, "lr_zero_steps": self.lr_zero_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.nograd_steps = int(state.get("nograd_steps", 0))
        self.lr_zero_steps = int(state.get("lr_zero_steps", 0))
