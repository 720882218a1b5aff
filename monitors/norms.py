"""Per-prototype L2 norms: are the prototypes growing, shrinking, or spreading apart?"""
from __future__ import annotations

from typing import Optional

from .base import Metrics, Monitor, positive_int
from .events import RunContext
from .media import Histogram, VectorStat


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
        norms = ctx.shared.row_norms(ctx)  # (K,), shared with the other monitors of this event
        # the statistics are reduced by the hub at the log interval: one pass here per step
        out: dict = {f"proto/norm/{stat}": VectorStat(norms, stat) for stat in ("mean", "min", "max", "std")}
        if self._last_hist is None or ctx.step - self._last_hist >= self.hist_every:
            self._last_hist = ctx.step
            out["proto/norm/hist"] = Histogram(norms)  # fresh tensor: safe to keep until flush
        return out
