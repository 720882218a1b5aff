#!/usr/bin/env python
"""Check a dashboard HTML file as a person would see it.

    python scripts/check_dashboard.py runs/sdpn_tiny/dashboard.html [--screenshot shot.png] [--no-browser]

1. Files: every ``<img src>`` (and any other ``data:`` URI or local ``src``/``href``) resolves: a
   ``data:`` URI decodes to a valid PNG, GIF, JPEG or SVG; a local path exists; nothing is loaded
   from the network (the dashboard must open offline). Inline ``<svg>`` charts are well-formed XML.
2. Browser: headless Chromium opens the file, the DOM is rendered (``--dump-dom``), and the
   browser log shows no console message (the page has no script, so any is an error) and no
   failed load. ``--screenshot`` also saves a PNG of the page.

Exit code 0 when every check passes, 1 otherwise; one line of report on stdout. Chromium comes
from Debian's package (``apt-get install -y chromium``); without it the browser check fails
unless ``--no-browser`` is given.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--mute-audio"]


class _Refs(HTMLParser):
    """Collects (tag, attribute, value) of every src/href and the number of <img> tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        if tag == "img":
            self.images += 1
        for k, v in attrs:
            if k in ("src", "href", "poster", "data") and v is not None:
                self.refs.append((tag, k, v))


def _decode_data_uri(uri: str) -> tuple[str, bytes]:
    head, _, payload = uri.partition(",")
    mime = head[5:].split(";")[0].lower()
    if ";base64" in head:
        return mime, base64.b64decode(payload, validate=True)
    return mime, unquote(payload).encode("utf-8")


def _check_image_bytes(mime: str, data: bytes) -> Optional[str]:
    """None when ``data`` is a valid image of its type, else what is wrong."""
    if mime == "image/svg+xml":
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            return f"SVG does not parse ({exc})"
        return None if root.tag.endswith("svg") else f"SVG root is <{root.tag}>"
    expected = {"image/png": "PNG", "image/gif": "GIF", "image/jpeg": "JPEG"}.get(mime)
    if expected is None:
        return f"unexpected data type {mime!r}"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable: decode again
            im.load()
    except Exception as exc:  # Pillow raises many types for broken data
        return f"not a valid {expected} ({type(exc).__name__}: {exc})"
    if fmt != expected:
        return f"declared {expected} but is {fmt}"
    return None


def check_files(html_path: str | os.PathLike) -> tuple[bool, str]:
    """Check 1: every referenced image and local file; returns (ok, one-line report)."""
    path = Path(html_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return False, f"cannot read {path}: {exc}"
    parser = _Refs()
    parser.feed(text)
    problems: list[str] = []
    n_data = n_local = 0
    for tag, attr, value in parser.refs:
        where = f"<{tag} {attr}>"
        if value.startswith("data:"):
            n_data += 1
            try:
                mime, data = _decode_data_uri(value)
            except (binascii.Error, ValueError) as exc:
                problems.append(f"{where} data URI does not decode ({exc})")
                continue
            err = _check_image_bytes(mime, data) if mime.startswith("image/") else None
            if err:
                problems.append(f"{where} {err}")
            continue
        if value.startswith("#") or value.startswith("mailto:"):
            continue
        u = urlparse(value)
        if u.scheme in ("http", "https", "ftp") or value.startswith("//"):
            if tag == "a":
                continue  # a plain link does not load anything
            problems.append(f"{where} loads from the network: {value[:80]}")
            continue
        local = Path(unquote(u.path)) if u.scheme in ("", "file") else None
        if local is None:
            problems.append(f"{where} unknown scheme: {value[:80]}")
            continue
        n_local += 1
        target = local if local.is_absolute() else path.parent / local
        if not target.exists():
            problems.append(f"{where} {value} does not exist")
        elif tag == "img":
            mime = {".png": "image/png", ".gif": "image/gif", ".svg": "image/svg+xml",
                    ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(target.suffix.lower(), "")
            err = _check_image_bytes(mime, target.read_bytes())
            if err:
                problems.append(f"{where} {value}: {err}")
    n_svg = 0
    for m in re.finditer(r"<svg\b.*?</svg>", text, flags=re.S):
        n_svg += 1
        try:
            ET.fromstring(m.group(0))
        except ET.ParseError as exc:
            problems.append(f"inline <svg> #{n_svg} is not well-formed ({exc})")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return False, f"FAIL files: {'; '.join(problems[:3])}{more}"
    return True, (f"ok files: {parser.images} <img> ({n_data} data URIs, {n_local} local files) and "
                  f"{n_svg} inline SVG charts are valid")


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _console_errors(stderr: str) -> list[str]:
    bad = []
    for line in stderr.splitlines():
        if "CONSOLE" in line or "Uncaught" in line or "net::ERR_" in line:
            bad.append(line.strip()[:200])
    return bad


def check_chromium(html_path: str | os.PathLike, screenshot: Optional[str | os.PathLike] = None,
                   width: int = 1280, height: int = 2000, timeout: float = 120.0,
                   chromium: Optional[str] = None) -> tuple[bool, str]:
    """Check 2: headless Chromium renders the page with no console error; returns (ok, report)."""
    exe = chromium or find_chromium()
    if exe is None:
        return False, "FAIL browser: Chromium is not installed (apt-get install -y chromium)"
    path = Path(html_path).resolve()
    url = path.as_uri()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        base = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        try:
            dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"FAIL browser: Chromium did not finish within {timeout:.0f} s"
        errors = _console_errors(dom.stderr)
        shot_note = ""
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            shot.parent.mkdir(parents=True, exist_ok=True)
            try:
                r = subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, text=True,
                                   timeout=timeout)
            except subprocess.TimeoutExpired:
                return False, f"FAIL browser: the screenshot did not finish within {timeout:.0f} s"
            errors += _console_errors(r.stderr)
            if r.returncode != 0 or not shot.is_file():
                return False, f"FAIL browser: no screenshot (exit {r.returncode}): {r.stderr.strip()[-200:]}"
            shot_note = f", screenshot {shot}"
    if dom.returncode != 0:
        return False, f"FAIL browser: Chromium exited with {dom.returncode}: {dom.stderr.strip()[-300:]}"
    if errors:
        return False, f"FAIL browser: {len(errors)} console/load error(s): {errors[0]}"
    body = re.search(r"<body[^>]*>(.*)</body>", dom.stdout, flags=re.S)
    if body is None or len(re.sub(r"<[^>]+>", "", body.group(1)).strip()) < 20:
        return False, "FAIL browser: the rendered DOM has no body text"
    n_img = len(re.findall(r"<img\b", dom.stdout))
    n_svg = len(re.findall(r"<svg\b", dom.stdout))
    return True, f"ok browser: rendered {len(dom.stdout)} characters of DOM ({n_img} images, {n_svg} SVG){shot_note}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("html", help="the dashboard HTML file")
    p.add_argument("--screenshot", default=None, help="also save a PNG screenshot of the page here")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=2000)
    p.add_argument("--no-browser", action="store_true", help="only the file checks (no Chromium)")
    args = p.parse_args(argv)
    ok, report = check_files(args.html)
    reports = [report]
    if ok and not args.no_browser:
        ok, report = check_chromium(args.html, args.screenshot, args.width, args.height)
        reports.append(report)
    print(("OK " if ok else "FAIL ") + args.html + ": " + "; ".join(reports))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
