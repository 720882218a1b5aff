"""What the optimizer step actually did to the prototypes, and how far they drifted from init.

This is the monitor that would have caught the original SDPN bug: gradients arrive, the loss
goes down, and ``proto/delta/norm`` stays exactly 0.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .base import Metrics, Monitor
from .events import RunContext

_TINY = 1e-12


class DeltaMonitor(Monitor):
    """Compares the prototypes right before and right after ``optimizer.step()``.

    Metrics (``on_after_optimizer_step``), with ``U = P_new - P_old``:
    ``proto/delta/norm`` (``||U||``), ``proto/delta/relative`` (``||U|| / ||P_old||``),
    ``proto/delta/per_proto_mean`` and ``/per_proto_max`` (row norms of U),
    ``proto/delta/moved`` (rows of P with a nonzero update, float) and
    ``proto/delta/drift`` (``||P - P_init|| / ||P_init||``).

    For other monitors: :attr:`last_update_norms` (K,) and :attr:`last_delta_norm` (0-dim) from the last step
    measured, and :attr:`last_proto_norms` (K,), all on the device.

    State: ``P_init`` (on CPU) so that a resumed run continues its drift curve.
    """

    name = "deltas"

    def __init__(self, every_n_steps: Optional[int] = None) -> None:
        super().__init__(every_n_steps)
        self._init: Optional[torch.Tensor] = None       # (K, D) prototypes at train start
        self._init_norm: Optional[torch.Tensor] = None  # 0-dim, ||P_init||
        self._prev: Optional[torch.Tensor] = None       # (K, D) snapshot before step()
        self._scratch: Optional[torch.Tensor] = None    # (K, D) float32 work buffer
        self._snapshot_step: Optional[int] = None
        self.last_update_norms: Optional[torch.Tensor] = None
        self.last_delta_norm: Optional[torch.Tensor] = None
        self._last_P: Optional[torch.Tensor] = None

    @property
    def last_proto_norms(self) -> Optional[torch.Tensor]:
        """(K,) row norms of the prototypes as they are now (computed on demand, on the device)."""
        if self._last_P is None:
            return None
        return torch.linalg.vector_norm(self._last_P, dim=1, dtype=torch.float32)

    # -- snapshots --------------------------------------------------------------------------
    def _ensure_init(self, P: torch.Tensor) -> torch.Tensor:
        if self._init is None or self._init.shape != P.shape:
            self._init = P.clone(memory_format=torch.contiguous_format)
            self._init_norm = None
        elif self._init.device != P.device or self._init.dtype != P.dtype:
            self._init = self._init.to(device=P.device, dtype=P.dtype)
            self._init_norm = None
        if self._init_norm is None:
            self._init_norm = torch.linalg.vector_norm(self._init, dtype=torch.float32)
        return self._init

    def on_train_start(self, ctx: RunContext) -> Metrics:
        self._ensure_init(ctx.prototypes.detach())
        return None

    def on_before_optimizer_step(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes.detach()
        self._ensure_init(P)
        prev = self._prev
        if prev is None or prev.shape != P.shape or prev.device != P.device or prev.dtype != P.dtype:
            self._prev = prev = torch.empty_like(P, memory_format=torch.contiguous_format)
            self._scratch = torch.empty(P.shape, device=P.device, dtype=torch.float32)
        prev.copy_(P)
        self._snapshot_step = ctx.step
        return None

    # -- the update -------------------------------------------------------------------------
    def on_after_optimizer_step(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes.detach()
        prev, scratch = self._prev, self._scratch
        if self._snapshot_step != ctx.step or prev is None or prev.shape != P.shape:
            return None
        self._snapshot_step = None
        init = self._ensure_init(P)

        torch.sub(P, prev, out=scratch)                                     # U, (K, D) float32
        per = torch.linalg.vector_norm(scratch, dim=1)                      # (K,)
        total = torch.linalg.vector_norm(per)
        old_norm = torch.linalg.vector_norm(prev, dtype=torch.float32)
        # a row moved iff its update norm is > 0 (exact: an element change small enough for
        # its square to underflow would need |P_kd| < ~1e-19); ~20x cheaper on CPU than ne().any()
        moved = (per > 0).sum().to(torch.float32)
        torch.sub(P, init, out=scratch)                                     # P - P_init
        drift = torch.linalg.vector_norm(scratch) / self._init_norm.clamp_min(_TINY)

        self.last_update_norms = per
        self.last_delta_norm = total
        self._last_P = P
        return {
            "proto/delta/norm": total,
            "proto/delta/relative": total / old_norm.clamp_min(_TINY),
            "proto/delta/per_proto_mean": per.mean(),
            "proto/delta/per_proto_max": per.amax(),
            "proto/delta/moved": moved,
            "proto/delta/drift": drift,
        }

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"init": None if self._init is None else self._init.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        init = state.get("init")
        self._init = None if init is None else torch.as_tensor(init).detach().clone()
        self._init_norm = None  # recomputed on the device at first use
