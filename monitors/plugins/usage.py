"""How many prototypes the model actually uses: assignment entropy and dead prototypes."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..core.base import Metrics, Monitor
from ..core.cadence import Every
from ..core.events import RunContext
from ..core.media import Histogram
from ..core.options import positive_int


def _mean_assignment(x: torch.Tensor) -> torch.Tensor:
    """(..., K) probabilities -> (K,) batch mean, renormalised to sum to 1 (float32)."""
    m = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).mean(dim=0)
    return m / m.sum().clamp_min(1e-30)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of a (K,) distribution; 0 * log 0 = 0."""
    return torch.special.entr(p).sum()


class UsageMonitor(Monitor):
    """Prototype usage from ``ctx.outputs.student_probs`` and ``ctx.outputs.teacher_targets``
    (both (N, K); a missing one is skipped silently).

    Student: ``proto/usage/entropy_student`` (entropy of the batch-mean probability, nats,
    at most log K) and ``proto/usage/perplexity_student`` (its exp: the effective number of
    prototypes used), ``proto/usage/hist`` (batch-mean probability) every ``hist_every`` steps.
    Teacher: the same as ``_teacher``, ``proto/usage/distinct_targets`` (distinct argmax targets
    in the batch), ``proto/usage/dead`` and ``proto/usage/dead_fraction``: prototypes not chosen
    as argmax target in any step of the last ``window`` steps (the current one included). Until
    ``window`` steps have passed since the first one seen, no prototype counts as dead.

    State: the step each prototype was last chosen, and the first step seen.
    """

    name = "usage"
    metrics = ("proto/usage/entropy_student", "proto/usage/perplexity_student", "proto/usage/hist",
               "proto/usage/entropy_teacher", "proto/usage/perplexity_teacher", "proto/usage/distinct_targets",
               "proto/usage/dead", "proto/usage/dead_fraction")

    def __init__(self, every_n_steps: Optional[int] = None, window: int = 100,
                 hist_every: int = 50) -> None:
        super().__init__(every_n_steps)
        owner = type(self).__name__
        self.window = positive_int(owner, "window", window)
        self._hist = Every(hist_every, owner, "hist_every")
        self._last_used: Optional[torch.Tensor] = None  # (K,) int64: step each was last argmax
        self._hit: Optional[torch.Tensor] = None        # (K,) bool work buffer
        self._first_step: Optional[int] = None
        self.steps_seen = 0

    def _buffers(self, K: int, device: torch.device, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        lu = self._last_used
        if lu is None or lu.shape[0] != K:
            self._first_step = step
            lu = torch.full((K,), step, dtype=torch.int64, device=device)
        elif lu.device != device:
            lu = lu.to(device)
        self._last_used = lu
        if self._hit is None or self._hit.shape[0] != K or self._hit.device != device:
            self._hit = torch.zeros(K, dtype=torch.bool, device=device)
        return lu, self._hit

    def on_step_end(self, ctx: RunContext) -> Metrics:
        outputs = ctx.outputs
        if outputs is None:
            return None
        probs, targets = outputs.student_probs, outputs.teacher_targets
        if probs is None and targets is None:
            return None
        step = ctx.step
        out: dict[str, Any] = {}
        if probs is not None:
            mean_p = _mean_assignment(probs)                                 # (K,)
            h = _entropy(mean_p)
            out["proto/usage/entropy_student"] = h
            out["proto/usage/perplexity_student"] = h.exp()
            if self._hist.fire(step):
                out["proto/usage/hist"] = Histogram(mean_p)
        if targets is not None:
            K = targets.shape[-1]
            t = targets.detach().reshape(-1, K)
            h = _entropy(_mean_assignment(t))
            out["proto/usage/entropy_teacher"] = h
            out["proto/usage/perplexity_teacher"] = h.exp()
            last_used, hit = self._buffers(K, t.device, step)
            hit.zero_()
            # argmax per row, as torch.max(...).indices; no sync
            hit.index_fill_(0, torch.max(t, dim=1).indices, True)
            last_used.masked_fill_(hit, step)
            dead = ((step - last_used) >= self.window).sum().to(torch.float32)
            out["proto/usage/distinct_targets"] = hit.sum().to(torch.float32)
            out["proto/usage/dead"] = dead
            out["proto/usage/dead_fraction"] = dead / K
            self.steps_seen += 1
        return out

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_used_step": None if self._last_used is None else self._last_used.detach().cpu().clone(),
            "first_step": self._first_step,
            "steps_seen": self.steps_seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        lu = state.get("last_used_step")
        self._last_used = None if lu is None else torch.as_tensor(lu, dtype=torch.int64).clone()
        self._first_step = state.get("first_step")
        self.steps_seen = int(state.get("steps_seen", 0))
