"""Self-contained HTML dashboards of a run or a sweep, built from local records only.

    python -m monitors dashboard runs/sdpn_tiny            # -> runs/sdpn_tiny/dashboard.html
    python -m monitors dashboard runs/sweep_np_od --watch  # rewrite every 10 s while it runs

The dashboard reads the files a run leaves in its ``exp_dir`` (written by
:class:`monitors.sinks.LocalSink` and the t-SNE monitor) and, for a sweep, the state file of
``python -m pipeline sweep``. It never imports ``pipeline/`` and needs neither W&B nor a network:
images are embedded as base64 ``data:`` URIs, curves are inline SVG drawn here, and the page has
no script at all, so it opens from a file, a mail attachment or a CI artefact.

Inputs of a run (``exp_dir``):
    records/metrics.jsonl   one line per logged step ``{"trainer/step": s, metric: value}``; a step
                            may appear twice after a resume: the last line wins
    records/media.jsonl     ``{"trainer/step", "key", "type", "path"}`` (path relative to records/)
    records/findings.jsonl  Finding dicts; records/summary.json the run summary
    tsne/frames.jsonl, tsne/frame_<step>.png   the aligned t-SNE frames (animated by
                            :func:`build_tsne_gif` into ``tsne/evolution.gif``)
Inputs of a sweep (``--out`` of the sweep): ``sweep_state.json`` (else ``trials/*/status.json``),
and each trial's ``exp_dir`` under ``trials/``.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

STEP_KEY = "trainer/step"
STATE_FILE = "sweep_state.json"
DEFAULT_NAME = "dashboard.html"

#: the curves shown first on a run's page (those that exist)
MAIN_CURVES: tuple[str, ...] = (
    "train/loss", "proto/norm/mean", "proto/grad/norm", "proto/delta/norm", "proto/delta/drift",
    "proto/usage/perplexity_student", "proto/usage/dead", "proto/similarity/max",
)
#: final values of a trial's metrics.jsonl shown in a sweep's table and heatmaps
HEALTH_METRICS: tuple[str, ...] = ("proto/usage/perplexity_student", "proto/usage/dead", "proto/delta/drift")
#: values of a trial's summary.json shown in a sweep's table
SUMMARY_KEYS: tuple[str, ...] = ("eval/eer", "eval/eer_at_init", "eval/min_dcf", "health/errors",
                                 "health/warnings", "health/codes")
EVOLUTION_KEYS: tuple[str, ...] = ("proto/evolution/norm", "proto/evolution/update")


# ----------------------------------------------------------------------------------------------
# reading records (tolerant: a live run may be half-way through writing a line)
# ----------------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a missing file or an unfinished line is skipped."""
    out: list[dict[str, Any]] = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
    except OSError:
        pass
    return out


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _to_float(v: Any) -> Optional[float]:
    """Numbers as floats; LocalSink writes non-finite values as the strings 'nan'/'inf'."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def read_metrics(records: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``metric -> [(step, value), ...]`` sorted by step from ``records/metrics.jsonl``.

    A step written twice (a resumed run re-logs the steps after its last checkpoint) keeps the
    value of the later line."""
    by_metric: dict[str, dict[int, float]] = {}
    for row in read_jsonl(Path(records) / "metrics.jsonl"):
        step = row.get(STEP_KEY)
        if not isinstance(step, (int, float)):
            continue
        for k, v in row.items():
            if k == STEP_KEY:
                continue
            x = _to_float(v)
            if x is not None:
                by_metric.setdefault(k, {})[int(step)] = x
    return {k: sorted(d.items()) for k, d in by_metric.items()}


def final_values(metrics: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, float]:
    """The value at the last step of every metric."""
    return {k: series[-1][1] for k, series in metrics.items() if series}


