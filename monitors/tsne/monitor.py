"""t-SNE frames of the prototypes among labelled speaker embeddings, computed in the background.

Each frame places a fixed subset of prototypes (black ``x``) and up to ``max_points`` speaker
embeddings of the same space (head outputs, coloured by speaker) in 2-D. A frame starts from the
previous frame's layout and is aligned to it, so the sequence shows the prototypes move; the
dashboard turns the frames saved under ``<exp_dir>/tsne/`` into an animated GIF (``monitors.dashboard.build_tsne_gif``).

Training never waits for a frame: the t-SNE and the rendering run in a separate, niced,
single-threaded Python process (:mod:`monitors.tsne.worker`); hooks only check whether the frame
in flight is done.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..core.base import Metrics, Monitor
from ..core.events import RunContext
from ..core.media import Image, Table
from ..core.options import number_in, positive_int
from .frame import compute_frame
from .worker import BackgroundWorker

#: sklearn's TSNE refuses fewer iterations (its early-exaggeration phase alone is 250)
MIN_TSNE_ITER = 250
#: fewer points than this make no t-SNE (perplexity needs a few neighbours)
MIN_FRAME_POINTS = 4
TABLE_COLUMNS = ("x", "y", "kind", "label", "step")
#: the default ``frame_every``: steps between two training-time frames
FRAME_EVERY = 200


class TSNEMonitor(Monitor):
    """Prototypes and speaker embeddings in one t-SNE picture, one frame at a time.

    Frames come from two sources:

    - ``on_embeddings`` (``hub.log_embeddings`` or an evaluation pass): one frame per call with
      up to ``max_points`` of ``ctx.embeddings`` (N, D) and their ``ctx.labels``. If the worker
      is busy, the call waits in a one-slot queue (a newer call replaces it).
    - training steps: ``on_step_end`` copies ``ctx.outputs.projections`` (B, D) and
      ``ctx.outputs.labels`` (B,) into a device-side ring buffer of the latest ``max_points``
      rows (no sync); ``on_log`` takes a frame once the step passes the next multiple of
      ``frame_every``. If the worker is still busy then, the frame is skipped
      (``proto/tsne_skipped``).

    A finished frame is returned by the next ``on_step_end``/``on_log``/``close()`` as
    ``proto/tsne`` (image, captioned with the step the frame was taken at), ``proto/tsne_table``
    (x, y, kind, label, step per point), ``proto/tsne_step`` and ``perf/tsne_frame_s`` (worker
    seconds). All frames stay in :attr:`frames`; with ``ctx.exp_dir`` set, each is also saved as
    ``<exp_dir>/tsne/frame_<step:07d>.png`` plus one line of ``<exp_dir>/tsne/frames.jsonl``.

    Args:
        every_n_steps: the hub cadence of ``on_step_end`` (the ring-buffer copies), as for every
            monitor (default 1: every step; a ring buffer filled only at frame steps would hold
            one batch, or batches of an older model). Given without ``frame_every`` it is an
            error, so that a config that means the frame cadence by it is not silently read as
            the hub cadence.
        frame_every: steps between two training-time frames (default ``FRAME_EVERY`` = 200).
        max_points: embeddings per frame (and size of the ring buffer).
        max_prototypes: prototypes per frame: all if K is smaller, else a fixed random subset,
            the same in every frame so that each prototype can be followed.
        max_iter: t-SNE iterations per frame (sklearn's minimum, 250, is plenty from a warm
            start; the first frame, from PCA, uses at least ``FIRST_FRAME_ITER`` = 500).
        background: compute in a background process; False computes inline (tests, debugging).
        seed: seed of the prototype subset, of the t-SNE and of the initial jitter.
        close_timeout_s: how long :meth:`close` waits for the frame in flight.
        worker_nice: niceness of the worker process (0-19). 19 (the default) gives training
            the priority: on busy cores frames come slowly and those due meanwhile are skipped;
            a lower value gives the frames more CPU and training less.
    """

    name = "tsne"
    metrics = ("proto/tsne", "proto/tsne_table", "proto/tsne_step", "proto/tsne_skipped", "perf/tsne_frame_s")

    def __init__(self, every_n_steps: Optional[int] = None, frame_every: Optional[int] = None,
                 max_points: int = 400, max_prototypes: int = 256, max_iter: int = 250,
                 background: bool = True, seed: int = 0, close_timeout_s: float = 60.0,
                 worker_nice: int = 19) -> None:
        owner = type(self).__name__
        if every_n_steps is not None and frame_every is None:
            raise ValueError(
                f"{owner}: every_n_steps is the hub cadence of the ring-buffer copies, like every "
                f"monitor's; the frame cadence is frame_every (every_n_steps meant it before): pass "
                f"frame_every={every_n_steps!r} for frames every {every_n_steps!r} steps, and every_n_steps "
                f"only beside frame_every")
        super().__init__(every_n_steps)
        self.frame_every = positive_int(owner, "frame_every", FRAME_EVERY if frame_every is None else frame_every)
        self.max_points = positive_int(owner, "max_points", max_points)
        self.max_prototypes = positive_int(owner, "max_prototypes", max_prototypes)
        self.max_iter = positive_int(owner, "max_iter", max_iter, MIN_TSNE_ITER)
        self.close_timeout_s = number_in(owner, "close_timeout_s", close_timeout_s, 0.0)
        self.worker_nice = positive_int(owner, "worker_nice", worker_nice, minimum=0)
        number_in(owner, "worker_nice", worker_nice, 0, 19)
        self.background = bool(background)
        self.seed = int(seed)
        #: every finished frame: {"step", "coords" (n, 2), "labels", "kinds", "source"}
        self.frames: list[dict[str, Any]] = []
        # resumable state
        self._proto_idx: Optional[np.ndarray] = None       # (m,) rows of the prototypes tracked
        self._prev_protos: Optional[np.ndarray] = None     # (m, 2) their last layout
        self._prev_speakers: dict[str, list[float]] = {}   # speaker -> 2-D centroid in the last frame
        self._frames_started = 0
        self._next_frame_step = 0
        self._skipped = 0
        # ring buffer of labelled projections, on the training device
        self._buf: Optional[torch.Tensor] = None      # (max_points, D)
        self._buf_labels: Optional[torch.Tensor] = None  # (max_points,) int64
        self._ptr = 0
        self._filled = 0
        # background work
        self._worker: Optional[BackgroundWorker] = None
        self._future: Optional[Future] = None
        self._pending: Optional[dict[str, Any]] = None  # an on_embeddings job waiting for the worker
        self._png_names: set[str] = set()
        self._colours: dict[str, int] = {}  # speaker -> colour index, kept across frames

    @property
    def frame_every_n_steps(self) -> int:
        """The frame cadence: the same as :attr:`frame_every`."""
        return self.frame_every

    # -- hooks ------------------------------------------------------------------------------
    def on_step_end(self, ctx: RunContext) -> Metrics:
        out = ctx.outputs
        if out is not None and out.projections is not None and out.labels is not None and ctx.is_main_process:
            self._collect(ctx, out.projections, out.labels)
        return self._poll()

    def on_log(self, ctx: RunContext) -> Metrics:
        metrics = dict(self._poll() or {})
        if ctx.step >= self._next_frame_step and ctx.is_main_process:
            self._next_frame_step = (ctx.step // self.frame_every + 1) * self.frame_every
            if self._busy():
                self._skipped += 1
                metrics["proto/tsne_skipped"] = self._skipped
            else:
                job = self._job(ctx, *self._ring_snapshot(), source="steps")
                if job is not None:
                    metrics.update(self._start(job) or {})
        return metrics or None

    def on_embeddings(self, ctx: RunContext) -> Metrics:
        metrics = dict(self._poll() or {})
        if not ctx.is_main_process or ctx.embeddings is None:
            return metrics or None
        E = ctx.embeddings.detach()
        D = ctx.prototypes.shape[-1]
        if E.dim() != 2 or E.shape[1] != D:
            raise ValueError(
                f"tsne: embeddings of shape {tuple(E.shape)} do not live in the prototypes' space "
                f"(D={D}); pass the head outputs (projections), not the backbone embeddings")
        n = E.shape[0]
        labels = ctx.labels
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().tolist()
        labels = ["?"] * n if labels is None else [str(x) for x in labels]
        if len(labels) != n:
            raise ValueError(f"tsne: {n} embeddings but {len(labels)} labels")
        if n > self.max_points:
            g = torch.Generator().manual_seed(self.seed + 7919 * (self._frames_started + 1))
            keep = torch.randperm(n, generator=g)[: self.max_points].sort().values
            E = E.index_select(0, keep.to(E.device))
            labels = [labels[i] for i in keep.tolist()]
        job = self._job(ctx, E.float().cpu().numpy(), labels, source="embeddings")
        if job is None:
            return metrics or None
        if self._busy():
            if self._pending is not None:
                self._skipped += 1  # replaced by the newer call
            self._pending = job
            return metrics or None
        metrics.update(self._start(job) or {})
        return metrics or None

    def close(self) -> list[tuple[int, dict[str, Any]]]:
        """Wait (at most ``close_timeout_s``) for the frame in flight and a queued one, stop the
        worker, and return each frame finished meanwhile as (the step it was taken at, its
        metrics): the hub logs every one, not only the last."""
        frames: list[tuple[int, dict[str, Any]]] = []
        deadline = time.monotonic() + self.close_timeout_s
        try:
            while self._future is not None:
                try:
                    self._future.result(timeout=max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    break  # give up on it; the worker is killed below
                except Exception:
                    pass  # raised by _poll below
                metrics = self._poll()  # also submits a queued job
                if metrics:
                    frames.append((int(metrics.get("proto/tsne_step", 0)), metrics))
        finally:
            self._future = None
            self._pending = None
            if self._worker is not None:
                self._worker.shutdown()
                self._worker = None
        return frames

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "proto_idx": None if self._proto_idx is None else torch.from_numpy(self._proto_idx.copy()),
            "prev_protos": None if self._prev_protos is None else torch.from_numpy(self._prev_protos.astype(np.float32)),
            "prev_speakers": {k: list(v) for k, v in self._prev_speakers.items()},
            "frames_started": self._frames_started,
            "next_frame_step": self._next_frame_step,
            "skipped": self._skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        idx, prev = state.get("proto_idx"), state.get("prev_protos")
        self._proto_idx = None if idx is None else np.asarray(idx, dtype=np.int64)
        self._prev_protos = None if prev is None else np.asarray(prev, dtype=np.float64)
        self._prev_speakers = {str(k): [float(a) for a in v] for k, v in state.get("prev_speakers", {}).items()}
        self._frames_started = int(state.get("frames_started", 0))
        self._next_frame_step = int(state.get("next_frame_step", 0))
        self._skipped = int(state.get("skipped", 0))

    # -- internals --------------------------------------------------------------------------
    def _collect(self, ctx: RunContext, proj: torch.Tensor, labels: torch.Tensor) -> None:
        """Copy the batch into the ring buffer of the latest max_points rows (device side, no sync)."""
        proj, labels = proj.detach(), labels.detach()
        D = ctx.prototypes.shape[-1]
        if proj.dim() != 2 or proj.shape[1] != D or labels.shape[:1] != proj.shape[:1]:
            raise ValueError(
                f"tsne: outputs.projections {tuple(proj.shape)} / labels {tuple(labels.shape)} must be "
                f"(B, {D}) / (B,): the head outputs in the prototypes' space and one speaker per row")
        M = self.max_points
        if self._buf is None or self._buf.shape[1] != D or self._buf.device != proj.device:
            self._buf = torch.zeros((M, D), dtype=torch.float32, device=proj.device)
            self._buf_labels = torch.zeros((M,), dtype=torch.int64, device=proj.device)
            self._ptr = self._filled = 0
        B = proj.shape[0]
        if B >= M:
            self._buf.copy_(proj[B - M:])
            self._buf_labels.copy_(labels[B - M:])
            self._ptr, self._filled = 0, M
            return
        first = min(B, M - self._ptr)
        self._buf[self._ptr:self._ptr + first].copy_(proj[:first])
        self._buf_labels[self._ptr:self._ptr + first].copy_(labels[:first])
        if B > first:  # wrap around
            self._buf[:B - first].copy_(proj[first:])
            self._buf_labels[:B - first].copy_(labels[first:])
        self._ptr = (self._ptr + B) % M
        self._filled = min(M, self._filled + B)

    def _ring_snapshot(self) -> tuple[np.ndarray, list[str]]:
        """The buffered projections and labels on the host (on_log only: this syncs)."""
        if self._buf is None or self._filled == 0:
            return np.zeros((0, 0), dtype=np.float32), []
        n = self._filled
        E = self._buf[:n].cpu().numpy().copy()
        labels = [str(x) for x in self._buf_labels[:n].cpu().tolist()]
        return E, labels

    def _job(self, ctx: RunContext, E: np.ndarray, labels: list[str], source: str) -> Optional[dict[str, Any]]:
        """Everything the worker needs for one frame, as host values (this syncs)."""
        P = ctx.prototypes.detach()
        if P.dim() != 2:
            raise ValueError(f"tsne: prototypes must be a (K, D) tensor, got shape {tuple(P.shape)}")
        K = P.shape[0]
        if self._proto_idx is None or (self._proto_idx.size and self._proto_idx.max() >= K):
            self._proto_idx = _subset(K, self.max_prototypes, self.seed)
            self._prev_protos = None
        idx = self._proto_idx
        protos = P.index_select(0, torch.from_numpy(idx).to(P.device)).float().cpu().numpy()
        if E.size == 0:
            E = np.zeros((0, P.shape[1]), dtype=np.float32)
        if len(idx) + len(E) < MIN_FRAME_POINTS:
            return None
        prev = self._prev_protos if self._prev_protos is not None and len(self._prev_protos) == len(idx) else None
        png_path = tsne_dir = None
        if ctx.exp_dir:
            tsne_dir = os.path.join(ctx.exp_dir, "tsne")
            png_path = os.path.join(tsne_dir, self._png_name(int(ctx.step)))
        job = {
            "step": int(ctx.step), "frame": self._frames_started, "source": source,
            "protos": protos, "proto_ids": idx.tolist(), "points": np.ascontiguousarray(E, dtype=np.float32),
            "labels": list(labels), "prev_protos": prev,
            "prev_speakers": dict(self._prev_speakers) if prev is not None else {},
            "max_iter": self.max_iter, "seed": self.seed, "png_path": png_path, "tsne_dir": tsne_dir,
            "colours": self._colour_ids(labels),
        }
        return job

    def _colour_ids(self, labels: Sequence[str]) -> dict[str, int]:
        """A colour index per speaker, first come first served, so that a speaker keeps its colour
        across frames and the first speakers get distinct colours."""
        if len(self._colours) > 10_000:  # many training speakers: start over rather than grow
            self._colours.clear()
        for lab in dict.fromkeys(labels):
            self._colours.setdefault(lab, len(self._colours))
        return {lab: self._colours[lab] for lab in dict.fromkeys(labels)}

    def _png_name(self, step: int) -> str:
        name, k = f"frame_{step:07d}.png", 1
        while name in self._png_names:  # two frames at one step (an eval and a training frame)
            name, k = f"frame_{step:07d}_{k}.png", k + 1
        self._png_names.add(name)
        return name

    def _busy(self) -> bool:
        return self._future is not None and not self._future.done()

    def _start(self, job: dict[str, Any]) -> Metrics:
        """Hand the job to the worker (background) or compute it now (inline)."""
        self._frames_started += 1
        if not self.background:
            return self._accept(compute_frame(job))
        if self._worker is None:
            self._worker = BackgroundWorker(nice=self.worker_nice)
        self._future = self._worker.submit(job)
        return None

    def _poll(self) -> Metrics:
        """Collect a finished frame without waiting (``Future.done()`` is a plain Python call)."""
        if self._future is None or not self._future.done():
            return None
        fut, self._future = self._future, None
        try:
            return self._accept(fut.result())  # re-raises what failed in the worker
        finally:
            if self._pending is not None:  # a queued on_embeddings frame starts from this layout
                job, self._pending = self._pending, None
                prev = self._prev_protos
                ok = prev is not None and len(prev) == len(job["proto_ids"])
                job["prev_protos"] = prev if ok else None
                job["prev_speakers"] = dict(self._prev_speakers) if ok else {}
                self._start(job)

    def _accept(self, res: dict[str, Any]) -> dict[str, Any]:
        """Keep a finished frame as the layout the next one starts from, record it, report it."""
        coords, kinds, labels, step = res["coords"], res["kinds"], res["labels"], res["step"]
        is_proto = np.array([k == "prototype" for k in kinds])
        self._prev_protos = coords[is_proto].astype(np.float64)
        speakers: dict[str, list[float]] = {}
        emb_labels = [lab for lab, k in zip(labels, kinds) if k != "prototype"]
        if emb_labels:
            emb = coords[~is_proto]
            lab_arr = np.array(emb_labels, dtype=object)
            for lab in dict.fromkeys(emb_labels):
                speakers[lab] = emb[lab_arr == lab].mean(axis=0).tolist()
        self._prev_speakers = speakers
        frame = {"step": step, "coords": coords, "labels": labels, "kinds": kinds, "source": res["source"]}
        self.frames.append(frame)
        if res.get("tsne_dir"):
            os.makedirs(res["tsne_dir"], exist_ok=True)
            with open(os.path.join(res["tsne_dir"], "frames.jsonl"), "a") as f:
                f.write(json.dumps({
                    "step": step, "source": res["source"],
                    "png": os.path.basename(res["png_path"]) if res.get("png_path") else None,
                    "coords": np.round(coords, 4).tolist(), "labels": labels, "kinds": kinds,
                }) + "\n")
        rows = [[float(x), float(y), k, lab, step] for (x, y), k, lab in zip(coords, kinds, labels)]
        return {
            "proto/tsne": Image(res["image"], caption=f"step {step}"),
            "proto/tsne_table": Table(columns=list(TABLE_COLUMNS), rows=rows),
            "proto/tsne_step": step,
            "proto/tsne_skipped": self._skipped,
            "perf/tsne_frame_s": res["seconds"],
        }


def _subset(K: int, m: int, seed: int) -> np.ndarray:
    """All rows if K <= m, else a fixed random subset of m rows (sorted)."""
    if K <= m:
        return np.arange(K, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(K, size=m, replace=False)).astype(np.int64)
