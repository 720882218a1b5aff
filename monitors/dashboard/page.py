"""The HTML shared by the dashboard's pages: the stylesheet, the page frame, cards, tables,
embedded images, and the number format of every cell and label."""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

#: the file a dashboard is written to inside the run's or the sweep's directory
DEFAULT_NAME = "dashboard.html"


def fmt(v: Any) -> str:
    """A value as the dashboard shows it: 4 significant digits, scientific when very large or small."""
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


CSS = """
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


def data_uri(path: str | os.PathLike) -> Optional[str]:
    """The file as a base64 ``data:`` URI (PNG, GIF, SVG, JPEG); None if unreadable, empty or another type."""
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


def png_uri(png: bytes) -> str:
    """PNG bytes as a base64 ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(uri: Optional[str], alt: str, caption: str = "", width: Optional[int] = None) -> str:
    """A figure with the image and its caption; "" without an image."""
    if not uri:
        return ""
    wa = f' width="{width}"' if width else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img class="fig" src="{uri}" alt="{html.escape(alt)}"{wa}>{cap}</figure>'


def page(title: str, body: str, refresh: Optional[float]) -> str:
    """The whole HTML document; with ``refresh`` it reloads itself every ``refresh`` seconds."""
    meta = f'<meta http-equiv="refresh" content="{max(1, int(round(refresh)))}">' if refresh else ""
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{meta}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f'<p class="sub">written by <code>python -m monitors dashboard</code> at {now}'
            f'{" (watching: this page reloads itself)" if refresh else ""}</p>\n</body></html>\n')


def cards(items: Iterable[tuple[str, Any, str]]) -> str:
    """A row of cards, one per ``(label, value, css class)``; an empty value shows a dash."""
    out = ['<div class="cards">']
    for k, v, cls in items:
        out.append(f'<div class="card"><div class="k">{html.escape(k)}</div>'
                   f'<div class="v {cls}">{html.escape(fmt(v)) if v not in (None, "") else "&ndash;"}</div></div>')
    out.append("</div>")
    return "".join(out)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], classes: Optional[Sequence[Sequence[str]]] = None) -> str:
    """An HTML table; cells are formatted with :func:`fmt` and escaped unless they are :class:`Raw`."""
    heads = (html.escape(c).replace("/", "/<wbr>") for c in columns)  # long metric names may wrap
    out = ['<div class="tw"><table><thead><tr>', *(f"<th>{c}</th>" for c in heads), "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        out.append("<tr>")
        for j, v in enumerate(r):
            cls = (classes[i][j] if classes else "") or ("num" if isinstance(v, (int, float)) and not isinstance(v, bool) else "")
            out.append(f'<td class="{cls}">{v if isinstance(v, Raw) else html.escape(fmt(v))}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


class Raw(str):
    """HTML that a table cell holds as is."""