def latest_media(records: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``key -> entry`` of the latest (highest step, then last written) media of each key whose
    file exists; ``entry["file"]`` is the absolute path."""
    records = Path(records)
    best: dict[str, dict[str, Any]] = {}
    for e in read_jsonl(records / "media.jsonl"):
        key, rel = e.get("key"), e.get("path")
        if not isinstance(key, str) or not isinstance(rel, str):
            continue
        f = records / rel
        if not f.is_file():
            continue
        step = int(e.get(STEP_KEY, 0) or 0)
        if key not in best or step >= best[key][STEP_KEY]:
            best[key] = {**e, STEP_KEY: step, "file": str(f)}
    return best


def tsne_frames(exp_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The t-SNE frame PNGs of a run as ``[(step, path)]`` in the order they were taken."""
    tdir = Path(exp_dir) / "tsne"
    frames: list[tuple[int, Path]] = []
    seen: set[str] = set()
    for e in read_jsonl(tdir / "frames.jsonl"):
        name = e.get("png")
        if isinstance(name, str) and (tdir / name).is_file() and name not in seen:
            seen.add(name)
            frames.append((int(e.get("step", 0) or 0), tdir / name))
    for p in sorted(tdir.glob("frame_*.png")):  # frames whose index line is missing
        if p.name not in seen:
            m = re.match(r"frame_(\d+)", p.name)
            frames.append((int(m.group(1)) if m else 0, p))
    frames.sort(key=lambda t: (t[0], t[1].name))
    return frames


def build_tsne_gif(exp_dir: str | os.PathLike, duration_ms: int = 600,
                   out: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """Animate the aligned t-SNE frames of a run into ``exp_dir/tsne/evolution.gif`` (or ``out``).

    Frames keep their order (by step); one of another size is resized to the first one's; the
    last frame is held three times as long. Returns the GIF's path, or None without frames."""
    from PIL import Image as PILImage

    frames = tsne_frames(exp_dir)
    if not frames:
        return None
    images = []
    for _, p in frames:
        try:
            with PILImage.open(p) as im:
                images.append(im.convert("RGB"))
        except OSError:  # a frame being written right now
            continue
    if not images:
        return None
    size = images[0].size
    images = [im if im.size == size else im.resize(size) for im in images]
    # one palette for all frames keeps colours steady across the animation
    pal = images[-1].quantize(colors=255, method=PILImage.Quantize.MEDIANCUT)
    frames_p = [im.quantize(palette=pal, dither=PILImage.Dither.NONE) for im in images]
    durations = [duration_ms] * len(frames_p)
    durations[-1] = duration_ms * 3
    out_path = Path(out) if out is not None else Path(exp_dir) / "tsne" / "evolution.gif"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    frames_p[0].save(tmp, format="GIF", save_all=True, append_images=frames_p[1:], duration=durations,
                     loop=0, optimize=False, disposal=1)
    os.replace(tmp, out_path)
    return out_path


# ----------------------------------------------------------------------------------------------
# sweeps: the rows of the summary table and the heatmap grids
# ----------------------------------------------------------------------------------------------
def is_sweep_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / STATE_FILE).is_file() or ((p / "trials").is_dir() and not (p / "records").is_dir())


def read_sweep_state(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """The sweep's state file, or one rebuilt from ``trials/*/status.json`` (e.g. W&B agents)."""
    sweep_dir = Path(sweep_dir)
    state = read_json(sweep_dir / STATE_FILE)
    if state.get("trials"):
        return state
    trials: dict[str, Any] = {}
    for st in sorted((sweep_dir / "trials").glob("*/status.json"), key=lambda q: q.stat().st_mtime):
        s = read_json(st)
        if s:
            trials[s.get("name", st.parent.name)] = {**s, "exp_dir": s.get("exp_dir", f"trials/{st.parent.name}")}
    if not state.get("swept"):  # the parameters that differ between trials
        values: dict[str, set[str]] = {}
        for t in trials.values():
            for k, v in (t.get("params") or {}).items():
                values.setdefault(k, set()).add(json.dumps(v, sort_keys=True, default=str))
        state = {**state, "swept": sorted(k for k, vs in values.items() if len(vs) > 1)}
    return {**state, "trials": trials}


def _trial_dir(sweep_dir: Path, trial: Mapping[str, Any], name: str) -> Path:
    d = Path(trial.get("exp_dir") or f"trials/{name}")
    return d if d.is_absolute() else sweep_dir / d


def sweep_rows(sweep_dir: str | os.PathLike, metric: Optional[str] = None) -> list[dict[str, Any]]:
    """One plain dict per trial, in the order the sweep proposed them: ``trial``, ``status``,
    the swept parameters, the sweep metric (from the trial's ``records/summary.json``), the
    summary values of :data:`SUMMARY_KEYS`, the final values of :data:`HEALTH_METRICS` (last
    value in ``records/metrics.jsonl``), ``seconds`` and ``error``. A trial that did not finish
    has None as its metric and eval values; its health values are whatever it recorded."""
    sweep_dir = Path(sweep_dir)
    state = read_sweep_state(sweep_dir)
    metric = metric or (state.get("metric") or {}).get("name") or "eval/eer"
    swept: list[str] = list(state.get("swept") or [])
    rows: list[dict[str, Any]] = []
    for name, t in (state.get("trials") or {}).items():
        params = dict(t.get("params") or {})
        if not swept:
            swept = [k for k in params]
        tdir = _trial_dir(sweep_dir, t, name)
        summary = read_json(tdir / "records" / "summary.json")
        finals = final_values(read_metrics(tdir / "records"))
        status = t.get("status", "unknown")
        done = status == "finished"
        row: dict[str, Any] = {"trial": name, "status": status}
        for k in swept:
            row[k] = params.get(k)
        value = _to_float(summary.get(metric)) if done else None
        if done and value is None:
            value = finals.get(metric)
        row[metric] = value
        for k in SUMMARY_KEYS:
            if k == metric:
                continue
            v = summary.get(k)
            if k == "health/codes":
                row[k] = " ".join(v) if isinstance(v, list) else (v or "")
            elif k.startswith("eval/"):
                row[k] = _to_float(v) if done else None
            else:
                row[k] = _to_float(v)
        for k in HEALTH_METRICS:
            if k != metric:
                row[k] = finals.get(k)
        row["seconds"] = t.get("seconds")
        row["error"] = t.get("error") or ""
        rows.append(row)
    return rows


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
        x = _to_float(r.get(metric))
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
                ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=10,
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
        _atomic_write_bytes(Path(path), png)
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


# ----------------------------------------------------------------------------------------------
# inline SVG charts
# ----------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def svg_chart(series: Sequence[tuple[int, float]], title: str, width: int = 340, height: int = 170,
              color: str = "#1f77b4") -> str:
    """A line chart of ``[(step, value)]`` as inline SVG: non-finite values break the line (and
    are counted in the title); a single point is drawn as a dot."""
    e = html.escape
    pad_l, pad_r, pad_t, pad_b = 52, 10, 22, 26
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    pts = [(s, v) for s, v in series]
    finite = [(s, v) for s, v in pts if math.isfinite(v)]
    nonfinite = len(pts) - len(finite)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>']
    label = title + (f" ({nonfinite} non-finite)" if nonfinite else "")
    room = int((width - pad_l - 6) / 6.6)  # characters that fit at 12 px
    if len(label) > room:
        label = "\u2026" + label[-(room - 1):]
    parts.append(f'<text x="{pad_l}" y="14" class="ct">{e(label)}</text>')
    if not finite:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="na">no finite values</text></svg>')
        return "".join(parts)
    s0, s1 = min(s for s, _ in finite), max(s for s, _ in finite)
    lo, hi = min(v for _, v in finite), max(v for _, v in finite)
    if hi == lo:
        lo, hi = lo - (abs(lo) * 0.05 or 0.5), hi + (abs(hi) * 0.05 or 0.5)
    else:
        m = (hi - lo) * 0.05
        lo, hi = lo - m, hi + m
    span_s = (s1 - s0) or 1

    def X(s: float) -> float:
        return pad_l + (s - s0) / span_s * w if s1 > s0 else pad_l + w / 2

    def Y(v: float) -> float:
        return pad_t + (hi - v) / (hi - lo) * h

    for k in range(4):  # horizontal grid lines with their values
        v = lo + (hi - lo) * k / 3
        y = Y(v)
        parts.append(f'<line x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}" class="gl"/>')
        parts.append(f'<text x="{pad_l - 4}" y="{y + 3:.1f}" text-anchor="end" class="tk">{e(_fmt(v))}</text>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" class="ax"/>')
    parts.append(f'<text x="{pad_l}" y="{height - 8}" class="tk">{s0}</text>')
    parts.append(f'<text x="{pad_l + w}" y="{height - 8}" text-anchor="end" class="tk">step {s1}</text>')
    # thin long series so a page stays small (keep first and last)
    stride = max(1, len(pts) // 1500)
    kept = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
    segments: list[list[tuple[int, float]]] = [[]]
    for s, v in kept:
        if math.isfinite(v):
            segments[-1].append((s, v))
        elif segments[-1]:
            segments.append([])
    for seg in segments:
        if len(seg) == 1:
            parts.append(f'<circle cx="{X(seg[0][0]):.1f}" cy="{Y(seg[0][1]):.1f}" r="2.5" fill="{color}"/>')
        elif seg:
            pl = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in seg)
            parts.append(f'<polyline points="{pl}" fill="none" stroke="{color}" stroke-width="1.6"/>')
    last_s, last_v = finite[-1]
    parts.append(f'<text x="{pad_l + w / 2:.1f}" y="{height - 8}" text-anchor="middle" class="lv">'
                 f'last {e(_fmt(last_v))} @ {last_s}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(counts: Sequence[float], edges: Sequence[float], title: str, width: int = 340,
                  height: int = 150) -> str:
    """Bars of a histogram written by LocalSink (``{"counts", "edges"}``)."""
    e = html.escape
    pad_l, pad_r, pad_t, pad_b = 10, 10, 22, 24
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="{pad_l}" y="14" class="ct">{e(title)}</text>']
    if not counts or len(edges) != len(counts) + 1:
        parts.append("</svg>")
        return "".join(parts)
    top = max(counts) or 1
    bw = w / len(counts)
    for i, c in enumerate(counts):
        bh = h * c / top
        parts.append(f'<rect x="{pad_l + i * bw:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 0.5, 0.5):.1f}" '
                     f'height="{bh:.1f}" fill="#6a9fd4"/>')
    parts.append(f'<text x="{pad_l}" y="{height - 8}" class="tk">{e(_fmt(float(edges[0])))}</text>')
    parts.append(f'<text x="{pad_l + w}" y="{height - 8}" text-anchor="end" class="tk">{e(_fmt(float(edges[-1])))}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:18px 24px;color:#222;background:#f6f7f9}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:14px;margin:14px 0 6px} .sub{color:#666;font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 12px;min-width:90px}
.card .k{font-size:11px;color:#666} .card .v{font-size:17px;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:10px} .chart{border:1px solid #ddd;border-radius:4px;background:#fff}
.ct{font-size:12px;font-weight:600;fill:#333} .tk{font-size:10px;fill:#666} .lv{font-size:11px;fill:#1f77b4}
.na{font-size:11px;fill:#999} .gl{stroke:#eee;stroke-width:1} .ax{stroke:#999;stroke-width:1}
table{border-collapse:collapse;background:#fff;font-size:12px} th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef0f3;max-width:150px} .tw{overflow-x:auto;max-width:100%} td.num{text-align:right;font-variant-numeric:tabular-nums}
.sev-error{color:#b00020;font-weight:600} .sev-warning{color:#b36b00;font-weight:600} .sev-info{color:#2a6ebb}
.st-finished{color:#1a7f37} .st-failed{color:#b00020;font-weight:600} .st-running{color:#2a6ebb} .st-pending{color:#888}
.ok{color:#1a7f37;font-weight:600} img.fig{max-width:100%;border:1px solid #ddd;border-radius:4px;background:#fff}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} figure{margin:0} figcaption{font-size:11px;color:#666}
details{margin:8px 0} summary{cursor:pointer;font-weight:600;font-size:13px}
pre{white-space:pre-wrap;font-size:11px;background:#fff;border:1px solid #ddd;padding:6px;max-height:160px;overflow:auto}
"""


def _data_uri(path: str | os.PathLike) -> Optional[str]:
    p = Path(path)
    mime = {".png": "image/png", ".gif": "image/gif", ".svg": "image/svg+xml", ".jpg": "image/jpeg",
            ".jpeg": "image/jpeg"}.get(p.suffix.lower())
    try:
        data = p.read_bytes()
    except OSError:
        return None
    if mime is None or not data:
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(uri: Optional[str], alt: str, caption: str = "", width: Optional[int] = None) -> str:
    if not uri:
        return ""
    wa = f' width="{width}"' if width else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img class="fig" src="{uri}" alt="{html.escape(alt)}"{wa}>{cap}</figure>'


def _page(title: str, body: str, refresh: Optional[float]) -> str:
    meta = f'<meta http-equiv="refresh" content="{max(1, int(round(refresh)))}">' if refresh else ""
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{meta}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
            f'<p class="sub">written by <code>python -m monitors dashboard</code> at {now}'
            f'{" (watching: this page reloads itself)" if refresh else ""}</p>\n</body></html>\n')


def _cards(items: Iterable[tuple[str, Any, str]]) -> str:
    out = ['<div class="cards">']
    for k, v, cls in items:
        out.append(f'<div class="card"><div class="k">{html.escape(k)}</div>'
                   f'<div class="v {cls}">{html.escape(_fmt(v)) if v not in (None, "") else "&ndash;"}</div></div>')
    out.append("</div>")
    return "".join(out)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], classes: Optional[Sequence[Sequence[str]]] = None) -> str:
    heads = (html.escape(c).replace("/", "/<wbr>") for c in columns)  # long metric names may wrap
    out = ['<div class="tw"><table><thead><tr>', *(f"<th>{c}</th>" for c in heads), "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        out.append("<tr>")
        for j, v in enumerate(r):
            cls = (classes[i][j] if classes else "") or ("num" if isinstance(v, (int, float)) and not isinstance(v, bool) else "")
            out.append(f'<td class="{cls}">{v if isinstance(v, _Raw) else html.escape(_fmt(v))}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


class _Raw(str):
    """HTML that a table cell holds as is."""


def _run_header(exp_dir: Path, summary: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    last_step = max((s[-1][0] for s in metrics.values() if s), default=None)
    eer, init = _to_float(summary.get("eval/eer")), _to_float(summary.get("eval/eer_at_init"))
    errors, warnings = summary.get("health/errors"), summary.get("health/warnings")
    codes = summary.get("health/codes") or []
    healthy = errors == 0 and warnings == 0
    cards = [
        ("last step", last_step, ""),
        ("eval/eer", None if eer is None else f"{100 * eer:.2f}%", ""),
        ("eval/eer_at_init", None if init is None else f"{100 * init:.2f}%", ""),
        ("eer / eer_at_init", None if not (eer is not None and init) else f"{eer / init:.2f}", ""),
        ("eval/min_dcf", _to_float(summary.get("eval/min_dcf")), ""),
        ("health/errors", errors, "sev-error" if errors else ("ok" if healthy else "")),
        ("health/warnings", warnings, "sev-warning" if warnings else ("ok" if healthy else "")),
        ("health/codes", " ".join(codes) if isinstance(codes, list) else codes, ""),
    ]
    return _cards(cards)


def _findings_html(findings: Sequence[Mapping[str, Any]]) -> str:
    if not findings:
        return '<p class="ok">No findings: no monitor reported a problem.</p>'
    order = {"error": 0, "warning": 1, "info": 2}
    fs = sorted(findings, key=lambda f: (order.get(str(f.get("severity")), 3), int(f.get("step", 0) or 0)))
    rows = [[f.get("severity", ""), f.get("code", ""), f.get("step", ""), f.get("message", "")] for f in fs]
    classes = [[f"sev-{f.get('severity', '')}", "", "num", ""] for f in fs]
    return _table(["severity", "code", "step", "message"], rows, classes)


def render_run(exp_dir: str | os.PathLike, refresh: Optional[float] = None, write_gif: bool = True,
               title: Optional[str] = None) -> str:
    """The HTML page of one run (its ``exp_dir``)."""
    exp_dir = Path(exp_dir)
    records = exp_dir / "records"
    metrics = read_metrics(records)
    summary = read_json(records / "summary.json")
    findings = read_jsonl(records / "findings.jsonl")
    media = latest_media(records)
    name = title or exp_dir.resolve().name
    body = [f"<h1>protowatch run: {html.escape(name)}</h1>",
            f'<div class="sub">{html.escape(str(exp_dir))}</div>',
            _run_header(exp_dir, summary, metrics)]
    if not records.is_dir():
        body.append(f"<p>No records yet: {html.escape(str(records))} does not exist (the run has not logged).</p>")

    body.append(f"<h2>Findings ({len(findings)})</h2>")
    body.append(_findings_html(findings))

    body.append("<h2>Prototype curves</h2>")
    main = [k for k in MAIN_CURVES if k in metrics]
    if main:
        body.append('<div class="grid">' + "".join(svg_chart(metrics[k], k) for k in main) + "</div>")
    else:
        body.append("<p class=\"sub\">none of the main curves has been logged yet.</p>")
    if "eval/eer" in metrics and len(metrics["eval/eer"]) > 1:
        body.append('<div class="grid">' + svg_chart(metrics["eval/eer"], "eval/eer") + "</div>")

    evo = [(k, media[k]) for k in EVOLUTION_KEYS if k in media]
    body.append("<h2>Prototype evolution</h2>")
    if evo:
        body.append('<div class="figs">' + "".join(
            _img(_data_uri(m["file"]), k, f"{k} (latest, step {m[STEP_KEY]})", width=600) for k, m in evo) + "</div>")
    else:
        body.append('<p class="sub">no evolution heatmaps yet (monitor "evolution").</p>')

    body.append("<h2>t-SNE of prototypes and speaker embeddings</h2>")
    frames = tsne_frames(exp_dir)
    gif = None
    if frames:
        gif_path = exp_dir / "tsne" / "evolution.gif"
        if write_gif:
            try:
                gif = build_tsne_gif(exp_dir)
            except (OSError, ValueError) as exc:
                body.append(f'<p class="sub">could not build the GIF: {html.escape(str(exc))}</p>')
        elif gif_path.is_file():
            gif = gif_path
    if gif is not None:
        body.append(_img(_data_uri(gif), "t-SNE animation",
                         f"{len(frames)} aligned frames, steps {frames[0][0]}..{frames[-1][0]} (prototypes: black x)",
                         width=560))
    elif "proto/tsne" in media:
        m = media["proto/tsne"]
        body.append(_img(_data_uri(m["file"]), "t-SNE", f"proto/tsne (latest, step {m[STEP_KEY]})", width=560))
    else:
        body.append('<p class="sub">no t-SNE frames yet (monitor "tsne").</p>')

    other_imgs = [(k, m) for k, m in sorted(media.items())
                  if m.get("type") == "image" and k not in EVOLUTION_KEYS and k != "proto/tsne"]
    hists = [(k, m) for k, m in sorted(media.items()) if m.get("type") == "histogram"]
    if other_imgs or hists:
        body.append("<h2>Latest media</h2>")
        if other_imgs:
            body.append('<div class="figs">' + "".join(
                _img(_data_uri(m["file"]), k, f"{k} (step {m[STEP_KEY]})") for k, m in other_imgs) + "</div>")
        if hists:
            svgs = []
            for k, m in hists:
                d = read_json(m["file"])
                svgs.append(svg_histogram(d.get("counts") or [], d.get("edges") or [], f"{k} (step {m[STEP_KEY]})"))
            body.append('<div class="grid">' + "".join(svgs) + "</div>")

    rest = [k for k in sorted(metrics) if k not in main and k != "eval/eer"]
    if rest:
        body.append(f"<details><summary>All other metrics ({len(rest)})</summary>"
                    '<div class="grid">' + "".join(svg_chart(metrics[k], k, 300, 150) for k in rest) + "</div></details>")
    if summary:
        rows = [[k, _Raw(html.escape(json.dumps(v, default=str)))] for k, v in sorted(summary.items())]
        body.append(f"<details><summary>Run summary ({len(summary)} values)</summary>{_table(['key', 'value'], rows)}</details>")
    return _page(f"protowatch: {name}", "\n".join(body), refresh)


def render_sweep(sweep_dir: str | os.PathLike, refresh: Optional[float] = None,
                 trial_pages: bool = True) -> str:
    """The HTML page of a sweep: its table, heatmaps, and a section with small curves per trial.
    With ``trial_pages`` each trial's own dashboard is (re)written next to it and linked."""
    sweep_dir = Path(sweep_dir)
    state = read_sweep_state(sweep_dir)
    metric_cfg = state.get("metric") or {}
    metric = metric_cfg.get("name") or "eval/eer"
    goal = metric_cfg.get("goal") or "minimize"
    rows = sweep_rows(sweep_dir, metric)
    name = state.get("name") or sweep_dir.resolve().name
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    done = [r for r in rows if r["status"] == "finished" and r.get(metric) is not None]
    best = (min if goal == "minimize" else max)(done, key=lambda r: r[metric]) if done else None
    body = [f"<h1>protowatch sweep: {html.escape(str(name))}</h1>",
            f'<div class="sub">{html.escape(str(sweep_dir))} &middot; method {html.escape(str(state.get("method", "?")))}'
            f" &middot; metric {html.escape(metric)} ({html.escape(goal)})</div>",
            _cards([("trials", len(rows), ""), *((k, v, f"st-{k}") for k, v in sorted(counts.items())),
                    (f"best {metric}", best[metric] if best else None, ""),
                    ("best trial", best["trial"] if best else None, "")])]

    body.append("<h2>Trials</h2>")
    if rows:
        cols = list(rows[0].keys())
        trows, tcls = [], []
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c)
                if c == "trial":
                    v = _Raw(f'<a href="#t-{html.escape(r["trial"])}">{html.escape(r["trial"])}</a>')
                elif c == "error" and v:
                    v = _Raw(f"<code>{html.escape(str(v).splitlines()[-1][:200])}</code>")
                cells.append(v)
            trows.append(cells)
            tcls.append([f"st-{r['status']}" if c == "status" else "" for c in cols])
        body.append(_table(cols, trows, tcls))
    else:
        body.append('<p class="sub">no trials yet.</p>')

    axes = heatmap_axes(state, rows)
    if axes and rows:
        body.append("<h2>Heatmaps</h2><div class=\"figs\">")
        rk, ck = axes
        for m in heatmap_metrics(metric):
            rv, cv, g = heatmap_grid(rows, m, rk, ck, goal if m == metric else "minimize")
            png = render_heatmap(rv, cv, g, m, rk or "", ck, title=f"{m}{' (sweep metric)' if m == metric else ' (final)'}")
            body.append(_img(_png_uri(png), f"heatmap {m}"))
        body.append("</div>")

    body.append("<h2>Per trial</h2>")
    for r in rows:
        t = (state.get("trials") or {}).get(r["trial"], {})
        tdir = _trial_dir(sweep_dir, t, r["trial"])
        metrics = read_metrics(tdir / "records")
        link = ""
        if trial_pages and (tdir / "records").is_dir():
            try:
                (tdir / DEFAULT_NAME).write_text(render_run(tdir, refresh=refresh, title=f"{name} / {r['trial']}"))
                rel = os.path.relpath(tdir / DEFAULT_NAME, sweep_dir)
                link = f' &middot; <a href="{html.escape(rel)}">full dashboard</a>'
            except OSError:
                pass
        body.append(f'<h3 id="t-{html.escape(r["trial"])}">{html.escape(r["trial"])} &middot; '
                    f'<span class="st-{r["status"]}">{html.escape(r["status"])}</span>'
                    f' &middot; {html.escape(metric)} = {html.escape(_fmt(r.get(metric))) or "&ndash;"}{link}</h3>')
        charts = [svg_chart(metrics[k], k, 260, 130) for k in ("train/loss", "proto/usage/perplexity_student",
                                                               "proto/usage/dead", "proto/delta/drift") if k in metrics]
        if charts:
            body.append('<div class="grid">' + "".join(charts) + "</div>")
        if r["status"] == "failed" and r.get("error"):
            body.append(f"<pre>{html.escape(str(r['error']))}</pre>")
    return _page(f"protowatch sweep: {name}", "\n".join(body), refresh)


# ----------------------------------------------------------------------------------------------
# writing and watching
# ----------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_dashboard(path: str | os.PathLike, out: Optional[str | os.PathLike] = None,
                    refresh: Optional[float] = None) -> Path:
    """Write the dashboard of a run or a sweep directory to ``out`` (default
    ``path/dashboard.html``), atomically, and return its path."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a directory: pass a run's exp_dir (with records/) or a sweep's --out directory")
    sweep = is_sweep_dir(p)
    if not sweep and not (p / "records").is_dir() and not (p / "tsne").is_dir():
        raise FileNotFoundError(f"{p} has neither records/ (a run's exp_dir) nor {STATE_FILE} or trials/ "
                                "(a sweep directory): point at one of those")
    page = render_sweep(p, refresh) if sweep else render_run(p, refresh)
    target = Path(out) if out is not None else p / DEFAULT_NAME
    _atomic_write_bytes(target, page.encode("utf-8"))
    return target


def _fingerprint(path: Path, out: Path) -> tuple:
    """(name, size, mtime) of every input file; the dashboard's own outputs are left out."""
    items = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "wandb"]
        for f in files:
            if f == DEFAULT_NAME or f.endswith(".tmp") or f == "evolution.gif" or f.startswith("."):
                continue
            fp = Path(root) / f
            if fp == out:
                continue
            try:
                st = fp.stat()
            except OSError:
                continue
            items.append((str(fp), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))


def looks_finished(path: str | os.PathLike) -> bool:
    """A run whose summary holds its final ``eval/eer``; a sweep none of whose trials is pending
    or running and whose ``summary.csv`` is written."""
    p = Path(path)
    if is_sweep_dir(p):
        trials = (read_sweep_state(p).get("trials") or {}).values()
        return bool(trials) and (p / "summary.csv").is_file() and \
            all(t.get("status") in ("finished", "failed") for t in trials)
    return "eval/eer" in read_json(p / "records" / "summary.json")


def watch(path: str | os.PathLike, out: Optional[str | os.PathLike] = None, interval: float = 10.0,
          max_cycles: Optional[int] = None, log: Any = sys.stderr) -> Path:
    """Rewrite the dashboard every ``interval`` seconds (the page reloads itself as often).

    Stops on Ctrl-C, or by itself once the run looks finished (:func:`looks_finished`) and no
    input file changed for two intervals; ``max_cycles`` bounds the loop (tests)."""
    p = Path(path)
    target = Path(out) if out is not None else p / DEFAULT_NAME
    last_fp, unchanged, cycles, waiting = None, 0, 0, False
    try:
        while True:
            fp = _fingerprint(p, target) if p.is_dir() else ()
            if fp != last_fp or not target.exists():
                try:
                    write_dashboard(p, target, refresh=interval)
                except FileNotFoundError as exc:  # the run has not written anything yet
                    if not waiting:
                        print(f"dashboard: waiting for records ({exc})", file=log, flush=True)
                    waiting = True
                    fp = None
                else:
                    waiting = False
                    print(f"dashboard: wrote {target}", file=log, flush=True)
                unchanged = 0
            else:
                unchanged += 1
            last_fp = fp
            cycles += 1
            if unchanged >= 2 and looks_finished(p):
                write_dashboard(p, target, refresh=None)  # final page: stop reloading
                print(f"dashboard: the run finished and nothing changed for two intervals; final page {target}",
                      file=log, flush=True)
                break
            if max_cycles is not None and cycles >= max_cycles:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        try:
            write_dashboard(p, target, refresh=None)
            print(f"\ndashboard: stopped; final page {target}", file=log, flush=True)
        except FileNotFoundError:
            print("\ndashboard: stopped before the run wrote any records", file=log, flush=True)
    return target
