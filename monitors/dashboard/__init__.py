"""Self-contained HTML dashboards of a run or a sweep, built from local records only.

    python -m monitors dashboard runs/sdpn_tiny            # -> runs/sdpn_tiny/dashboard.html
    python -m monitors dashboard runs/sweep_np_od --watch  # rewrite every 10 s while it runs

The dashboard reads the files a run leaves in its ``exp_dir`` through :mod:`monitors.formats.records`
(the records format: metrics, media, findings, summary, t-SNE frames) and, for a sweep, the
sweep directory through :mod:`monitors.formats.sweep_state`. It never imports ``pipeline/`` and needs
neither W&B nor a network: images are embedded as base64 ``data:`` URIs, curves are inline SVG
drawn here, and the page has no script at all, so it opens from a file, a mail attachment or a
CI artefact.

Modules: ``page`` (stylesheet, page frame, cards, tables, images, number format), ``charts``
(SVG curves and histograms), ``heatmaps`` (a sweep's heatmap PNGs), ``tsne_gif`` (the t-SNE
animation), ``run_page`` and ``sweep_page`` (the two pages), ``watching`` (writing the file,
``--watch``).
"""
from __future__ import annotations

from ..formats.records import final_values, latest_media, read_json, read_jsonl, read_metrics, tsne_frames
from ..formats.sweep_state import HEALTH_METRICS, STATE_FILE, SUMMARY_KEYS, is_sweep_dir, read_sweep_state, sweep_rows
from .charts import svg_chart, svg_histogram
from .heatmaps import heatmap_axes, heatmap_grid, heatmap_metrics, render_heatmap
from .page import DEFAULT_NAME
from .run_page import EVOLUTION_KEYS, MAIN_CURVES, render_run
from .sweep_page import render_sweep
from .tsne_gif import build_tsne_gif
from .watching import looks_finished, watch, write_dashboard

__all__ = ["write_dashboard", "watch", "looks_finished", "render_run", "render_sweep", "build_tsne_gif",
           "heatmap_grid", "heatmap_axes", "heatmap_metrics", "render_heatmap", "svg_chart", "svg_histogram",
           "DEFAULT_NAME", "MAIN_CURVES", "EVOLUTION_KEYS",
           # the readers, re-exported for old imports (their owners: monitors.formats.records, monitors.formats.sweep_state)
           "read_jsonl", "read_json", "read_metrics", "final_values", "latest_media", "tsne_frames",
           "is_sweep_dir", "read_sweep_state", "sweep_rows", "STATE_FILE", "HEALTH_METRICS", "SUMMARY_KEYS"]
