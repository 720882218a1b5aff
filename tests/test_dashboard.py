"""The HTML dashboard: built from a run's local records (written by the real LocalSink with
synthetic values), every image it embeds decodes, the curves are there, the t-SNE GIF animates
the frames in order, a sweep directory gets its table and heatmaps, and headless Chromium renders
the page without errors (when Chromium is installed)."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from monitors.dashboard import (build_tsne_gif, heatmap_grid, read_metrics, render_run, sweep_rows,
                                tsne_frames, watch, write_dashboard)
from monitors.core.finding import Finding
from monitors.core.media import Histogram, Image
from monitors.formats.sinks import LocalSink

sys.path.insert(0, str(ROOT / "scripts"))
import check_dashboard  # noqa: E402

CHROMIUM = check_dashboard.find_chromium()


def _frame_png(path: Path, shift: float) -> None:
    """A small t-SNE-like frame whose content moves with ``shift``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 3), dpi=60)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(30, 2))
    ax.scatter(pts[:, 0] + shift, pts[:, 1], c=np.arange(30) % 4, s=8)
    ax.scatter([shift], [0.0], marker="x", c="k")
    ax.set_xlim(-4, 6)
    ax.set_ylim(-4, 4)
    fig.savefig(path)


def make_run(exp_dir: Path, steps: int = 12, resume_overlap: bool = True) -> Path:
    """A run's records as the pipeline leaves them, through the real LocalSink."""
    sink = LocalSink(exp_dir / "records")
    rows = []
    for s in range(0, steps, 2):
        rows.append((s, {"train/loss": 5.0 - 0.3 * s, "proto/norm/mean": 1.0 + 0.01 * s,
                         "proto/grad/norm": 0.1 / (s + 1), "proto/delta/norm": 0.02,
                         "proto/delta/drift": 0.01 * s, "proto/usage/perplexity_student": 3.0 + s,
                         "proto/usage/dead": float(max(0, 6 - s)), "proto/similarity/max": 0.5,
                         "proto/norm/std": float("nan") if s == 4 else 0.1}))
    img = (np.linspace(0, 255, 40 * 60 * 3) % 255).astype(np.uint8).reshape(40, 60, 3)
    rows.append((steps - 2, {"proto/evolution/norm": Image(img), "proto/evolution/update": Image(img[::-1]),
                             "proto/norm/hist": Histogram(np.random.default_rng(0).normal(size=100), 16)}))
    sink.log_rows(rows)
    if resume_overlap:  # a resumed run logs step 10 again: the later value wins
        sink.log_rows([(steps - 2, {"train/loss": -1.0})])
    sink.alert(Finding("PROTO_COLLAPSE", "warning", 6, "only 2 prototypes are used: raise memax_weight"))
    sink.alert(Finding("PROTO_LR_ZERO", "info", 0, "frozen by freeze_last_layer"))
    sink.set_summary({"eval/eer": 0.31, "eval/eer_at_init": 0.42, "eval/min_dcf": 0.9,
                      "health/errors": 0, "health/warnings": 1, "health/codes": ["PROTO_COLLAPSE"]})
    tdir = exp_dir / "tsne"
    tdir.mkdir(parents=True, exist_ok=True)
    with open(tdir / "frames.jsonl", "w") as f:
        for k, step in enumerate((0, 4, 8)):
            name = f"frame_{step:07d}.png"
            _frame_png(tdir / name, shift=float(k))
            f.write(json.dumps({"step": step, "source": "train", "png": name, "coords": [], "labels": [],
                                "kinds": []}) + "\n")
    return exp_dir


def test_records_reader_last_line_wins_and_nonfinite(tmp_path):
    run = make_run(tmp_path / "run")
    m = read_metrics(run / "records")
    assert m["train/loss"][-1] == (10, -1.0)           # re-logged after a resume
    assert [s for s, _ in m["train/loss"]] == [0, 2, 4, 6, 8, 10]
    assert np.isnan(dict(m["proto/norm/std"])[4])       # LocalSink wrote "nan"


def test_run_dashboard_embeds_valid_images_and_curves(tmp_path):
    run = make_run(tmp_path / "run")
    out = write_dashboard(run)
    assert out == run / "dashboard.html"
    text = out.read_text()
    ok, report = check_dashboard.check_files(out)
    assert ok, report
    # every curve of the brief that exists is an inline SVG chart
    for k in ("train/loss", "proto/norm/mean", "proto/grad/norm", "proto/delta/norm", "proto/delta/drift",
              "proto/usage/perplexity_student", "proto/usage/dead", "proto/similarity/max"):
        assert f'aria-label="{k}"' in text, k
    assert "PROTO_COLLAPSE" in text and "raise memax_weight" in text
    assert "31.00%" in text and "42.00%" in text        # eval/eer and eer_at_init in the header
    assert "<script" not in text.lower() and "http://" not in text.replace("http://www.w3.org", "")
    assert 'http-equiv="refresh"' not in text
    # the evolution heatmaps and the t-SNE GIF are embedded
    uris = re.findall(r'src="data:(image/[a-z+]+);base64,', text)
    assert uris.count("image/png") >= 2 and "image/gif" in uris


