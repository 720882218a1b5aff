"""The one owner of the sweep directory format: the state file, the trials' status files, the
rows of a sweep's summary table, and the best trial.

It lives in ``monitors/`` (not beside the sweep code in ``pipeline/sweep/``) because the
dashboard reads it and ``monitors/`` never imports ``pipeline/``; the sweep writes through
:class:`SweepStateWriter` and :func:`write_status`.

Layout of a sweep directory (``--out`` of ``python -m pipeline sweep``)::

    sweep_state.json        STATE_FILE: {"version", "name", "file", "method", "metric", "swept",
                            "trials": {name: status record}, "updated"}; one writer (the sweep)
    trials/<name>/          TRIALS_DIR: one trial's exp_dir (its records/, as monitors.formats.records says)
        status.json         STATUS_FILE: that trial's status record (W&B agents write only these)
        log.txt             TRIAL_LOG: the trial's stdout and stderr
    summary.csv, summary.md SUMMARY_CSV, SUMMARY_MD: the table, written when the sweep ends
    heatmap_<metric>.png    the heatmaps of the sweep metric and of prototype health

A status record holds ``name``, ``params``, ``status`` (pending/running/finished/failed),
``exit_code``, ``metric``, ``error``, ``exp_dir``, ``command``, ``attempts``, ``started``,
``ended`` and ``seconds``; ``devices`` (its CUDA_VISIBLE_DEVICES slice, or cpu) on one machine;
``job_id``, ``host``, ``pid`` and ``resumed`` (requeued from its checkpoint) when it is a job
(``--launcher slurm``).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .records import (RECORDS_DIR, atomic_write_json, final_values, read_json, read_metrics, read_summary,
                      to_float)

STATE_FILE = "sweep_state.json"
TRIALS_DIR = "trials"
STATUS_FILE = "status.json"
TRIAL_LOG = "log.txt"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
#: the metric of a sweep file that names none
DEFAULT_METRIC = {"name": "eval/eer", "goal": "minimize"}
#: final values of a trial's metrics.jsonl shown in a sweep's table and heatmaps
HEALTH_METRICS: tuple[str, ...] = ("proto/usage/perplexity_student", "proto/usage/dead", "proto/delta/drift")
#: values of a trial's summary.json shown in a sweep's table
SUMMARY_KEYS: tuple[str, ...] = ("eval/eer", "eval/eer_at_init", "eval/min_dcf", "health/errors",
                                 "health/warnings", "health/codes")


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def is_sweep_dir(path: str | os.PathLike) -> bool:
    """A sweep directory: it has a state file, or trials/ and no records/ of its own."""
    p = Path(path)
    return (p / STATE_FILE).is_file() or ((p / TRIALS_DIR).is_dir() and not (p / RECORDS_DIR).is_dir())


def read_sweep_state(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """The sweep's state file, or one rebuilt from ``trials/*/status.json`` (e.g. W&B agents)."""
    sweep_dir = Path(sweep_dir)
    state = read_json(sweep_dir / STATE_FILE)
    if state.get("trials"):
        return state
    trials: dict[str, Any] = {}
    for st in sorted((sweep_dir / TRIALS_DIR).glob(f"*/{STATUS_FILE}"), key=lambda q: q.stat().st_mtime):
        s = read_json(st)
        if s:
            trials[s.get("name", st.parent.name)] = {**s, "exp_dir": s.get("exp_dir", f"{TRIALS_DIR}/{st.parent.name}")}
    if not state.get("swept"):  # the parameters that differ between trials
        values: dict[str, set[str]] = {}
        for t in trials.values():
            for k, v in (t.get("params") or {}).items():
                values.setdefault(k, set()).add(json.dumps(v, sort_keys=True, default=str))
        state = {**state, "swept": sorted(k for k, vs in values.items() if len(vs) > 1)}
    return {**state, "trials": trials}


def sweep_metric(state: Mapping[str, Any]) -> tuple[str, str]:
    """``(metric name, goal)`` of a sweep state (eval/eer, minimize unless it says otherwise)."""
    cfg = state.get("metric") or {}
    return cfg.get("name") or DEFAULT_METRIC["name"], cfg.get("goal") or DEFAULT_METRIC["goal"]


def trial_dir(sweep_dir: str | os.PathLike, trial: Mapping[str, Any], name: str) -> Path:
    """The exp_dir of one trial (its ``exp_dir``, relative to the sweep directory, else trials/<name>)."""
    d = Path(trial.get("exp_dir") or f"{TRIALS_DIR}/{name}")
    return d if d.is_absolute() else Path(sweep_dir) / d


