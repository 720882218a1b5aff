"""Command line of the monitors package: ``python -m monitors dashboard PATH [--watch]`` and
``python -m monitors inspect PATH... [--key K] [--json] [--exp-dir DIR] [--trust-pickle]``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .audit.cli import add_parser as add_inspect_parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monitors", description="Tools that read the records and checkpoints of protowatch runs.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "dashboard", help="write a self-contained HTML dashboard of a run or a sweep",
        description=(
            "Write ONE self-contained HTML file (images embedded, curves as inline SVG, no script, "
            "no network) for a run's exp_dir (it has records/) or a sweep directory (it has "
            "sweep_state.json or trials/). For a run: summary, findings, prototype curves, the "
            "evolution heatmaps and the t-SNE animation (also saved as exp_dir/tsne/evolution.gif). "
            "For a sweep: the trial table, heatmaps of the sweep metric and of prototype health, "
            "and a section per trial (each trial also gets its own dashboard)."),
        epilog=(
            "--watch rewrites the file every --interval seconds while the run is live, and the page "
            "reloads itself as often. It stops on Ctrl-C, or by itself once the run is finished (a run: "
            "records/summary.json holds eval/eer; a sweep: no trial pending or running and summary.csv "
            "written) and no input file changed for two intervals; the last page written does not reload."))
    d.add_argument("path", help="a run's exp_dir or a sweep's --out directory")
    d.add_argument("--out", default=None, help="the HTML file to write (default: PATH/dashboard.html)")
    d.add_argument("--watch", action="store_true", help="keep rewriting the file while the run is live")
    d.add_argument("--interval", type=float, default=10.0,
                   help="seconds between two rewrites with --watch, and the page's reload period (default 10)")
    add_inspect_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        try:
            return args.func(args)
        except (FileNotFoundError, ValueError) as exc:  # UnsafeCheckpointError is a ValueError
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from .dashboard import watch, write_dashboard

    try:
        if args.watch:
            if args.interval <= 0:
                raise ValueError(f"--interval must be > 0 seconds, got {args.interval}")
            watch(args.path, args.out, interval=args.interval)
        else:
            out = write_dashboard(args.path, args.out)
            print(out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
