"""``python -m monitors inspect PATH... [--key K] [--json] [--exp-dir DIR] [--trust-pickle]``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to the ``python -m monitors`` parser."""
    p = sub.add_parser(
        "inspect", help="audit saved checkpoints: were the prototypes saved, did they move, drift, collapse?",
        description=(
            "Read a series of checkpoints (files, or directories of them: ordered by the step or epoch in "
            "their names, else by time; one in memory at a time, memory-mapped) of any trainer (this "
            "project's, Lightning .ckpt, 3D-Speaker, WeSpeaker model_<epoch>.pt, DINO checkpoint.pth, a bare "
            "state_dict). Finds the prototypes by name and shape (prototypes, prototypes.weight, last_layer, "
            "weight_v/weight_g, parametrizations.weight.original0/1) and a teacher copy, and reports norms, "
            "non-finite values, the largest cosine and near-duplicates, movement, drift, whether the rest of "
            "the model and the teacher moved, and the findings of a live run."),
        epilog=("Checkpoints are loaded with weights_only=True (no pickle code runs) and an allowlist of plain "
                "types (numpy scalars and dtypes, argparse.Namespace). Exit code: 0, 1 when a finding is an "
                "error, 2 for bad input."))
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files or directories")
    p.add_argument("--key", default=None, help="the prototypes' tensor, e.g. head.prototypes (when not found by name)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--exp-dir", default=None,
                   help="also write local records and an offline W&B run here (python -m monitors dashboard DIR)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load files that need arbitrary pickle (code in them runs; only for trusted sources)")
    p.add_argument("--dup-cosine", type=float, default=0.99, help="near-duplicate cosine (default 0.99)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Inspect, print, write; the exit code."""
    from .inspect import inspect_series
    from .output import check_exp_dir, format_table, write_exp_dir

    def progress(i: int, n: int, path: str) -> None:
        if n >= 5 and not args.quiet:
            end = "\n" if i == n or not sys.stderr.isatty() else "\r"
            print(f"inspect: [{i}/{n}] {path}".ljust(60) if path else f"inspect: [{n}/{n}] done".ljust(60),
                  end=end, file=sys.stderr, flush=True)

    if args.exp_dir:
        check_exp_dir(args.exp_dir)  # before the work, not after it
    report = inspect_series(args.paths, key=args.key, trust_pickle=args.trust_pickle, dup_cosine=args.dup_cosine,
                            progress=progress)
    run_dir = write_exp_dir(report, args.exp_dir) if args.exp_dir else None
    if args.json:
        out = report.to_dict()
        if run_dir:
            out["wandb_run_dir"] = run_dir
        print(json.dumps(out, indent=1, default=str))
    else:
        print(format_table(report))
        if args.exp_dir:
            print(f"records: {args.exp_dir}/records, W&B offline run: {run_dir}; "
                  f"dashboard: python -m monitors dashboard {args.exp_dir}")
    return 1 if any(f.severity == "error" for f in report.findings) else 0
