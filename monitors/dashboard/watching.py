"""Writing a dashboard to its file, and ``--watch``: rewrite it while the run or the sweep is
live, and stop once it has finished."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..formats.records import TSNE_DIR, TSNE_GIF, atomic_write_bytes, read_summary, records_dir
from ..formats.sweep_state import STATE_FILE, SUMMARY_CSV, TRIALS_DIR, is_sweep_dir, read_sweep_state
from .page import DEFAULT_NAME
from .run_page import render_run
from .sweep_page import render_sweep


def write_dashboard(path: str | os.PathLike, out: Optional[str | os.PathLike] = None,
                    refresh: Optional[float] = None) -> Path:
    """Write the dashboard of a run or a sweep directory to ``out`` (default
    ``path/dashboard.html``), atomically, and return its path."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a directory: pass a run's exp_dir (with records/) or a sweep's --out directory")
    sweep = is_sweep_dir(p)
    if not sweep and not records_dir(p).is_dir() and not (p / TSNE_DIR).is_dir():
        raise FileNotFoundError(f"{p} has neither records/ (a run's exp_dir) nor {STATE_FILE} or {TRIALS_DIR}/ "
                                "(a sweep directory): point at one of those")
    page = render_sweep(p, refresh) if sweep else render_run(p, refresh)
    target = Path(out) if out is not None else p / DEFAULT_NAME
    atomic_write_bytes(target, page.encode("utf-8"))
    return target


def _fingerprint(path: Path, out: Path) -> tuple:
    """(name, size, mtime) of every input file; the dashboard's own outputs are left out."""
    items = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "wandb"]
        for f in files:
            if f == DEFAULT_NAME or f.endswith(".tmp") or f == TSNE_GIF or f.startswith("."):
                continue
            fp = Path(root) / f
            if fp == out:
                continue
            try:
                st = fp.stat()
            except OSError:
                continue
            items.append((str(fp), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))


def looks_finished(path: str | os.PathLike) -> bool:
    """A run whose summary holds its final ``eval/eer``; a sweep none of whose trials is pending
    or running and whose ``summary.csv`` is written."""
    p = Path(path)
    if is_sweep_dir(p):
        trials = (read_sweep_state(p).get("trials") or {}).values()
        return bool(trials) and (p / SUMMARY_CSV).is_file() and \
            all(t.get("status") in ("finished", "failed") for t in trials)
    return "eval/eer" in read_summary(records_dir(p))


def watch(path: str | os.PathLike, out: Optional[str | os.PathLike] = None, interval: float = 10.0,
          max_cycles: Optional[int] = None, log: Any = sys.stderr) -> Path:
    """Rewrite the dashboard every ``interval`` seconds (the page reloads itself as often).

    Stops on Ctrl-C, or by itself once the run looks finished (:func:`looks_finished`) and no
    input file changed for two intervals; ``max_cycles`` bounds the loop (tests)."""
    p = Path(path)
    target = Path(out) if out is not None else p / DEFAULT_NAME
    last_fp, unchanged, cycles, waiting = None, 0, 0, False
    try:
        while True:
            fp = _fingerprint(p, target) if p.is_dir() else ()
            if fp != last_fp or not target.exists():
                try:
                    write_dashboard(p, target, refresh=interval)
                except FileNotFoundError as exc:  # the run has not written anything yet
                    if not waiting:
                        print(f"dashboard: waiting for records ({exc})", file=log, flush=True)
                    waiting = True
                    fp = None
                else:
                    waiting = False
                    print(f"dashboard: wrote {target}", file=log, flush=True)
                unchanged = 0
            else:
                unchanged += 1
            last_fp = fp
            cycles += 1
            if unchanged >= 2 and looks_finished(p):
                write_dashboard(p, target, refresh=None)  # final page: stop reloading
                print(f"dashboard: the run finished and nothing changed for two intervals; final page {target}",
                      file=log, flush=True)
                break
            if max_cycles is not None and cycles >= max_cycles:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        try:
            write_dashboard(p, target, refresh=None)
            print(f"\ndashboard: stopped; final page {target}", file=log, flush=True)
        except FileNotFoundError:
            print("\ndashboard: stopped before the run wrote any records", file=log, flush=True)
    return target
