"""The summary of a sweep: the printed table, ``summary.csv``, ``summary.md``, the heatmaps, and
the W&B offline run of job type ``sweep-summary``. The rows come from :mod:`monitors.formats.sweep_state`."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from monitors.dashboard import heatmap_axes, heatmap_grid, heatmap_metrics, render_heatmap
from monitors.formats.sweep_state import SUMMARY_CSV, SUMMARY_MD, best_trial, read_sweep_state, sweep_metric, sweep_rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _safe(metric: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in metric)


def _last_line(error: Any, width: int) -> str:
    """The last line of a trial's error, cut to ``width`` characters."""
    return (str(error or "").strip().splitlines() or [""])[-1][:width]


def write_summary(out_dir: str | os.PathLike, echo: Callable[[str], None] = print, wandb_run: bool = True,
                  project: str = "protowatch") -> list[dict[str, Any]]:
    """Print the table, write ``summary.csv``, ``summary.md`` and ``heatmap_<metric>.png`` into
    ``out_dir``, and (``wandb_run``) log them to a W&B offline run of job type sweep-summary."""
    out_dir = Path(out_dir)
    state = read_sweep_state(out_dir)
    rows = sweep_rows(out_dir)
    metric, goal = sweep_metric(state)
    if not rows:
        echo("[sweep] no trials")
        return rows
    columns = [c for c in rows[0] if c != "error"] + ["error"]
    shown = [{c: (r.get(c) if c != "error" else _last_line(r.get("error"), 120)) for c in columns} for r in rows]

    # printed table and Markdown
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in shown)) for c in columns if c != "error"}
    lines = ["  ".join(c.ljust(widths[c]) for c in widths), "  ".join("-" * widths[c] for c in widths)]
    lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in widths) for r in shown]
    echo("\n".join(lines))
    md = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    md += ["| " + " | ".join(_cell(r[c]).replace("|", "\\|") for c in columns) + " |" for r in shown]
    best = best_trial(rows, metric, goal)
    if best is not None:
        md += ["", f"Best ({goal} {metric}): **{best['trial']}** with {_cell(best[metric])}"]
        echo(f"best ({goal} {metric}): {best['trial']} = {_cell(best[metric])}")
    (out_dir / SUMMARY_MD).write_text("\n".join(md) + "\n")
    tmp = out_dir / f".{SUMMARY_CSV}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    os.replace(tmp, out_dir / SUMMARY_CSV)

    # heatmaps: num_proto rows x output_dim columns (else the first two swept parameters)
    heatmaps: dict[str, Path] = {}
    axes = heatmap_axes(state, rows)
    if axes:
        rk, ck = axes
        for m in heatmap_metrics(metric):
            rv, cv, grid = heatmap_grid(rows, m, rk, ck, goal if m == metric else "minimize")
            path = out_dir / f"heatmap_{_safe(m)}.png"
            render_heatmap(rv, cv, grid, m, rk, ck, title=f"{m}{' (sweep metric)' if m == metric else ' (final)'}",
                           path=path)
            heatmaps[m] = path
        echo(f"[sweep] wrote {out_dir / SUMMARY_CSV}, {SUMMARY_MD} and {len(heatmaps)} heatmaps")
    if wandb_run:
        try:
            _log_summary_run(out_dir, state, rows, columns, heatmaps, project)
        except Exception as exc:  # the summary files exist already; W&B is a copy
            echo(f"[sweep] could not log the sweep-summary W&B run: {type(exc).__name__}: {exc}")
    return rows


def _log_summary_run(out_dir: Path, state: Mapping[str, Any], rows: list[dict[str, Any]], columns: list[str],
                     heatmaps: Mapping[str, Path], project: str) -> None:
    import wandb

    name = str(state.get("name") or out_dir.name)
    run = wandb.init(project=project, dir=str(out_dir), group=name, job_type="sweep-summary",
                     name=f"{name}-summary", mode="offline",
                     config={"sweep": name, "method": state.get("method"), "metric": state.get("metric")},
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        data = [[(r.get(c) if not isinstance(r.get(c), float) or math.isfinite(r.get(c)) else None)
                 if c != "error" else _last_line(r.get("error"), 200)
                 for c in columns] for r in rows]
        payload: dict[str, Any] = {"sweep/trials": wandb.Table(columns=columns, data=data)}
        for m, p in heatmaps.items():
            payload[f"sweep/heatmap/{m}"] = wandb.Image(str(p), caption=m)
        run.log(payload)
        metric, goal = sweep_metric(state)
        best = best_trial(rows, metric, goal)
        run.summary["sweep/trials"] = len(rows)
        run.summary["sweep/failed"] = sum(r["status"] == "failed" for r in rows)
        if best is not None:
            run.summary["sweep/best_trial"] = best["trial"]
            run.summary[f"sweep/best/{metric}"] = best[metric]
    finally:
        run.finish()
