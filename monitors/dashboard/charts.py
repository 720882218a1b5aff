"""The dashboard's curves and histograms as inline SVG (no script, no library: the page opens
offline and stays small). Hand-written SVG is kept rather than matplotlib: a chart is a few
hundred bytes of text that scales, and the pages stay byte-for-byte what they were."""
from __future__ import annotations

import html
import math
from typing import Sequence

from .page import fmt


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
        parts.append(f'<text x="{pad_l - 4}" y="{y + 3:.1f}" text-anchor="end" class="tk">{e(fmt(v))}</text>')
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
                 f'last {e(fmt(last_v))} @ {last_s}</text>')
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
    parts.append(f'<text x="{pad_l}" y="{height - 8}" class="tk">{e(fmt(float(edges[0])))}</text>')
    parts.append(f'<text x="{pad_l + w}" y="{height - 8}" text-anchor="end" class="tk">{e(fmt(float(edges[-1])))}</text>')
    parts.append("</svg>")
    return "".join(parts)
