"""Per-prototype L2 norms: are the prototypes growing, shrinking, or spreading apart?"""
from __future__ import annotations

from typing import Optional

from ..core.base import Metrics, Monitor
from ..core.cadence import Every
from ..core.events import RunContext
from ..core.media import Histogram, VectorStat
from ..core.options import positive_int
from ..core.proto_stats import SAMPLE_ABOVE, SAMPLE_ROWS, row_sample


class NormMonitor(Monitor):
    """Statistics of the K row norms ``||P_k||`` at the end of each step.

    Emits ``proto/norm/mean``, ``/min``, ``/max``, ``/std`` (population std, so K=1 gives 0,
    not NaN) every step, and ``proto/norm/hist`` (the K norms) every ``hist_every`` steps.

    Above ``sample_above`` prototypes (16,384) these are statistics of a fixed, evenly spaced sample of
    ``sample_rows`` (4,096) rows, and ``proto/norm/sampled`` (the number of rows they cover) is
    logged beside them; without it they cover every row. ``sample_above`` >= K gives exact
    per-row statistics at any K (one more pass over P per step).
    """

    name = "norms"
    metrics = ("proto/norm/mean", "proto/norm/min", "proto/norm/max", "proto/norm/std", "proto/norm/hist",
               "proto/norm/sampled")

    def __init__(self, every_n_steps: Optional[int] = None, hist_every: int = 50,
                 sample_above: int = SAMPLE_ABOVE, sample_rows: int = SAMPLE_ROWS) -> None:
        super().__init__(every_n_steps)
        owner = type(self).__name__
        self._hist = Every(hist_every, owner, "hist_every")
        self.sample_above = positive_int(owner, "sample_above", sample_above, minimum=0)
        self.sample_rows = positive_int(owner, "sample_rows", sample_rows)

    def on_step_end(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes
        idx = row_sample(P.shape[0], self.sample_above, self.sample_rows, P.device)
        if idx is None:
            norms = ctx.proto_stats.row_norms(ctx)  # (K,), shared with the other monitors of this event
        else:
            norms = ctx.proto_stats.sampled_row_norms(ctx, idx)  # (sample_rows,): a gather, not a pass
        # the statistics are reduced by the hub at the log interval: one pass here per step
        out: dict = {
            "proto/norm/mean": VectorStat(norms, "mean"),
            "proto/norm/min": VectorStat(norms, "min"),
            "proto/norm/max": VectorStat(norms, "max"),
            "proto/norm/std": VectorStat(norms, "std"),
        }
        if idx is not None:
            out["proto/norm/sampled"] = float(idx.shape[0])
        if self._hist.fire(ctx.step):
            out["proto/norm/hist"] = Histogram(norms)  # fresh tensor: safe to keep until flush
        return out
