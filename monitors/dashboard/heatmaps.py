"""The heatmaps of a sweep (a metric over two swept parameters), as PNGs drawn with matplotlib;
shared by the sweep page and the sweep's own summary (``pipeline/sweep``)."""
from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..formats.records import atomic_write_bytes, to_float
from ..formats.sweep_state import HEALTH_METRICS
from .page import fmt


def _sort_key(v: Any) -> tuple:
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def heatmap_grid(rows: Sequence[Mapping[str, Any]], metric: str, row_key: str = "num_proto",
                 col_key: str = "output_dim", goal: str = "minimize"
                 ) -> tuple[list[Any], list[Any], np.ndarray]:
    """``(row_values, col_values, grid)``: ``grid[i, j]`` is ``metric`` of the finished trial with
    ``row_key == row_values[i]`` and ``col_key == col_values[j]``; NaN where no trial finished
    (failed, running, missing). Where other parameters vary too, a cell holds the best value
    over them (by ``goal``). Axis values are sorted (numbers ascending). An empty ``row_key``
    gives one row (a sweep over one parameter)."""
    if not row_key:
        rows = [{**r, "": ""} for r in rows]
    row_vals = sorted({r.get(row_key) for r in rows}, key=_sort_key)
    col_vals = sorted({r.get(col_key) for r in rows}, key=_sort_key)
    grid = np.full((len(row_vals), len(col_vals)), np.nan)
    ri = {v: i for i, v in enumerate(row_vals)}
    ci = {v: j for j, v in enumerate(col_vals)}
    better = np.fmin if goal == "minimize" else np.fmax
    for r in rows:
        if r.get("status") != "finished":
            continue
        x = to_float(r.get(metric))
        if x is None:
            continue
        i, j = ri[r.get(row_key)], ci[r.get(col_key)]
        grid[i, j] = x if math.isnan(grid[i, j]) else better(grid[i, j], x)
    return row_vals, col_vals, grid


def render_heatmap(row_vals: Sequence[Any], col_vals: Sequence[Any], grid: np.ndarray, metric: str,
                   row_key: str, col_key: str, title: Optional[str] = None,
                   path: Optional[str | os.PathLike] = None) -> bytes:
    """A heatmap PNG with every cell annotated (empty cells say 'n/a'); written to ``path`` too."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nr, nc = max(len(row_vals), 1), max(len(col_vals), 1)
    fig = Figure(figsize=(1.6 + 1.25 * nc, 1.3 + 0.75 * nr), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(np.asarray(grid, dtype=float).reshape(len(row_vals), len(col_vals)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e4e4e4")
    im = ax.imshow(data, cmap=cmap, aspect="auto")
    finite = data.compressed()
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(row_vals)):
        for j in range(len(col_vals)):
            v = grid[i, j]
            if math.isnan(v):
                ax.text(j, i, "n/a", ha="center", va="center", color="#777777", fontsize=9)
            else:
                ax.text(j, i, fmt(v), ha="center", va="center", fontsize=10,
                        color="white" if v < mid or finite.min() == finite.max() else "black")
    ax.set_xticks(range(len(col_vals)), [str(v) for v in col_vals])
    ax.set_yticks(range(len(row_vals)), [str(v) for v in row_vals])
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    ax.set_title(title or metric, fontsize=10)
    if finite.size and finite.min() != finite.max():
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, png)
    return png


def heatmap_axes(state: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Optional[tuple[str, str]]:
    """The (row, column) parameters of a sweep's heatmaps: num_proto x output_dim when swept, else
    the first two swept parameters (a single one gives one row)."""
    swept = list(state.get("swept") or [])
    if not swept:
        return None
    if "num_proto" in swept and "output_dim" in swept:
        return "num_proto", "output_dim"
    if len(swept) == 1:
        return "", swept[0]
    return swept[0], swept[1]


def heatmap_metrics(metric: str) -> list[str]:
    """The heatmaps of a sweep: its metric, then prototype health (final values) and errors."""
    return [metric] + [m for m in (*HEALTH_METRICS, "health/errors") if m != metric]
