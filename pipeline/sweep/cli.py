"""``python -m pipeline sweep`` (called by pipeline/cli.py)."""
from __future__ import annotations

import argparse
import sys

from .local import run_sweep
from .wandb_agent import run_wandb_sweep


def run_sweep_cli(args: argparse.Namespace) -> int:
    """``python -m pipeline sweep FILE [--workers N] [--out DIR] [--wandb] [--count N]``."""
    try:
        if args.wandb:
            return run_wandb_sweep(args.file, args.out, workers=args.workers, count=args.count)
        rows = run_sweep(args.file, args.out, workers=args.workers, count=args.count)
    except KeyboardInterrupt:
        print("sweep interrupted; launch the same command again to run what is missing", file=sys.stderr)
        return 130
    failed = [r for r in rows if r["status"] != "finished"]
    if failed:
        print(f"{len(failed)} of {len(rows)} trial(s) did not finish: see their log.txt; "
              "launch the same command again to re-run only those", file=sys.stderr)
    return 1 if failed else 0
