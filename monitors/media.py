"""Rich values a monitor may return besides scalars. Sinks turn them into W&B objects or files;
monitors never import wandb."""
from __future__ import annotations

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
