"""Does a local sweep use the cores, or oversubscribe them? One run of this script times the same
2 x 2 grid (num_proto x output_dim) of experiments/sdpn_tiny.yaml (``max_steps`` 30, its own
``threads: 2`` left in place: the sweep must beat it) with ``--workers 1`` and ``--workers 2``,
each a fresh ``python -m pipeline sweep`` in a fresh directory, and prints both wall times and
their ratio (workers 2 / workers 1). At most 1.05 is the target (issue 28): two trials at once on
their share of the cores take no longer than one after another.

    python benchmarks/bench_sweep.py [--steps 30] [--order 1,2]

The synthetic corpus is generated before the clock starts. The first sweep of a process pays for
the imports of the first trials as the second does, so the order matters little; ``--order 2,1``
checks it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.cli_args import positive  # noqa: E402
from pipeline.build import resolve_data  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.sweep.budget import available_cores  # noqa: E402

TINY = ROOT / "experiments" / "sdpn_tiny.yaml"


def sweep_file(folder: Path, steps: int) -> Path:
    """The example sweep's grid on sdpn_tiny, ``max_steps`` ``steps``, no W&B."""
    cfg = {"name": "bench_sweep", "method": "grid", "metric": {"name": "eval/eer", "goal": "minimize"},
           "command": ["${env}", "${interpreter}", "-m", "pipeline", "train", "--config", str(TINY),
                       "${args_no_hyphens}"],
           "parameters": {"num_proto": {"values": [64, 256]}, "output_dim": {"values": [32, 64]},
                          "max_steps": {"value": steps}, "seed": {"value": 0}, "wandb_mode": {"value": "disabled"}}}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def timed_sweep(file: Path, out: Path, workers: int) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(file), "--workers", str(workers),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"the sweep with --workers {workers} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    budget = next((line for line in r.stdout.splitlines() if "each trial gets" in line), "?")
    print(f"--workers {workers}: {wall:.1f} s   ({budget.split('; ', 1)[-1]})", flush=True)
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive, default=30, help="max_steps of each trial")
    p.add_argument("--order", default="1,2", help="the worker counts, in the order they run")
    args = p.parse_args()
    order = [int(w) for w in args.order.split(",")]
    if sorted(order) != [1, 2]:
        p.error(f"--order must be 1,2 or 2,1, got {args.order!r}")
    resolve_data(load_config(TINY))  # the built-in corpus, before the clock
    print(f"{available_cores()} core(s); 2 x 2 grid of {TINY.name}, max_steps {args.steps}; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    walls: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        file = sweep_file(Path(tmp), args.steps)
        for w in order:
            walls[w] = timed_sweep(file, Path(tmp) / f"w{w}", w)
    print(f"ratio workers 2 / workers 1: {walls[2] / walls[1]:.3f}  (target <= 1.05; "
          f"load average after: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
