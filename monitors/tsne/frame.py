"""One t-SNE frame, computed in the background worker of :mod:`monitors.tsne.monitor`.

This file imports numpy and the standard library only (scikit-learn, SciPy and matplotlib lazily,
inside the frame), never torch or the ``monitors`` package: the worker runs it as a script
(``runpy.run_path``), so it starts in a fraction of a second with a small footprint.
"""
from __future__ import annotations

import os
import pickle
import struct
import sys
import time
import traceback
from typing import Any, Mapping, Optional, Sequence

import numpy as np

#: the first frame starts from PCA and needs sklearn's full schedule: 250 iterations of early
#: exaggeration, then at least 250 without (250 alone leave a squashed, line-like layout)
FIRST_FRAME_ITER = 500
#: later frames start from the previous layout: early exaggeration would first contract that
#: layout, so it is switched off
WARM_EXAGGERATION = 1.0
HEADER = struct.Struct("!Q")  # length prefix of one pickled message on the worker's pipes


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def align(Y: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Move the layout ``Y`` rigidly (shift, then rotation or reflection: orthogonal Procrustes)
    so that its rows ``src`` best match ``dst``. No scaling: a least-squares scale shrinks the
    picture whenever the two layouts differ, and t-SNE keeps its own scale from a warm start."""
    from scipy.linalg import orthogonal_procrustes

    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    R, _ = orthogonal_procrustes(src - mu_s, dst - mu_d)  # (2, 2)
    return (Y - mu_s) @ R + mu_d


def _initial_layout(P: np.ndarray, E: np.ndarray, labels: Sequence[str], prev: Optional[np.ndarray],
                    prev_speakers: Mapping[str, Sequence[float]], rng: np.random.Generator) -> Any:
    """Warm start: prototypes at their previous positions; each embedding at its speaker's
    previous centroid, else at the previous position of its nearest prototype, plus jitter."""
    if prev is None:
        return "pca"
    spread = float(prev.std()) or 1.0
    init = np.empty((len(P) + len(E), 2))
    init[: len(P)] = prev
    if len(E):
        nearest = np.argmax(E @ P.T, axis=1)  # cosine on unit vectors
        for i, lab in enumerate(labels):
            init[len(P) + i] = prev_speakers[lab] if lab in prev_speakers else prev[nearest[i]]
        init[len(P):] += 0.05 * spread * rng.standard_normal((len(E), 2))
    # t-SNE dislikes exactly coincident starting points: a tiny jitter everywhere
    init += 1e-4 * spread * rng.standard_normal(init.shape)
    return init


def _single_thread() -> Any:
    """Limit BLAS/OpenMP to one thread for the t-SNE: the worker takes one core beside training,
    and more threads would compete with the training threads for the others."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # sklearn depends on threadpoolctl; this is only a fallback
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def compute_frame(job: Mapping[str, Any]) -> dict[str, Any]:
    """t-SNE of prototypes + embeddings, aligned to the previous layout, rendered to RGBA."""
    # sklearn's TSNE: the reference implementation (Barnes-Hut, PCA init, array init for warm
    # starts), well maintained and already a dependency; a hand-written t-SNE would be slower
    # and a liability to keep correct.
    from sklearn.manifold import TSNE

    t0 = time.perf_counter()
    P = _l2n(np.asarray(job["protos"], dtype=np.float64))   # (m, D) unit vectors
    E = np.asarray(job["points"], dtype=np.float64)
    E = _l2n(E) if len(E) else np.zeros((0, P.shape[1]))   # (n, D)
    labels = list(job["labels"])
    m, n = len(P), len(E)
    X = np.vstack([P, E])                                    # (m + n, D)
    rng = np.random.default_rng(job["seed"] + 7919 * job["frame"])
    prev = job["prev_protos"]
    init = _initial_layout(P, E, labels, prev, job["prev_speakers"], rng)
    max_iter = int(job["max_iter"]) if prev is not None else max(int(job["max_iter"]), FIRST_FRAME_ITER)
    exaggeration = 12.0 if prev is None else WARM_EXAGGERATION
    tsne = TSNE(n_components=2, perplexity=min(30.0, (m + n - 1) / 3.0), init=init, max_iter=max_iter,
                early_exaggeration=exaggeration, learning_rate="auto", random_state=job["seed"])
    with _single_thread():
        Y = tsne.fit_transform(X)                            # (m + n, 2)
    if prev is not None:
        Y = align(Y, Y[:m], prev)
    kinds = ["prototype"] * m + ["embedding"] * n
    all_labels = [f"p{i}" for i in job["proto_ids"]] + labels
    image = _render(Y, m, labels, job["step"], job["source"], job.get("colours") or {})
    if job.get("png_path"):
        import matplotlib.image as mpimg

        os.makedirs(os.path.dirname(job["png_path"]), exist_ok=True)
        mpimg.imsave(job["png_path"], image)
    return {"step": job["step"], "source": job["source"], "coords": Y, "labels": all_labels,
            "kinds": kinds, "image": image, "seconds": time.perf_counter() - t0,
            "png_path": job.get("png_path"), "tsne_dir": job.get("tsne_dir")}


def _render(Y: np.ndarray, m: int, labels: Sequence[str], step: int, source: str,
            colours: Mapping[str, int]) -> np.ndarray:
    """Speakers as coloured dots (legend when few), prototypes as black x; (H, W, 4) uint8."""
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure registry is touched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.4), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    speakers = sorted(dict.fromkeys(labels), key=_label_key)
    if speakers:
        import matplotlib

        # tab10 while the run has seen at most 10 speakers, then tab20 (colours repeat after 20)
        cmap = matplotlib.colormaps["tab10" if max(colours.values(), default=0) < 10 else "tab20"]
        lab_arr = np.array(labels, dtype=object)
        E = Y[m:]
        for i, s in enumerate(speakers):
            sel = lab_arr == s
            ax.scatter(E[sel, 0], E[sel, 1], s=10, color=cmap(colours.get(s, i) % cmap.N), alpha=0.75,
                       linewidths=0, label=s if len(speakers) <= 12 else None)
    ax.scatter(Y[:m, 0], Y[:m, 1], marker="x", s=22, c="black", linewidths=0.9,
               label=f"prototypes ({m})", zorder=3)
    ax.set_title(f"prototypes vs speaker embeddings, step {step}"
                 + (" (eval)" if source == "embeddings" else ""), fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    if len(speakers) <= 12:
        ax.legend(loc="best", fontsize=7, markerscale=1.5, framealpha=0.7)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def _label_key(label: str) -> tuple:
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def _read_exact(stream: Any, n: int) -> Optional[bytes]:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_message(stream: Any) -> Any:
    head = _read_exact(stream, HEADER.size)
    if head is None:
        return None
    body = _read_exact(stream, HEADER.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def serve() -> None:
    """Main loop of the worker process: read a job, answer with ("ok", frame) or ("err", ...)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, not into the message pipe
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    stdin = sys.stdin.buffer
    while True:
        try:
            job = read_message(stdin)
        except Exception:
            job = None
        if job is None:
            return  # EOF: the parent closed the pipe or died
        try:
            reply: tuple = ("ok", compute_frame(job))
        except BaseException as exc:
            reply = ("err", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            out.write(HEADER.pack(len(data)) + data)
            out.flush()
        except BrokenPipeError:
            return


if __name__ == "__main__":
    serve()