def trial_metric(records: str | os.PathLike, metric: str, summary: Optional[Mapping[str, Any]] = None,
                 finals: Optional[Mapping[str, float]] = None) -> Optional[float]:
    """The sweep metric of a finished trial: its run summary's value, else the last logged value."""
    summary = read_summary(records) if summary is None else summary
    v = to_float(summary.get(metric))
    if v is None:
        v = (final_values(read_metrics(records)) if finals is None else finals).get(metric)
    return v


def sweep_rows(sweep_dir: str | os.PathLike, metric: Optional[str] = None) -> list[dict[str, Any]]:
    """One plain dict per trial, in the order the sweep proposed them: ``trial``, ``status``,
    ``step`` (the last step it logged), ``job_id`` (when the sweep's trials are jobs), the swept parameters, the sweep metric (from the trial's ``records/summary.json``), the
    summary values of :data:`SUMMARY_KEYS`, the final values of :data:`HEALTH_METRICS` (last
    value in ``records/metrics.jsonl``), ``seconds`` and ``error``. A trial that did not finish
    has None as its metric and eval values; its health values are whatever it recorded."""
    sweep_dir = Path(sweep_dir)
    state = read_sweep_state(sweep_dir)
    metric = metric or (state.get("metric") or {}).get("name") or DEFAULT_METRIC["name"]
    swept: list[str] = list(state.get("swept") or [])
    rows: list[dict[str, Any]] = []
    jobs = any(t.get("job_id") for t in (state.get("trials") or {}).values())
    for name, t in (state.get("trials") or {}).items():
        params = dict(t.get("params") or {})
        if not swept:
            swept = [k for k in params]
        records = trial_dir(sweep_dir, t, name) / RECORDS_DIR
        summary = read_summary(records)
        metrics = read_metrics(records)
        finals = final_values(metrics)
        status = t.get("status", "unknown")
        done = status == "finished"
        row: dict[str, Any] = {"trial": name, "status": status,
                               "step": max((int(v[-1][0]) for v in metrics.values() if v), default=None)}
        if jobs:
            row["job_id"] = t.get("job_id")
        for k in swept:
            row[k] = params.get(k)
        row[metric] = trial_metric(records, metric, summary, finals) if done else None
        for k in SUMMARY_KEYS:
            if k == metric:
                continue
            v = summary.get(k)
            if k == "health/codes":
                row[k] = " ".join(v) if isinstance(v, list) else (v or "")
            elif k.startswith("eval/"):
                row[k] = to_float(v) if done else None
            else:
                row[k] = to_float(v)
        for k in HEALTH_METRICS:
            if k != metric:
                row[k] = finals.get(k)
        row["seconds"] = t.get("seconds")
        row["error"] = t.get("error") or ""
        rows.append(row)
    return rows


def best_trial(rows: Sequence[Mapping[str, Any]], metric: str, goal: str = "minimize") -> Optional[Mapping[str, Any]]:
    """The finished row with the best ``metric`` (lowest for ``minimize``, else highest; the
    first of equals); None when no trial finished with a value."""
    done = [r for r in rows if r["status"] == "finished" and r.get(metric) is not None]
    if not done:
        return None
    return (min if goal == "minimize" else max)(done, key=lambda r: r[metric])


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def write_status(trial_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write one trial's ``status.json`` atomically."""
    atomic_write_json(Path(trial_dir) / STATUS_FILE, record)


class SweepStateWriter:
    """``DIR/sweep_state.json`` (and each trial's status.json) of one sweep; the sweep's main
    thread is the one writer. ``header``: name, file, method, metric, swept; the trials of an
    earlier launch on the same directory are kept."""

    def __init__(self, sweep_dir: str | os.PathLike, header: Mapping[str, Any]) -> None:
        self.path = Path(sweep_dir) / STATE_FILE
        old = read_json(self.path)
        self.data: dict[str, Any] = {"version": 1, **header, "trials": dict(old.get("trials") or {})}
        self.lock = threading.Lock()

    def trial(self, name: str) -> dict[str, Any]:
        """The record of trial ``name`` ({} if the sweep has none)."""
        return self.data["trials"].get(name) or {}

    def update(self, name: str, rec: Mapping[str, Any], trial_dir: Optional[Path] = None) -> None:
        """Merge ``rec`` into the record of trial ``name``; write the state file and (when
        ``trial_dir`` exists) the trial's status.json."""
        with self.lock:
            t = {**self.data["trials"].get(name, {}), **rec, "name": name}
            self.data["trials"][name] = t
            self.data["updated"] = time.time()
            atomic_write_json(self.path, self.data)
            if trial_dir is not None and trial_dir.is_dir():
                write_status(trial_dir, t)
