"""Heatmaps of every prototype's norm and update size over training (prototypes x steps)."""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..core.base import Metrics, Monitor
from ..core.cadence import Every
from ..core.events import RunContext
from ..core.media import Image, figure_to_array
from ..core.options import number_in, positive_int
from ..core.proto_stats import row_distances, work_dtype


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around column centres ``x`` (may be unevenly spaced)."""
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2.0
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _new_figure(ylabel: str) -> tuple[Any, Any]:
    """An Agg figure with one axes; no pyplot, so no global backend or figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=80)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.09, right=0.92, bottom=0.11, top=0.93)  # no tight_layout: 2nd draw
    ax = fig.add_subplot()
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    return fig, ax


def _is_even(x: np.ndarray) -> bool:
    return len(x) < 3 or bool(np.allclose(np.diff(x), x[1] - x[0]))


class _Heatmap:
    """One reusable heatmap figure: axes, ticks and colorbar are made once, and later renders
    only swap the data."""

    def __init__(self, cbar: str) -> None:
        self.cbar = cbar
        self._fig: Any = None
        self._ax: Any = None
        self._im: Any = None
        self._ylabel: Optional[str] = None

    def _build(self, values: np.ndarray) -> None:
        self._fig, self._ax = _new_figure("")
        self._im = self._ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
        self._fig.colorbar(self._im, ax=self._ax, label=self.cbar, fraction=0.05, pad=0.015)
        self._ylabel = ""

    def warm(self) -> None:
        """Make the figure and draw it once, so that the first render in training costs what
        every later one does (the first draw of a figure lays out its fonts and ticks: ~2x)."""
        if self._fig is None:
            self._build(np.zeros((2, 2)))
            self._fig.canvas.draw()

    def render(self, steps: Sequence[int], data: np.ndarray, title: str, ylabel: str) -> np.ndarray:
        """(rows, T) ``data`` against real step numbers -> (H, W, 4) uint8; row 0 on top."""
        x = np.asarray(steps, dtype=np.float64)
        edges = _edges(x)
        values = np.ma.masked_invalid(data)
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if not _is_even(x):  # e.g. after a resume at another cadence: draw true column widths
            fig, ax = _new_figure(ylabel)
            mesh = ax.pcolormesh(edges, np.arange(data.shape[0] + 1), values, shading="flat",
                                 cmap="viridis", vmin=lo, vmax=hi)
            ax.invert_yaxis()
            ax.set_title(title, fontsize=10)
            fig.colorbar(mesh, ax=ax, label=self.cbar, fraction=0.05, pad=0.015)
            return figure_to_array(fig)
        if self._fig is None:
            self._build(values)
        if self._ylabel != ylabel:
            self._ax.set_ylabel(ylabel)
            self._ylabel = ylabel
        self._im.set_data(values)
        self._im.set_extent((edges[0], edges[-1], data.shape[0], 0))
        self._im.set_clim(lo, hi)
        self._ax.set_title(title, fontsize=10)
        self._fig.canvas.draw()
        return np.asarray(self._fig.canvas.buffer_rgba()).copy()


