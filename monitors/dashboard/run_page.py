"""The page of one run: summary cards, findings, prototype curves, evolution heatmaps, the
t-SNE animation, the latest media and every other metric, read from the run's records."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..formats.records import (STEP_KEY, TSNE_DIR, TSNE_GIF, latest_media, read_findings, read_histogram, read_metrics,
                       read_summary, records_dir, to_float, tsne_frames)
from .charts import svg_chart, svg_histogram
from .page import Raw, cards, data_uri, img, page, table
from .tsne_gif import build_tsne_gif

#: the curves shown first on a run's page (those that exist)
MAIN_CURVES: tuple[str, ...] = (
    "train/loss", "proto/norm/mean", "proto/grad/norm", "proto/delta/norm", "proto/delta/drift",
    "proto/usage/perplexity_student", "proto/usage/dead", "proto/similarity/max",
)
#: the evolution heatmaps (images) shown on a run's page
EVOLUTION_KEYS: tuple[str, ...] = ("proto/evolution/norm", "proto/evolution/update")


def _run_header(exp_dir: Path, summary: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The cards at the top: last step, EER (and its ratio to the EER at init), minDCF, health."""
    last_step = max((s[-1][0] for s in metrics.values() if s), default=None)
    eer, init = to_float(summary.get("eval/eer")), to_float(summary.get("eval/eer_at_init"))
    errors, warnings = summary.get("health/errors"), summary.get("health/warnings")
    codes = summary.get("health/codes") or []
    healthy = errors == 0 and warnings == 0
    items = [
        ("last step", last_step, ""),
        ("eval/eer", None if eer is None else f"{100 * eer:.2f}%", ""),
        ("eval/eer_at_init", None if init is None else f"{100 * init:.2f}%", ""),
        ("eer / eer_at_init", None if not (eer is not None and init) else f"{eer / init:.2f}", ""),
        ("eval/min_dcf", to_float(summary.get("eval/min_dcf")), ""),
        ("health/errors", errors, "sev-error" if errors else ("ok" if healthy else "")),
        ("health/warnings", warnings, "sev-warning" if warnings else ("ok" if healthy else "")),
        ("health/codes", " ".join(codes) if isinstance(codes, list) else codes, ""),
    ]
    return cards(items)


def _findings_html(findings: Sequence[Mapping[str, Any]]) -> str:
    """The findings table, errors first, then warnings and infos, each by step."""
    if not findings:
        return '<p class="ok">No findings: no monitor reported a problem.</p>'
    order = {"error": 0, "warning": 1, "info": 2}
    fs = sorted(findings, key=lambda f: (order.get(str(f.get("severity")), 3), int(f.get("step", 0) or 0)))
    rows = [[f.get("severity", ""), f.get("code", ""), f.get("step", ""), f.get("message", "")] for f in fs]
    classes = [[f"sev-{f.get('severity', '')}", "", "num", ""] for f in fs]
    return table(["severity", "code", "step", "message"], rows, classes)


def render_run(exp_dir: str | os.PathLike, refresh: Optional[float] = None, write_gif: bool = True,
               title: Optional[str] = None) -> str:
    """The HTML page of one run (its ``exp_dir``)."""
    exp_dir = Path(exp_dir)
    records = records_dir(exp_dir)
    metrics = read_metrics(records)
    summary = read_summary(records)
    findings = read_findings(records)
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
            img(data_uri(m["file"]), k, f"{k} (latest, step {m[STEP_KEY]})", width=600) for k, m in evo) + "</div>")
    else:
        body.append('<p class="sub">no evolution heatmaps yet (monitor "evolution").</p>')

    body.append("<h2>t-SNE of prototypes and speaker embeddings</h2>")
    frames = tsne_frames(exp_dir)
    gif = None
    if frames:
        gif_path = exp_dir / TSNE_DIR / TSNE_GIF
        if write_gif:
            try:
                gif = build_tsne_gif(exp_dir)
            except (OSError, ValueError) as exc:
                body.append(f'<p class="sub">could not build the GIF: {html.escape(str(exc))}</p>')
        elif gif_path.is_file():
            gif = gif_path
    if gif is not None:
        body.append(img(data_uri(gif), "t-SNE animation",
                         f"{len(frames)} aligned frames, steps {frames[0][0]}..{frames[-1][0]} (prototypes: black x)",
                         width=560))
    elif "proto/tsne" in media:
        m = media["proto/tsne"]
        body.append(img(data_uri(m["file"]), "t-SNE", f"proto/tsne (latest, step {m[STEP_KEY]})", width=560))
    else:
        body.append('<p class="sub">no t-SNE frames yet (monitor "tsne").</p>')

    other_imgs = [(k, m) for k, m in sorted(media.items())
                  if m.get("type") == "image" and k not in EVOLUTION_KEYS and k != "proto/tsne"]
    hists = [(k, m) for k, m in sorted(media.items()) if m.get("type") == "histogram"]
    if other_imgs or hists:
        body.append("<h2>Latest media</h2>")
        if other_imgs:
            body.append('<div class="figs">' + "".join(
                img(data_uri(m["file"]), k, f"{k} (step {m[STEP_KEY]})") for k, m in other_imgs) + "</div>")
        if hists:
            svgs = []
            for k, m in hists:
                counts, edges = read_histogram(m["file"])
                svgs.append(svg_histogram(counts, edges, f"{k} (step {m[STEP_KEY]})"))
            body.append('<div class="grid">' + "".join(svgs) + "</div>")

    rest = [k for k in sorted(metrics) if k not in main and k != "eval/eer"]
    if rest:
        body.append(f"<details><summary>All other metrics ({len(rest)})</summary>"
                    '<div class="grid">' + "".join(svg_chart(metrics[k], k, 300, 150) for k in rest) + "</div></details>")
    if summary:
        rows = [[k, Raw(html.escape(json.dumps(v, default=str)))] for k, v in sorted(summary.items())]
        body.append(f"<details><summary>Run summary ({len(summary)} values)</summary>{table(['key', 'value'], rows)}</details>")
    return page(f"protowatch: {name}", "\n".join(body), refresh)
