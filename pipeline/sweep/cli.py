"""``python -m pipeline sweep`` (called by pipeline/cli.py)."""
from __future__ import annotations

import argparse
import sys

from .local import run_sweep
from .spec import SweepError
from .wandb_agent import run_wandb_sweep

LAUNCHERS = ("local", "slurm")


def run_sweep_cli(args: argparse.Namespace) -> int:
    """``python -m pipeline sweep FILE [--workers N] [--out DIR] [--wandb] [--count N] [--launcher L] ...``."""
    if args.launcher not in LAUNCHERS:
        raise SweepError(f"unknown launcher {args.launcher!r}: use --launcher local (this machine) or slurm")
    try:
        if args.wandb:
            if args.launcher != "local":
                raise SweepError("--wandb starts W&B agents on this machine; to run agents as Slurm jobs, see the "
                                 "README (Sweeps on GPUs and Slurm)")
            return run_wandb_sweep(args.file, args.out, workers=args.workers, count=args.count, gpus=args.gpus,
                                   gpus_per_trial=args.gpus_per_trial)
        if args.launcher == "slurm":
            from .slurm import SlurmOptions, run_slurm_sweep

            rows = run_slurm_sweep(args.file, args.out, SlurmOptions.from_args(args), workers=args.workers,
                                   count=args.count, poll_s=args.poll_seconds)
        else:
            rows = run_sweep(args.file, args.out, workers=args.workers, count=args.count, gpus=args.gpus,
                             gpus_per_trial=args.gpus_per_trial, nproc_per_trial=args.nproc_per_trial)
    except KeyboardInterrupt:
        print("sweep interrupted; launch the same command again to run what is missing", file=sys.stderr)
        return 130
    failed = [r for r in rows if r["status"] != "finished"]
    if failed:
        print(f"{len(failed)} of {len(rows)} trial(s) did not finish: see their log.txt; "
              "launch the same command again to re-run only those", file=sys.stderr)
    return 1 if failed else 0
