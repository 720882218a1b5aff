"""t-SNE monitor: frames from embeddings and from the training ring buffer, alignment between
frames, resumable state, and a background worker that never makes the training loop wait."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monitors import MonitorHub
from monitors.core.events import RunContext, StepOutputs
from monitors.core.media import Image, Table
from monitors.dashboard import build_tsne_gif
from monitors.tsne.monitor import TSNEMonitor
from monitors.tsne.frame import align
from conftest import RecordingSink

K, D, N, S = 40, 16, 60, 4  # prototypes, dimension, embeddings, speakers


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(S, D, generator=g)
    protos = centres[torch.arange(K) % S] + 0.5 * torch.randn(K, D, generator=g)
    labels = torch.arange(N) % S
    emb = F.normalize(centres[labels] + 0.4 * torch.randn(N, D, generator=g), dim=1)
    return protos, emb, labels


def _proto_disp(frame_a: dict, frame_b: dict) -> float:
    """Mean displacement of the prototype points between two frames, relative to the spread."""
    pa = frame_a["coords"][np.array(frame_a["kinds"]) == "prototype"]
    pb = frame_b["coords"][np.array(frame_b["kinds"]) == "prototype"]
    spread = np.linalg.norm(pa - pa.mean(0), axis=1).mean()
    return float(np.linalg.norm(pb - pa, axis=1).mean() / spread)


def test_inline_frames_from_embeddings_are_complete_aligned_and_saved(tmp_path):
    protos, emb, labels = _data()
    mon = TSNEMonitor(background=False, max_prototypes=32)
    ctx = RunContext(prototypes=protos, embeddings=emb, labels=[f"spk{int(x)}" for x in labels],
                     step=7, exp_dir=str(tmp_path))
    out = mon.on_embeddings(ctx)
    m = 32  # K=40 > max_prototypes: a fixed subset of 32
    assert isinstance(out["proto/tsne"], Image) and out["proto/tsne"].caption == "step 7"
    img = out["proto/tsne"].array()
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.dtype == np.uint8
    table = out["proto/tsne_table"]
    assert isinstance(table, Table) and list(table.columns) == ["x", "y", "kind", "label", "step"]
    assert len(table.rows) == m + N
    assert sum(r[2] == "prototype" for r in table.rows) == m
    assert {r[3] for r in table.rows if r[2] == "embedding"} == {f"spk{i}" for i in range(S)}
    assert all(r[4] == 7 for r in table.rows) and out["proto/tsne_step"] == 7
    frame = mon.frames[0]
    assert frame["coords"].shape == (m + N, 2) and np.isfinite(frame["coords"]).all()

    # inputs barely change: the second frame starts from the first and is aligned to it
    ctx.prototypes = protos + 1e-3 * torch.randn(K, D, generator=torch.Generator().manual_seed(1))
    ctx.step = 9
    mon.on_embeddings(ctx)
    assert len(mon.frames) == 2
    assert _proto_disp(mon.frames[0], mon.frames[1]) < 0.1
    # the same prototype subset in both frames, listed in the same order
    assert mon.frames[0]["labels"][:m] == mon.frames[1]["labels"][:m]

    # files for the dashboard: one PNG per frame and one JSON line per frame, then a GIF
    lines = [json.loads(x) for x in (tmp_path / "tsne" / "frames.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [7, 9]
    assert [x["png"] for x in lines] == ["frame_0000007.png", "frame_0000009.png"]
    assert all((tmp_path / "tsne" / x["png"]).exists() for x in lines)
    assert len(lines[1]["coords"]) == m + N
    gif = build_tsne_gif(tmp_path)
    from PIL import Image as PILImage

    assert PILImage.open(gif).n_frames == 2


def test_align_undoes_a_rotation_and_a_shift():
    rng = np.random.default_rng(0)
    prev = rng.normal(size=(30, 2))
    theta = 1.1
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = prev @ R.T + np.array([5.0, -3.0])
    extra = rng.normal(size=(5, 2))
    Y = np.vstack([moved, extra @ R.T + np.array([5.0, -3.0])])
    out = align(Y, Y[:30], prev)
    np.testing.assert_allclose(out[:30], prev, atol=1e-9)
    np.testing.assert_allclose(out[30:], extra, atol=1e-9)  # the other points move with them


def test_ring_buffer_keeps_the_latest_rows_and_frames_follow_the_cadence():
    protos, _, _ = _data()
    mon = TSNEMonitor(frame_every=10, max_points=12, background=False)
    ctx = RunContext(prototypes=protos)
    rows = torch.arange(25 * D, dtype=torch.float32).reshape(25, D)
    batches = [(rows[0:5], 0), (rows[5:10], 1), (rows[10:15], 2), (rows[15:20], 3), (rows[20:25], 4)]
    for x, lab in batches:
        ctx.outputs = StepOutputs(projections=x, labels=torch.full((5,), lab))
        assert mon.on_step_end(ctx) is None  # nothing pending, nothing returned
    # the latest 12 of 25 rows survive: rows 13..24 (in ring order)
    kept = sorted(mon._buf[: mon._filled, 0].tolist())
    assert kept == sorted(rows[13:25, 0].tolist())
    E, labels = mon._ring_snapshot()
    assert E.shape == (12, D) and sorted(labels) == sorted(["2"] * 2 + ["3"] * 5 + ["4"] * 5)

    # frames: at the first on_log (step 3 >= 0), not at 9, again once the step passes 10
    seen = []
    for step in (3, 9, 12, 19, 25):
        ctx.step = step
        out = mon.on_log(ctx)
        seen.append(out is not None and "proto/tsne" in out)
    assert seen == [True, False, True, False, True]
    assert len(mon.frames[0]["coords"]) == K + 12
    assert mon.frames[0]["kinds"].count("embedding") == 12
    # a batch larger than the buffer keeps its own last rows
    ctx.outputs = StepOutputs(projections=rows, labels=torch.zeros(25, dtype=torch.long))
    mon.on_step_end(ctx)
    assert sorted(mon._buf[:, 0].tolist()) == sorted(rows[13:, 0].tolist())


def test_state_round_trip_keeps_aligning_to_the_previous_layout():
    protos, emb, labels = _data()
    mon = TSNEMonitor(background=False, max_prototypes=32, frame_every=50)
    ctx = RunContext(prototypes=protos, embeddings=emb, labels=labels.tolist(), step=60)
    mon.on_embeddings(ctx)
    mon.on_log(ctx)  # a training frame too: next frame step becomes 100
    buf = io.BytesIO()
    torch.save(mon.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain tensors and Python values only

    resumed = TSNEMonitor(background=False, max_prototypes=32, frame_every=50)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["next_frame_step"] == 100
    assert resumed.state_dict()["frames_started"] == 2
    np.testing.assert_array_equal(resumed._proto_idx, mon._proto_idx)
    np.testing.assert_allclose(resumed._prev_protos, mon._prev_protos, atol=1e-5)
    ctx.step = 70
    assert resumed.on_log(ctx) is None  # not before step 100
    resumed.on_embeddings(ctx)
    # the resumed run's first frame starts from, and is aligned to, the saved layout
    assert _proto_disp(mon.frames[-1], resumed.frames[0]) < 0.1


def test_embeddings_from_another_space_are_refused():
    protos, _, _ = _data()
    mon = TSNEMonitor(background=False)
    ctx = RunContext(prototypes=protos, embeddings=torch.randn(10, D + 1), labels=list(range(10)))
    with pytest.raises(ValueError, match="prototypes' space"):
        mon.on_embeddings(ctx)
    with pytest.raises(ValueError, match="max_iter"):
        TSNEMonitor(max_iter=100)


def test_background_frames_never_block_training_and_arrive_at_close(tmp_path):
    protos, emb, labels = _data()
    mon = TSNEMonitor(frame_every=5, max_points=30)
    sink = RecordingSink()
    hub = MonitorHub([mon], sinks=[sink], log_every=5, console=None)
    ctx = RunContext(prototypes=protos, embeddings=emb, labels=labels.tolist(), exp_dir=str(tmp_path))
    t0 = time.perf_counter()
    hub.emit("on_embeddings", ctx)
    assert time.perf_counter() - t0 < 0.5  # generous: it only pickles and hands the job over
    assert mon._future is not None and not mon._future.done()  # the worker is still starting
    worst = 0.0
    for step in range(10):
        ctx.step = step
        ctx.outputs = StepOutputs(projections=emb[step * 6:(step + 1) * 6], labels=labels[step * 6:(step + 1) * 6])
        t0 = time.perf_counter()
        hub.emit("on_step_end", ctx)
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.5
    # the training frames due at steps 4 and 9 found the worker busy (it is still starting up)
    assert mon._skipped >= 1
    if Path("/proc/self/stat").exists():  # Linux: the worker lowers itself to the lowest priority
        nice, deadline = None, time.monotonic() + 10
        while nice != 19 and time.monotonic() < deadline:
            time.sleep(0.02)
            if mon._worker.pid is not None:
                nice = int(Path(f"/proc/{mon._worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == 19
    # a second evaluation while the first frame is (most likely) still computing: it is queued
    hub.emit("on_embeddings", ctx)
    hub.close()
    assert "tsne" not in hub.disabled
    logged = {k: v for _, row in sink.rows for k, v in row.items()}
    assert isinstance(logged["proto/tsne"], Image) and logged["proto/tsne"].caption == "step 9"
    assert len(logged["proto/tsne_table"].rows) == K + 30  # max_points=30 of the 60 embeddings
    assert logged["proto/tsne_step"] == 9 and logged["proto/tsne_skipped"] >= 1 and sink.closed
    assert [f["step"] for f in mon.frames] == [0, 9] and mon._worker is None
    # both frames reach the sink, each at the step it was taken at, though both finished at close
    images = [(step, row["proto/tsne"].caption) for step, row in sink.rows if "proto/tsne" in row]
    assert [caption for _, caption in images] == ["step 0", "step 9"], images
    assert images[-1][0] == 9
    assert (tmp_path / "tsne" / "frame_0000000.png").exists() and (tmp_path / "tsne" / "frame_0000009.png").exists()
    assert _proto_disp(mon.frames[0], mon.frames[1]) < 0.2  # the queued frame started from the first


def test_worker_errors_come_back_as_exceptions_without_hanging():
    from monitors.tsne.worker import BackgroundWorker as _BackgroundWorker

    worker = _BackgroundWorker()
    try:
        fut = worker.submit({"not": "a frame"})
        with pytest.raises(RuntimeError, match="KeyError"):
            fut.result(timeout=60)
        with pytest.raises(Exception):  # unpicklable job: fails in submit, nothing in flight
            worker.submit({"f": lambda: 0})
    finally:
        worker.shutdown()


def test_every_n_steps_is_the_hub_cadence_and_the_old_meaning_is_refused():
    mon = TSNEMonitor(every_n_steps=2, frame_every=50, background=False)
    assert mon.every_n_steps == 2 and mon.frame_every == 50
    assert TSNEMonitor(background=False).every_n_steps == 1  # copies every step by default
    with pytest.raises(ValueError, match="frame_every=50 for frames every 50 steps"):
        TSNEMonitor(every_n_steps=50)  # the frame cadence before: loud, not silently different
