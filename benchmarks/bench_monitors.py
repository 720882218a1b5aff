"""What the monitors cost the reference pipeline, measured in one run of this script.

Part 1, step time: short trainings of the default config (experiments/sdpn_tiny.yaml) in
interleaved rounds, so that machine noise hits every variant alike:
  none        no monitors
  default     the default monitors at their default cadences
  every_step  every monitor at every step (t-SNE aside: its frames are not per-step work)
  watch       no monitors, wandb.watch(model, log="all", log_freq=1) instead
The median of perf/step_ms (the wall time of a whole step: data, compute, monitors, logging)
over all rounds, and its ratio to `none`, are printed.

Part 2, t-SNE: the wall time of the whole default run with its t-SNE frames against the same run
without them (two full trainings in subprocesses; --skip-full leaves them out).

    python benchmarks/bench_monitors.py [--steps 40] [--rounds 3] [--skip-full] [--num-proto K] [--dim D]

``--num-proto`` and ``--dim`` set the config's ``num_proto`` and ``output_dim`` (the prototypes
are (num_proto, output_dim)) in every variant and in part 2.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli_args import positive  # noqa: E402

from monitors.formats.records import METRICS_FILE, RECORDS_DIR, STEP_KEY  # noqa: E402
from monitors.core.registry import DEFAULT  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.train import train  # noqa: E402

CONFIG = ROOT / "experiments/sdpn_tiny.yaml"
NO_TSNE = "[" + ",".join(n for n in DEFAULT if n != "tsne") + "]"
EVERY_STEP = "{" + ", ".join(
    f"{n}: {{every_n_steps: 1}}" for n in DEFAULT if n != "tsne") + "}"
VARIANTS = {
    "none": ["monitors=none"],
    "default": ["monitors=default"],
    "every_step": [f"monitors={EVERY_STEP}"],
    "watch": ["monitors=none", "wandb_watch=all", "wandb_watch_freq=1"],
}


def step_times(exp_dir: Path, skip: int) -> list[float]:
    rows = [json.loads(l) for l in (exp_dir / RECORDS_DIR / METRICS_FILE).read_text().splitlines()]
    return [r["perf/step_ms"] for r in rows if "perf/step_ms" in r and r[STEP_KEY] > skip]


def size_overrides(num_proto: Optional[int], dim: Optional[int]) -> list[str]:
    return ([f"num_proto={num_proto}"] if num_proto else []) + ([f"output_dim={dim}"] if dim else [])


def part1(steps: int, rounds: int, tmp: Path, size: Sequence[str] = ()) -> dict[str, float]:
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for v in order:
            exp = tmp / f"{v}_{r}"
            cfg = load_config(CONFIG, [f"max_steps={steps}", "eval_data=", "eval_at_init=false",
                                       "progress=false", f"exp_dir={exp}", "ckpt_every=100000",
                                       *size, *VARIANTS[v]])
            train(cfg)
            times[v] += step_times(exp, skip=3)
            print(f"  round {r} {v:<10} median step {statistics.median(step_times(exp, 3)):7.1f} ms", flush=True)
    return {v: statistics.median(t) for v, t in times.items()}


def full_run(tmp: Path, name: str, monitors: str, size: Sequence[str] = ()) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(CONFIG), f"exp_dir={tmp / name}",
                    f"monitors={monitors}", "progress=false", *size], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="steps per short training (part 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (part 1)")
    p.add_argument("--skip-full", action="store_true", help="leave out part 2 (two full default runs)")
    p.add_argument("--num-proto", type=positive, default=None, help="number of prototypes K (config num_proto)")
    p.add_argument("--dim", type=positive, default=None, help="prototype dimension D (config output_dim)")
    args = p.parse_args()
    size = size_overrides(args.num_proto, args.dim)
    with tempfile.TemporaryDirectory(prefix="bench_monitors_") as d:
        tmp = Path(d)
        print(f"part 1: {args.rounds} rounds x {len(VARIANTS)} variants x {args.steps} steps of {CONFIG.name}"
              + (f" with {' '.join(size)}" if size else ""))
        med = part1(args.steps, args.rounds, tmp, size)
        print("\nmedian step time (ms) and ratio to unmonitored:")
        for v, m in med.items():
            print(f"  {v:<11} {m:8.1f} ms   {m / med['none']:.3f}x")
        if not args.skip_full:
            print("\npart 2: the whole default run with and without t-SNE frames")
            without = full_run(tmp, "no_tsne", NO_TSNE, size)
            with_tsne = full_run(tmp, "with_tsne", "default", size)
            print(f"  without t-SNE {without:7.1f} s")
            print(f"  with t-SNE    {with_tsne:7.1f} s   {with_tsne / without:.3f}x")


if __name__ == "__main__":
    main()
