"""What the optimizer step actually did to the prototypes, and how far they drifted from init.

This is the monitor that would have caught the original SDPN bug: gradients arrive, the loss
goes down, and ``proto/delta/norm`` stays exactly 0.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..core.base import Metrics, Monitor
from ..core.events import RunContext
from ..core.media import VectorStat
from ..core.cadence import on_multiple
from ..core.options import positive_int
from ..core.proto_stats import block_rows, work_dtype

_TINY = 1e-12


class DeltaMonitor(Monitor):
    """Compares the prototypes right before and right after ``optimizer.step()``.

    Metrics (``on_after_optimizer_step``), with ``U = P_new - P_old``:
    ``proto/delta/norm`` (``||U||``), ``proto/delta/relative`` (``||U|| / ||P_old||``),
    ``proto/delta/per_proto_mean`` and ``/per_proto_max`` (row norms of U),
    ``proto/delta/moved`` (rows of P with a nonzero update, float) and
    ``proto/delta/drift`` (``||P - P_init|| / ||P_init||``, a slow curve, so only every
    ``drift_every`` steps and at the end of training: a pass over P and P_init).
    Above ``ctx.proto_stats.full_above`` prototypes (16,384) the update statistics are those of every
    ``full_every``-th step (10; exact on those steps, :mod:`monitors.core.proto_stats`).

    For inspection: :attr:`last_update_norms` (K,) and :attr:`last_delta_norm` (0-dim) from the last
    step measured, and :attr:`last_proto_norms` (K,), all on the device.

    State: ``P_init`` (on CPU) so that a resumed run continues its drift curve.
    """

    name = "deltas"
    metrics = ("proto/delta/norm", "proto/delta/relative", "proto/delta/per_proto_mean", "proto/delta/per_proto_max",
               "proto/delta/moved", "proto/delta/drift")

    def __init__(self, every_n_steps: Optional[int] = None, drift_every: int = 10) -> None:
        super().__init__(every_n_steps)
        self.drift_every = positive_int(type(self).__name__, "drift_every", drift_every)
        self._init: Optional[torch.Tensor] = None       # (K, D) prototypes at train start
        self._init_norm: Optional[torch.Tensor] = None  # 0-dim, ||P_init||
        self._old_norm: Optional[torch.Tensor] = None   # 0-dim ||P|| before step()
        self._snapshot_step: Optional[int] = None
        self.last_update_norms: Optional[torch.Tensor] = None
        self.last_delta_norm: Optional[torch.Tensor] = None
        self._last_P: Optional[torch.Tensor] = None

    @property
    def last_proto_norms(self) -> Optional[torch.Tensor]:
        """(K,) row norms of the prototypes as they are now (computed on demand, on the device)."""
        if self._last_P is None:
            return None
        return torch.linalg.vector_norm(self._last_P, dim=1, dtype=work_dtype(self._last_P.dtype))

    # -- snapshots --------------------------------------------------------------------------
    def _ensure_init(self, P: torch.Tensor) -> torch.Tensor:
        if self._init is None or self._init.shape != P.shape:
            self._init = P.clone(memory_format=torch.contiguous_format)
            self._init_norm = None
        elif self._init.device != P.device or self._init.dtype != P.dtype:
            self._init = self._init.to(device=P.device, dtype=P.dtype)
            self._init_norm = None
        if self._init_norm is None:  # clamped: an all-zero init gives a finite drift
            self._init_norm = torch.linalg.vector_norm(self._init, dtype=work_dtype(self._init.dtype)).clamp_min(_TINY)
        return self._init

    def on_train_start(self, ctx: RunContext) -> Metrics:
        self._ensure_init(ctx.prototypes.detach())
        return None

    def on_before_optimizer_step(self, ctx: RunContext) -> Metrics:
        self._ensure_init(ctx.prototypes.detach())
        if not ctx.proto_stats.full_step(ctx):  # above full_above: the update every full_every steps
            return None
        ctx.proto_stats.snapshot(ctx)                       # shared with the health doctor
        self._old_norm = ctx.proto_stats.norm(ctx)          # ||P_old||, shared with the gradient monitor
        self._snapshot_step = ctx.step
        return None

    # -- the update -------------------------------------------------------------------------
    def on_after_optimizer_step(self, ctx: RunContext) -> Metrics:
        drift_due = on_multiple(ctx.step, self.drift_every)
        if self._snapshot_step != ctx.step:
            return {"proto/delta/drift": self._drift(ctx, ctx.prototypes.detach())} if drift_due else None
        self._snapshot_step = None
        per = ctx.proto_stats.update_row_norms(ctx)        # (K,) ||U_k||
        if per is None:
            return None
        P = ctx.prototypes.detach()
        total = ctx.proto_stats.update_norm(ctx)
        self.last_update_norms = per
        self.last_delta_norm = total
        self._last_P = P
        # per-row statistics are reduced by the hub at the log interval (VectorStat)
        out = {
            "proto/delta/norm": total,
            "proto/delta/relative": total / self._old_norm.clamp_min(_TINY),
            "proto/delta/per_proto_mean": VectorStat(per, "mean"),
            "proto/delta/per_proto_max": VectorStat(per, "max"),
            "proto/delta/moved": VectorStat(per, "nonzero"),  # rows with a non-zero update
        }
        if drift_due:
            out["proto/delta/drift"] = self._drift(ctx, P)
        return out

    def _drift(self, ctx: RunContext, P: torch.Tensor) -> torch.Tensor:
        init = self._ensure_init(P)
        if P.numel() <= block_rows(P.shape, P.device) * P[0].numel() and P.dtype in (torch.float32, torch.float64):
            dist = torch.dist(P, init)  # small: one kernel, its temporary fits the cache
        else:
            # ||P - P_init|| in row blocks through the shared small scratch: no (K, D) temporary
            dist = torch.linalg.vector_norm(ctx.proto_stats.distances(P, init))
        return dist / self._init_norm

    def on_train_end(self, ctx: RunContext) -> Metrics:
        if self._init is None or self._init.shape != ctx.prototypes.shape:
            return None
        return {"proto/delta/drift": self._drift(ctx, ctx.prototypes.detach())}  # the final value

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"init": None if self._init is None else self._init.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        init = state.get("init")
        self._init = None if init is None else torch.as_tensor(init).detach().clone()
        self._init_norm = None  # recomputed on the device at first use
