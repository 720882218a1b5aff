"""Rich values a monitor may return besides scalars. Sinks turn them into W&B objects or files;
monitors never import wandb."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch


@dataclass
class Histogram:
    """A distribution of values (a tensor may stay on the device until the log interval)."""

    values: Any  # torch.Tensor or np.ndarray, any shape; flattened
    num_bins: int = 64

    def numpy(self) -> np.ndarray:
        v = self.values
        if isinstance(v, torch.Tensor):
            v = v.detach().float().cpu().numpy()
        return np.asarray(v, dtype=np.float64).ravel()


#: what :class:`VectorStat` can compute
VECTOR_STATS: tuple[str, ...] = ("mean", "min", "max", "std", "sum", "norm", "nonzero")


@dataclass(frozen=True)
class VectorStat:
    """One statistic of a vector, computed by the hub at the log interval instead of per step.

    A monitor returns ``{"proto/norm/mean": VectorStat(norms, "mean")}`` and keeps the vector
    (a fresh tensor: not a buffer it overwrites later). At the flush the hub stacks the vectors
    of all buffered steps and reduces them in one batched call per statistic, so a step pays one
    pass to make the vector and nothing per statistic. ``std`` is the population std (a single
    value gives 0), ``norm`` the L2 norm, ``nonzero`` the count of non-zero entries.
    """

    values: torch.Tensor
    stat: str

    def __post_init__(self) -> None:
        if self.stat not in VECTOR_STATS:
            raise ValueError(f"VectorStat: unknown statistic {self.stat!r}; use one of {', '.join(VECTOR_STATS)}")
        if not isinstance(self.values, torch.Tensor):
            raise TypeError(f"VectorStat: values must be a torch.Tensor, got {type(self.values).__name__}")


def reduce_rows(x: torch.Tensor, stat: str) -> torch.Tensor:
    """``stat`` of each row of ``x`` (N, M): an (N,) tensor, on x's device; NaN for M = 0."""
    if x.shape[1] == 0:
        return torch.full(x.shape[:1], math.nan, dtype=x.dtype, device=x.device)
    if stat == "mean":
        return x.mean(dim=1)
    if stat == "min":
        return x.amin(dim=1)
    if stat == "max":
        return x.amax(dim=1)
    if stat == "std":
        return x.std(dim=1, correction=0)
    if stat == "sum":
        return x.sum(dim=1)
    if stat == "norm":
        return torch.linalg.vector_norm(x, dim=1)
    if stat == "nonzero":
        return (x != 0).sum(dim=1).to(x.dtype)
    raise ValueError(f"unknown statistic {stat!r}")


@dataclass
class Image:
    """An RGB(A) image as a uint8 array (H, W, 3|4), or a path to a PNG file."""

    data: Any
    caption: Optional[str] = None

    def array(self) -> np.ndarray:
        if isinstance(self.data, (str, bytes)) or hasattr(self.data, "__fspath__"):
            import matplotlib.image as mpimg

            arr = mpimg.imread(self.data)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
            return arr
        return np.asarray(self.data)


@dataclass
class Table:
    """Rows of plain values under named columns."""

    columns: Sequence[str]
    rows: list = field(default_factory=list)


def figure_to_array(fig: Any) -> np.ndarray:
    """Render a matplotlib figure to an (H, W, 4) uint8 array and close it."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return arr