class EvolutionMonitor(Monitor):
    """Records, every ``every_n_steps``, each prototype's norm ``||P_k||`` and update size
    ``||P_k,new - P_k,old||`` (from its own snapshot around ``optimizer.step()``) into device ring
    buffers of ``max_columns`` columns. When full, every other column is dropped and the record
    interval doubles, so long runs stay bounded and evenly sampled.

    At ``on_log`` every ``image_every`` steps, but at most once per ``min_render_seconds`` (60) of
    wall time (rendering is host work, which a step cadence alone would repeat too often when
    steps are fast), and at ``on_train_end`` it renders two heatmaps,
    ``proto/evolution/norm`` and ``proto/evolution/update`` (log10): rows are prototypes sorted by
    their latest norm (at most ``max_rows``, evenly sampled), columns are steps. For
    K > ``max_tracked`` a fixed evenly spaced subset of prototypes is tracked.
    :meth:`history` returns the data of the last render.

    State: the buffers (on CPU), so a resumed run's heatmap continues.
    """

    name = "evolution"
    metrics = ("proto/evolution/norm", "proto/evolution/update")

    def __init__(self, every_n_steps: int = 10, max_columns: int = 200, image_every: int = 100,
                 max_rows: int = 256, max_tracked: int = 4096, min_render_seconds: float = 60.0) -> None:
        super().__init__(every_n_steps)
        owner = type(self).__name__
        self.max_columns = positive_int(owner, "max_columns", max_columns, minimum=2)
        self.image_every = positive_int(owner, "image_every", image_every)
        self.max_rows = positive_int(owner, "max_rows", max_rows)
        self.max_tracked = positive_int(owner, "max_tracked", max_tracked)
        self.min_render_seconds = number_in(owner, "min_render_seconds", min_render_seconds, 0.0)
        self._last_render_time = -math.inf            # time.monotonic() of the last render
        self._norm: Optional[torch.Tensor] = None    # (max_columns, Kt) float32, row c = column c
        self._update: Optional[torch.Tensor] = None  # (max_columns, Kt)
        self._steps: list[int] = []                  # real step of each filled column
        self._stride = 1                             # record every every_n_steps * stride steps
        self._record = Every(self.every_n_steps, owner, "every_n_steps")  # its n follows the stride
        self._tracked: Optional[torch.Tensor] = None  # (Kt,) prototype indices when K > max_tracked
        self._tracked_for: Optional[int] = None       # K the tracked indices were made for
        self._num_proto: Optional[int] = None
        self._prev: Optional[torch.Tensor] = None     # (Kt, D) snapshot before step()
        self._cur: Optional[torch.Tensor] = None      # (Kt, D) tracked rows after step()
        self._scratch: Optional[torch.Tensor] = None  # row block of row_distances
        self._snapshot_step: Optional[int] = None
        self._last_render: Optional[int] = None
        self._dirty = False                           # columns added since the last render
        self._history: Optional[dict[str, Any]] = None
        self._loaded: Optional[dict[str, Any]] = None  # CPU state waiting for the device
        self._norm_map = _Heatmap("||P_k||")
        self._update_map = _Heatmap("log10 ||ΔP_k||  (exact 0 at the bottom)")

    # -- recording --------------------------------------------------------------------------
    def _select(self, P: torch.Tensor, buf: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tracked rows of P (all when K <= max_tracked), gathered into ``buf`` when it fits
        (so that a step makes no new tensor), else into a new buffer that the caller keeps."""
        K = P.shape[0]
        if K <= self.max_tracked:
            return P
        if self._tracked is None or self._tracked.device != P.device or self._tracked_for != K:
            self._tracked = torch.from_numpy(self._tracked_ids(K)).to(P.device)
            self._tracked_for = K
        shape = (self._tracked.shape[0], *P.shape[1:])
        if buf is None or buf.shape != shape or buf.device != P.device or buf.dtype != P.dtype:
            buf = torch.empty(shape, device=P.device, dtype=P.dtype)
        return torch.index_select(P, 0, self._tracked, out=buf)

    def _due(self, step: int) -> bool:
        """Whether ``step`` records a column (every ``every_n_steps * stride`` steps)."""
        self._record.n = self.every_n_steps * self._stride
        return self._record.due(step)

    def on_train_start(self, ctx: RunContext) -> Metrics:
        # import the renderer and make both figures now, before the first step: the import and
        # the first draw would otherwise stall the step of the first render in mid-training
        self._norm_map.warm()
        self._update_map.warm()
        return None

    def on_before_optimizer_step(self, ctx: RunContext) -> Metrics:
        if not self._due(ctx.step):
            return None
        self._snapshot_step = ctx.step
        if ctx.prototypes.shape[0] <= self.max_tracked:  # every row: the shared snapshot
            ctx.proto_stats.snapshot(ctx)
            return None
        self._prev = self._select(ctx.prototypes.detach(), self._prev)  # gathered into its buffer
        return None

    def on_after_optimizer_step(self, ctx: RunContext) -> Metrics:
        if self._snapshot_step != ctx.step:
            return None
        self._snapshot_step = None
        P_full = ctx.prototypes.detach()
        if P_full.shape[0] <= self.max_tracked:
            update = ctx.proto_stats.update_row_norms(ctx)
            if update is not None:
                self._append(ctx.step, P_full.shape[0], ctx.proto_stats.row_norms(ctx).float(), update.float())
            return None
        if self._prev is None:
            return None
        self._cur = P = self._select(P_full, self._cur)
        if P.shape != self._prev.shape:
            return None
        update, self._scratch = row_distances(P, self._prev, self._scratch)
        norms = torch.linalg.vector_norm(P, dim=1, dtype=work_dtype(P.dtype))
        self._append(ctx.step, P_full.shape[0], norms.float(), update.float())
        return None

    def _allocate(self, K: int, Kt: int, device: torch.device) -> None:
        self._norm = torch.zeros(self.max_columns, Kt, device=device)
        self._update = torch.zeros(self.max_columns, Kt, device=device)
        self._num_proto = K
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded["norm"].shape[1] == Kt and loaded["num_proto"] == K:
            n = min(len(loaded["steps"]), self.max_columns)
            self._norm[:n].copy_(loaded["norm"][-n:])
            self._update[:n].copy_(loaded["update"][-n:])
            self._steps = list(loaded["steps"][-n:])
            self._stride = loaded["stride"]
        else:
            self._steps, self._stride = [], 1

    def _append(self, step: int, K: int, norms: torch.Tensor, update: torch.Tensor) -> None:
        Kt = norms.shape[0]
        if self._norm is None or self._norm.shape[1] != Kt or self._norm.device != norms.device \
                or self._num_proto != K:
            self._allocate(K, Kt, norms.device)
        if len(self._steps) >= self.max_columns:  # full: keep every other column, halve the rate
            keep = torch.arange(0, len(self._steps), 2, device=self._norm.device)
            n = keep.shape[0]
            self._norm[:n] = self._norm.index_select(0, keep)
            self._update[:n] = self._update.index_select(0, keep)
            self._steps = self._steps[::2]
            self._stride *= 2
        c = len(self._steps)
        self._norm[c].copy_(norms)
        self._update[c].copy_(update)
        self._steps.append(step)
        self._record.last = step
        self._dirty = True

    # -- rendering (host side) --------------------------------------------------------------
    def _tracked_ids(self, K: int) -> Optional[np.ndarray]:
        if K <= self.max_tracked:
            return None
        return np.linspace(0, K - 1, self.max_tracked).round().astype(np.int64)

    def _collect(self) -> Optional[dict[str, Any]]:
        """Host copy of the buffers, rows sorted by latest norm and subsampled."""
        T = len(self._steps)
        if T == 0:
            return None
        if self._norm is not None:
            norm_t, upd_t = self._norm[:T], self._update[:T]   # reading them syncs: on_log only
        elif self._loaded is not None:
            norm_t, upd_t = self._loaded["norm"], self._loaded["update"]
        else:
            return None
        norm = norm_t.T.cpu().numpy().astype(np.float64)        # (Kt, T)
        update = upd_t.T.cpu().numpy().astype(np.float64)
        last = np.nan_to_num(norm[:, -1], nan=-np.inf)
        order = np.argsort(-last, kind="stable")
        if len(order) > self.max_rows:
            order = order[np.linspace(0, len(order) - 1, self.max_rows).round().astype(int)]
        tracked = self._tracked_ids(self._num_proto or norm.shape[0])
        protos = order if tracked is None else tracked[order]
        return {"steps": list(self._steps), "norm": norm[order], "update": update[order],
                "rows": protos.astype(np.int64)}

    def _render(self, step: int) -> Metrics:
        hist = self._collect()
        if hist is None:
            return None
        self._history = hist
        self._last_render = step
        self._last_render_time = time.monotonic()
        self._dirty = False
        steps, n_rows = hist["steps"], len(hist["rows"])
        ylabel = f"prototype rank by norm ({n_rows} of {self._num_proto})"
        upd = hist["update"]
        positive = upd[np.isfinite(upd) & (upd > 0)]
        if positive.size:
            floor = positive.min() / 10.0  # exact zeros (frozen rows) sit one decade below
            log_upd = np.log10(np.where(np.isfinite(upd), np.maximum(upd, floor), np.nan))
            upd_title = f"per-prototype update size at step {step}"
        else:
            log_upd = np.where(np.isfinite(upd), 0.0, np.nan)
            upd_title = f"per-prototype update size at step {step}: NO PROTOTYPE EVER MOVED"
        norm_img = self._norm_map.render(steps, hist["norm"], f"per-prototype norm ||P_k|| at step {step}",
                                         ylabel)
        upd_img = self._update_map.render(steps, log_upd, upd_title, ylabel)
        return {
            "proto/evolution/norm": Image(norm_img, caption=f"prototype norms, step {step}"),
            "proto/evolution/update": Image(upd_img, caption=f"prototype update sizes, step {step}"),
        }

    def on_log(self, ctx: RunContext) -> Metrics:
        if not self._dirty:
            return None
        last = -1 if self._last_render is None else self._last_render
        if ctx.step - last < self.image_every:
            return None
        if time.monotonic() - self._last_render_time < self.min_render_seconds:
            return None
        return self._render(ctx.step)

    def on_train_end(self, ctx: RunContext) -> Metrics:
        if not self._dirty:
            return None
        return self._render(ctx.step)

    def history(self) -> dict[str, Any]:
        """``{"steps": [...], "norm": (rows, T), "update": (rows, T), "rows": prototype ids}``
        from the last render (or collected now if nothing was rendered yet); empty arrays if
        nothing was recorded."""
        if self._history is None or self._dirty:
            hist = self._collect()
            if hist is not None:
                return hist
        if self._history is None:
            return {"steps": [], "norm": np.zeros((0, 0)), "update": np.zeros((0, 0)),
                    "rows": np.zeros(0, dtype=np.int64)}
        return dict(self._history)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._norm is None:
            return dict(self._loaded) if self._loaded is not None else {}
        T = len(self._steps)
        return {
            "steps": list(self._steps),
            "norm": self._norm[:T].detach().cpu().clone(),
            "update": self._update[:T].detach().cpu().clone(),
            "stride": self._stride,
            "last_record": self._record.last,
            "num_proto": self._num_proto,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state or "steps" not in state:
            return
        self._loaded = {
            "steps": [int(s) for s in state["steps"]],
            "norm": torch.as_tensor(state["norm"], dtype=torch.float32),
            "update": torch.as_tensor(state["update"], dtype=torch.float32),
            "stride": int(state.get("stride", 1)),
            "last_record": state.get("last_record"),
            "num_proto": state.get("num_proto"),
        }
        self._norm = self._update = None
        self._steps = list(self._loaded["steps"])
        self._stride = self._loaded["stride"]
        self._record.load_state_dict({"last": self._loaded["last_record"]})
        self._num_proto = self._loaded["num_proto"]
        self._dirty = bool(self._steps)
        self._history = None
