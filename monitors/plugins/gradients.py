"""Gradient sizes of the prototypes (before and after clipping) and of other parameter groups."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..core.base import Metrics, Monitor
from ..core.cadence import Every
from ..core.events import RunContext
from ..core.media import Histogram, VectorStat
from ..core.options import positive_int
from ..core.proto_stats import SAMPLE_ABOVE, SAMPLE_ROWS, grad_of, row_sample, work_dtype

_TINY = 1e-12


def _total_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the concatenation of ``tensors`` as a 0-dim tensor (one fused kernel per
    device/dtype, no sync; half precision is summed in float32, float64 stays float64)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    norms = [n for dt, ts in by_dtype.items() for n in torch._foreach_norm(ts, 2, dtype=work_dtype(dt))]
    dev = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(dev, torch.float64) for n in norms]))


class GradientMonitor(Monitor):
    """Gradient statistics.

    ``on_after_backward``: ``proto/grad/raw_norm`` (before clipping).
    ``on_before_optimizer_step`` (the gradient the optimizer will use): ``proto/grad/norm``,
    ``proto/grad/per_proto_mean``, ``proto/grad/per_proto_max``, ``proto/grad/to_weight``
    (``||grad|| / ||P||``), ``proto/grad/hist`` (K per-prototype norms, every ``hist_every``
    steps), and for each entry of ``ctx.param_groups``: ``grad/<name>/norm`` and
    ``grad/<name>/to_weight`` over the parameters of that group that have a gradient, every
    ``groups_every`` steps (a pass over every gradient and weight of the model, as costly as
    ``clip_grad_norm_``; 1 = every step).

    Above ``sample_above`` prototypes (16,384) the per-prototype statistics and the histogram
    are those of a fixed, evenly spaced sample of ``sample_rows`` (4,096) rows, and
    ``proto/grad/sampled`` (the number of rows they cover) is logged beside them; ``norm``,
    ``raw_norm`` and ``to_weight`` stay exact (one fused pass over the whole gradient); above
    ``ctx.proto_stats.full_above`` (16,384) those three come every ``full_every`` (10) steps
    (:mod:`monitors.core.proto_stats`).

    A prototype without a gradient yields no metrics: the health doctor diagnoses that.
    """

    name = "gradients"
    metrics = ("proto/grad/raw_norm", "proto/grad/norm", "proto/grad/per_proto_mean", "proto/grad/per_proto_max",
               "proto/grad/to_weight", "proto/grad/sampled", "proto/grad/hist",
               "grad/<group>/norm", "grad/<group>/to_weight")  # <group>: each name of ctx.param_groups

    def __init__(self, every_n_steps: Optional[int] = None, hist_every: int = 50,
                 groups_every: int = 10, sample_above: int = SAMPLE_ABOVE,
                 sample_rows: int = SAMPLE_ROWS) -> None:
        super().__init__(every_n_steps)
        owner = type(self).__name__
        self._hist = Every(hist_every, owner, "hist_every")
        self._groups = Every(groups_every, owner, "groups_every")
        self.sample_above = positive_int(owner, "sample_above", sample_above, minimum=0)
        self.sample_rows = positive_int(owner, "sample_rows", sample_rows)

    def on_after_backward(self, ctx: RunContext) -> Metrics:
        if not ctx.proto_stats.full_step(ctx):
            return None
        total = ctx.proto_stats.grad_norm(ctx)
        if total is None:
            return None
        return {"proto/grad/raw_norm": total}

    def on_before_optimizer_step(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes
        idx = row_sample(P.shape[0], self.sample_above, self.sample_rows, P.device)
        if idx is None:
            per = ctx.proto_stats.grad_row_norms(ctx)  # (K,); the total derives from it
        else:
            per = ctx.proto_stats.sampled_grad_row_norms(ctx, idx)  # (sample_rows,): a gather
        if per is None:
            return None
        out: dict = {
            "proto/grad/per_proto_mean": VectorStat(per, "mean"),  # reduced at the log interval
            "proto/grad/per_proto_max": VectorStat(per, "max"),
        }
        if ctx.proto_stats.full_step(ctx):
            total = ctx.proto_stats.grad_norm(ctx)  # exact, shared with the health doctor
            out["proto/grad/norm"] = total
            out["proto/grad/to_weight"] = total / ctx.proto_stats.norm(ctx).clamp_min(_TINY)
        if idx is not None:
            out["proto/grad/sampled"] = float(idx.shape[0])
        if self._hist.fire(ctx.step):
            out["proto/grad/hist"] = Histogram(per)
        if ctx.param_groups and self._groups.fire(ctx.step):
            out.update(self._group_norms(ctx))
        return out

    def _group_norms(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        out = {}
        for group, params in ctx.param_groups.items():
            grads, weights = [], []
            for p in params:
                pg = grad_of(p)
                if pg is None or pg.is_sparse:
                    continue
                grads.append(pg.detach())
                weights.append(p.detach())
            if not grads:
                continue
            g_norm = _total_norm(grads)
            w_norm = _total_norm(weights)
            out["grad/<group>/norm".replace("<group>", group)] = g_norm
            out["grad/<group>/to_weight".replace("<group>", group)] = g_norm / w_norm.clamp_min(_TINY)
        return out