def test_tsne_gif_animates_frames_in_order(tmp_path):
    from PIL import Image as PILImage

    run = make_run(tmp_path / "run")
    assert [s for s, _ in tsne_frames(run)] == [0, 4, 8]
    gif = build_tsne_gif(run)
    assert gif == run / "tsne" / "evolution.gif"
    with PILImage.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 3
        im.seek(0)
        first = np.asarray(im.convert("RGB")).astype(int)
        im.seek(2)
        last = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(first - last).sum() > 0                # the frames differ: it moves
    assert build_tsne_gif(tmp_path / "no_frames") is None


def test_watch_writes_refreshing_page_and_stops_when_finished(tmp_path):
    run = make_run(tmp_path / "run")
    log = io.StringIO()
    out = watch(run, interval=0.05, max_cycles=3, log=log)  # summary has eval/eer: finished
    assert "finished" in log.getvalue()
    assert 'http-equiv="refresh"' not in out.read_text()   # the final page stops reloading
    page = render_run(run, refresh=10)
    assert '<meta http-equiv="refresh" content="10">' in page
    # a run that has not started yet: wait for its records instead of failing
    log = io.StringIO()
    watch(tmp_path / "not_yet", interval=0.01, max_cycles=2, log=log)
    assert "waiting for records" in log.getvalue()


def test_cli_help_and_bad_path(tmp_path):
    r = subprocess.run([sys.executable, "-m", "monitors", "dashboard", "--help"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and "--watch" in r.stdout
    r = subprocess.run([sys.executable, "-m", "monitors", "dashboard", str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "records/" in r.stderr


def make_sweep(sweep_dir: Path) -> Path:
    """A finished 2x2 sweep directory, as ``python -m pipeline sweep`` leaves it, one trial failed."""
    trials = {}
    eers = {(8, 4): 0.30, (8, 16): 0.25, (32, 4): None, (32, 16): 0.20}
    for (k, d), eer in eers.items():
        name = f"num_proto={k},output_dim={d}"
        tdir = sweep_dir / "trials" / name
        make_run(tdir, resume_overlap=False)
        if eer is not None:
            LocalSink(tdir / "records").set_summary({"eval/eer": eer})
        trials[name] = {"name": name, "params": {"num_proto": k, "output_dim": d, "seed": 0},
                        "status": "finished" if eer is not None else "failed",
                        "exit_code": 0 if eer is not None else 1, "metric": eer,
                        "exp_dir": f"trials/{name}", "error": "" if eer else "ValueError: boom"}
    (sweep_dir / "sweep_state.json").write_text(json.dumps({
        "name": "np_x_od", "method": "grid", "metric": {"name": "eval/eer", "goal": "minimize"},
        "swept": ["num_proto", "output_dim"], "trials": trials}))
    return sweep_dir


def test_sweep_dashboard_table_heatmaps_and_trial_pages(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    rows = sweep_rows(sweep)
    assert [r["status"] for r in rows] == ["finished", "finished", "failed", "finished"]
    rv, cv, g = heatmap_grid(rows, "eval/eer")
    assert rv == [8, 32] and cv == [4, 16]
    assert g[0, 0] == 0.30 and g[0, 1] == 0.25 and np.isnan(g[1, 0]) and g[1, 1] == 0.20
    out = write_dashboard(sweep)
    ok, report = check_dashboard.check_files(out)
    assert ok, report
    text = out.read_text()
    assert text.count('alt="heatmap ') == 5              # metric, 3 health metrics, health/errors
    assert "ValueError: boom" in text
    for name in (r["trial"] for r in rows):
        assert (sweep / "trials" / name / "dashboard.html").is_file()
        assert f'href="trials/{name}/dashboard.html"' in text


def test_check_dashboard_catches_broken_image(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="data:image/png;base64,'
                   + base64.b64encode(b"not a png").decode() + '"><img src="missing.png"></body></html>')
    ok, report = check_dashboard.check_files(bad)
    assert not ok and "missing.png" in report and "PNG" in report


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_chromium_renders_run_dashboard(tmp_path):
    run = make_run(tmp_path / "run")
    out = write_dashboard(run)
    shot = tmp_path / "shot.png"
    ok, report = check_dashboard.check_chromium(out, screenshot=shot)
    assert ok, report
    assert shot.stat().st_size > 10_000
