"""The page of a sweep: its trial table, the heatmaps of the sweep metric and of prototype
health, and a section of small curves per trial (each trial also gets its own run page)."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Optional

from ..formats.records import read_metrics, records_dir
from ..formats.sweep_state import best_trial, read_sweep_state, sweep_metric, sweep_rows, trial_dir
from .charts import svg_chart
from .heatmaps import heatmap_axes, heatmap_grid, heatmap_metrics, render_heatmap
from .page import DEFAULT_NAME, Raw, cards, fmt, img, page, png_uri, table
from .run_page import render_run

#: the small curves of each trial on a sweep's page (those that exist)
TRIAL_CURVES: tuple[str, ...] = ("train/loss", "proto/usage/perplexity_student", "proto/usage/dead",
                                 "proto/delta/drift")


def render_sweep(sweep_dir: str | os.PathLike, refresh: Optional[float] = None,
                 trial_pages: bool = True) -> str:
    """The HTML page of a sweep: its table, heatmaps, and a section with small curves per trial.
    With ``trial_pages`` each trial's own dashboard is (re)written next to it and linked."""
    sweep_dir = Path(sweep_dir)
    state = read_sweep_state(sweep_dir)
    metric, goal = sweep_metric(state)
    rows = sweep_rows(sweep_dir, metric)
    name = state.get("name") or sweep_dir.resolve().name
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    best = best_trial(rows, metric, goal)
    body = [f"<h1>protowatch sweep: {html.escape(str(name))}</h1>",
            f'<div class="sub">{html.escape(str(sweep_dir))} &middot; method {html.escape(str(state.get("method", "?")))}'
            f" &middot; metric {html.escape(metric)} ({html.escape(goal)})</div>",
            cards([("trials", len(rows), ""), *((k, v, f"st-{k}") for k, v in sorted(counts.items())),
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
                    v = Raw(f'<a href="#t-{html.escape(r["trial"])}">{html.escape(r["trial"])}</a>')
                elif c == "error" and v:
                    v = Raw(f"<code>{html.escape(str(v).splitlines()[-1][:200])}</code>")
                cells.append(v)
            trows.append(cells)
            tcls.append([f"st-{r['status']}" if c == "status" else "" for c in cols])
        body.append(table(cols, trows, tcls))
    else:
        body.append('<p class="sub">no trials yet.</p>')

    axes = heatmap_axes(state, rows)
    if axes and rows:
        body.append("<h2>Heatmaps</h2><div class=\"figs\">")
        rk, ck = axes
        for m in heatmap_metrics(metric):
            rv, cv, g = heatmap_grid(rows, m, rk, ck, goal if m == metric else "minimize")
            png = render_heatmap(rv, cv, g, m, rk or "", ck, title=f"{m}{' (sweep metric)' if m == metric else ' (final)'}")
            body.append(img(png_uri(png), f"heatmap {m}"))
        body.append("</div>")

    body.append("<h2>Per trial</h2>")
    for r in rows:
        t = (state.get("trials") or {}).get(r["trial"], {})
        tdir = trial_dir(sweep_dir, t, r["trial"])
        metrics = read_metrics(records_dir(tdir))
        link = ""
        if trial_pages and records_dir(tdir).is_dir():
            try:
                (tdir / DEFAULT_NAME).write_text(render_run(tdir, refresh=refresh, title=f"{name} / {r['trial']}"))
                rel = os.path.relpath(tdir / DEFAULT_NAME, sweep_dir)
                link = f' &middot; <a href="{html.escape(rel)}">full dashboard</a>'
            except OSError:
                pass
        body.append(f'<h3 id="t-{html.escape(r["trial"])}">{html.escape(r["trial"])} &middot; '
                    f'<span class="st-{r["status"]}">{html.escape(r["status"])}</span>'
                    + (f' at step {r["step"]}' if r["status"] == "running" and r.get("step") is not None else "")
                    + (f' &middot; job {html.escape(str(r["job_id"]))}' if r.get("job_id") else "")
                    + f' &middot; {html.escape(metric)} = {html.escape(fmt(r.get(metric))) or "&ndash;"}{link}</h3>')
        charts = [svg_chart(metrics[k], k, 260, 130) for k in TRIAL_CURVES if k in metrics]
        if charts:
            body.append('<div class="grid">' + "".join(charts) + "</div>")
        if r["status"] == "failed" and r.get("error"):
            body.append(f"<pre>{html.escape(str(r['error']))}</pre>")
    return page(f"protowatch sweep: {name}", "\n".join(body), refresh)
