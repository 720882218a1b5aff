"""What ``inspect`` prints and writes: a table for the terminal, and for ``--exp-dir`` the local
records (:class:`monitors.formats.records.LocalSink`) and an offline W&B run
(:class:`monitors.formats.sinks.WandbSink`), with each checkpoint's number as ``trainer/step``, so that
``python -m monitors dashboard DIR`` draws the curves across checkpoints."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from ..formats.records import METRICS_FILE, LocalSink, records_dir
from .inspect import Report

__all__ = ["check_exp_dir", "format_table", "metrics_of", "write_exp_dir"]

#: row field -> the metric name a live run logs it under (where one exists)
METRICS: dict[str, str] = {
    "norm_mean": "proto/norm/mean", "norm_min": "proto/norm/min", "norm_max": "proto/norm/max",
    "max_cosine": "proto/similarity/max", "duplicates": "proto/similarity/duplicates",
    "delta_mean": "proto/delta/per_proto_mean", "delta_max": "proto/delta/per_proto_max",
    "delta_relative": "proto/delta/relative", "drift": "proto/delta/drift",
    "unchanged": "inspect/unchanged_share", "nonfinite": "inspect/nonfinite",
    "rest_changed": "inspect/rest_changed", "teacher_changed": "inspect/teacher_changed",
    "student_teacher": "inspect/student_teacher_distance",
}


def _num(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, fmt) if isinstance(v, float) else str(v)


def format_table(report: Report) -> str:
    """The rows as an aligned text table, then the prototypes' paths, notes and findings."""
    head = ["checkpoint", "shape", "norm mean [min, max]", "nonfinite", "max cos", "dup",
            "move mean/max", "unchanged", "drift", "rest moved", "teacher moved", "s-t dist", "opt state"]
    lines = []
    for r in report.rows:
        if r.get("prototypes") is None:
            lines.append([r["label"], "NOT FOUND"] + ["-"] * (len(head) - 2))
            continue
        dup = f"{r['duplicates']}{'*' if r.get('sampled') else ''}"
        move = "-" if "delta_mean" not in r else f"{_num(r['delta_mean'])}/{_num(r['delta_max'])}"
        rest = "-" if r.get("rest_changed") is None else f"{r['rest_changed']}/{r['rest_tensors']}"
        teach = "-" if r.get("teacher_changed") is None else f"{r['teacher_changed']}/{r['teacher_tensors']}"
        lines.append([r["label"], "x".join(map(str, r["shape"])),
                      f"{_num(r['norm_mean'])} [{_num(r['norm_min'])}, {_num(r['norm_max'])}]",
                      str(r["nonfinite"]), _num(r["max_cosine"]), dup, move,
                      "-" if "unchanged" not in r else f"{100 * r['unchanged']:.0f}%",
                      _num(r.get("drift")), rest, teach, _num(r.get("student_teacher")),
                      _num(r.get("optimizer_state")) if r.get("optimizer_state") is not None else "?"])
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in lines]
    found = next((r for r in report.rows if r.get("prototypes")), None)
    if found is not None:
        out.append(f"prototypes: {found['prototypes']}" + (f"; teacher copy: {found['teacher']}" if found["teacher"] else
                                                           "; no teacher copy"))
    if any(r.get("sampled") for r in report.rows):
        out.append("dup*: of a fixed row sample (large K); max cos likewise")
    out += [f"note: {n}" for n in report.notes]
    if report.findings:
        out += [str(f) for f in report.findings]
    else:
        out.append("no findings")
    return "\n".join(out)


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """A row's values under the metric names of a live run."""
    out: dict[str, float] = {}
    for field, name in METRICS.items():
        v = row.get(field)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    if "sampled" in row:
        out["proto/similarity/sampled"] = float(bool(row["sampled"]))
    return out


def check_exp_dir(exp_dir: str | os.PathLike) -> None:
    """Raise ValueError if ``exp_dir`` already holds records: never mix into a run's own records."""
    metrics = records_dir(exp_dir) / METRICS_FILE
    if metrics.exists():
        raise ValueError(f"--exp-dir {exp_dir} already holds records ({metrics}): pass a new directory")


def write_exp_dir(report: Report, exp_dir: str | os.PathLike, wandb_mode: str = "offline") -> Optional[str]:
    """Write the local records (and, unless ``wandb_mode`` is ``disabled``, an offline W&B run) of
    the series under ``exp_dir``; returns the W&B run directory, or None. Raises ValueError when
    ``exp_dir`` already holds records (a training run's, or an earlier inspection's)."""
    from ..formats.sinks import WandbSink

    exp_dir = Path(exp_dir)
    check_exp_dir(exp_dir)
    rows = [(int(r["number"]), metrics_of(r)) for r in report.rows]
    warn = [f for f in report.findings if f.severity in ("warning", "error")]
    summary = {"health/errors": sum(f.severity == "error" for f in report.findings),
               "health/warnings": sum(f.severity == "warning" for f in report.findings),
               "health/codes": sorted({f.code for f in warn}),
               "inspect/checkpoints": len(report.rows)}
    sinks: list[Any] = [LocalSink(records_dir(exp_dir))]
    wandb_sink = None
    if wandb_mode != "disabled":
        wandb_sink = WandbSink(project="protowatch", dir=str(exp_dir), mode=wandb_mode, name=f"inspect {exp_dir.name}",
                               config={"inspect_files": [r["file"] for r in report.rows]})
        sinks.append(wandb_sink)
    run_dir = None
    try:
        for sink in sinks:
            sink.log_rows(rows)
            for f in report.findings:
                sink.alert(f)
            sink.set_summary(summary)
        if wandb_sink is not None:
            run_dir = wandb_sink.run_dir
    finally:
        for sink in sinks:
            sink.close()
    return run_dir
