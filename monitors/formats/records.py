"""The one owner of the local records format: its layout, its writer (:class:`LocalSink`) and
its readers. Reading the records needs no W&B.

Layout of a run's ``exp_dir`` (the names are the constants below)::

    records/                RECORDS_DIR, written by LocalSink
        metrics.jsonl       METRICS_FILE: one line per logged step ``{"trainer/step": s, metric: value}``
                            (non-finite values as the strings "nan"/"inf"); after a resume a step may
                            appear twice: the last line wins
        media.jsonl         MEDIA_FILE: one line per media ``{"trainer/step", "key", "type", "path"}``
                            (type image/histogram/table, path relative to records/)
        media/              MEDIA_DIR: ``<key>_<step:07d>.png``, ``.hist.json`` ({"counts", "edges"}),
                            ``.table.json`` ({"columns", "rows"})
        findings.jsonl      FINDINGS_FILE: one Finding dict a line
        summary.json        SUMMARY_FILE: the run summary (one JSON object, rewritten atomically)
    tsne/                   TSNE_DIR, written by the t-SNE monitor
        frames.jsonl        TSNE_INDEX: one line per frame ``{"step", "png", ...}``
        frame_<step>.png    one aligned frame
        evolution.gif       TSNE_GIF: the frames animated (by the dashboard)

``STEP_KEY`` (``trainer/step``) is the step axis of every row, locally and in W&B.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..core.finding import Finding
from ..core.media import Histogram, Image, Table

STEP_KEY = "trainer/step"
RECORDS_DIR = "records"
METRICS_FILE = "metrics.jsonl"
MEDIA_FILE = "media.jsonl"
MEDIA_DIR = "media"
FINDINGS_FILE = "findings.jsonl"
SUMMARY_FILE = "summary.json"
TSNE_DIR = "tsne"
TSNE_INDEX = "frames.jsonl"
TSNE_GIF = "evolution.gif"


def records_dir(exp_dir: str | os.PathLike) -> Path:
    """The records folder of a run's ``exp_dir``."""
    return Path(exp_dir) / RECORDS_DIR


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file and a rename (readers never
    see half a file); the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (anything else as its str), written atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode("utf-8"))


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def _end_line(path: Path) -> None:
    """Append a newline to ``path`` if its last line is unfinished."""
    try:
        with open(path, "rb+") as f:
            if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


class LocalSink:
    """Plain records under ``directory`` (a run's ``records/``, laid out as the module docstring
    says). Reading them needs no W&B."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        (self.dir / MEDIA_DIR).mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, MEDIA_FILE, FINDINGS_FILE):
            _end_line(self.dir / name)  # a run killed mid-line: the next row starts a line of its own
        self._summary: dict[str, Any] = {}
        p = self.dir / SUMMARY_FILE
        if p.exists():
            try:
                self._summary = json.loads(p.read_text())
            except ValueError:
                self._summary = {}

    def log_rows(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """Append one metrics line per step and one media line per media value."""
        with open(self.dir / METRICS_FILE, "a") as fm, open(self.dir / MEDIA_FILE, "a") as fx:
            for step, row in rows:
                scalars: dict[str, Any] = {STEP_KEY: step}
                for k, v in row.items():
                    if isinstance(v, (int, float)):
                        scalars[k] = v if math.isfinite(v) else str(v)
                    elif isinstance(v, (Histogram, Image, Table)):
                        path = self._write_media(k, step, v)
                        fx.write(json.dumps({STEP_KEY: step, "key": k, "type": type(v).__name__.lower(),
                                             "path": path}) + "\n")
                fm.write(json.dumps(scalars) + "\n")

    def _write_media(self, key: str, step: int, v: Any) -> str:
        stem = f"{_safe_name(key)}_{step:07d}"
        if isinstance(v, Image):
            import matplotlib.image as mpimg

            rel = f"{MEDIA_DIR}/{stem}.png"
            mpimg.imsave(self.dir / rel, v.array())
        elif isinstance(v, Histogram):
            rel = f"{MEDIA_DIR}/{stem}.hist.json"
            vals = v.numpy()
            vals = vals[np.isfinite(vals)]
            counts, edges = np.histogram(vals, bins=v.num_bins) if vals.size else ([], [])
            (self.dir / rel).write_text(json.dumps({"counts": list(map(int, counts)),
                                                    "edges": list(map(float, edges))}))
        else:
            rel = f"{MEDIA_DIR}/{stem}.table.json"
            (self.dir / rel).write_text(json.dumps({"columns": list(v.columns),
                                                    "rows": [list(r) for r in v.rows]}, default=float))
        return rel

    def set_summary(self, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into summary.json (rewritten atomically)."""
        self._summary.update(values)
        atomic_write_json(self.dir / SUMMARY_FILE, self._summary)

    def alert(self, finding: Finding) -> None:
        """Append the finding to findings.jsonl."""
        with open(self.dir / FINDINGS_FILE, "a") as f:
            f.write(json.dumps(finding.to_dict()) + "\n")

    def close(self) -> None:
        """Nothing to close: every write opens and closes its file."""


# ----------------------------------------------------------------------------------------------
# reading (tolerant: a live run may be half-way through writing a line)
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
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def to_float(v: Any) -> Optional[float]:
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
    for row in read_jsonl(Path(records) / METRICS_FILE):
        step = row.get(STEP_KEY)
        if not isinstance(step, (int, float)):
            continue
        for k, v in row.items():
            if k == STEP_KEY:
                continue
            x = to_float(v)
            if x is not None:
                by_metric.setdefault(k, {})[int(step)] = x
    return {k: sorted(d.items()) for k, d in by_metric.items()}


def final_values(metrics: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, float]:
    """The value at the last step of every metric."""
    return {k: series[-1][1] for k, series in metrics.items() if series}


def read_summary(records: str | os.PathLike) -> dict[str, Any]:
    """The run summary (``records/summary.json``); {} before the run wrote one."""
    return read_json(Path(records) / SUMMARY_FILE)


def read_findings(records: str | os.PathLike) -> list[dict[str, Any]]:
    """The findings of a run (``records/findings.jsonl``), in the order they were written."""
    return read_jsonl(Path(records) / FINDINGS_FILE)


def latest_media(records: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``key -> entry`` of the latest (highest step, then last written) media of each key whose
    file exists; ``entry["file"]`` is the absolute path."""
    records = Path(records)
    best: dict[str, dict[str, Any]] = {}
    for e in read_jsonl(records / MEDIA_FILE):
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


def read_histogram(file: str | os.PathLike) -> tuple[list[float], list[float]]:
    """``(counts, edges)`` of a histogram media file; empty lists when it cannot be read."""
    d = read_json(file)
    return d.get("counts") or [], d.get("edges") or []


def tsne_frames(exp_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The t-SNE frame PNGs of a run as ``[(step, path)]`` in the order they were taken."""
    tdir = Path(exp_dir) / TSNE_DIR
    frames: list[tuple[int, Path]] = []
    seen: set[str] = set()
    for e in read_jsonl(tdir / TSNE_INDEX):
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
