"""Per-prototype L2 norms: are the prototypes growing, shrinking, or spreading apart?"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Metrics, Monitor, positive_int
from .events import RunContext
from .media import Histogram



class NormMonitor(Monitor):
    """Statistics of the K row norms ``||P_k||`` at the end of each step.

    Emits ``proto/norm/mean``, ``/min``, ``/max``, ``/std`` (population std, so K=1 gives 0,
    not NaN) every step, and ``proto/norm/hist`` (the K norms) every ``hist_every`` steps.
    """

    name = "norms"

    def __init__(self, every_n_steps: Optional[int] = None, hist_every: int = 50) -> None:
        super().__init__(every_n_steps)
        self.hist_every = positive_int(type(self).__name__, "hist_every", hist_every)
        self._last_hist: Optional[int] = None

    def on_step_end(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes.detach()                                        # (K, D)
        norms = torch.linalg.vector_norm(P, dim=1, dtype=torch.float32)   # (K,)
        std, mean = torch.std_mean(norms, correction=0)
        lo, hi = torch.aminmax(norms)
        out = {
            "proto/norm/mean": mean,
            "proto/norm/min": lo,
            "proto/norm/max": hi,
            "proto/norm/std": std,
        }
        if self._last_hist is None or ctx.step - self._last_hist >= self.hist_every:
            self._last_hist = ctx.step
            out["proto/norm/hist"] = Histogram(norms)  # fresh tensor: safe to keep until flush
        return out
