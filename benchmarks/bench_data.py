"""What the streaming data path costs, measured in one run of this script.

Part 1, memory and startup: Kaldi dirs of 2,000 and 40,000+ utterances whose wav.scp lines
point at the built-in corpus's WAV files (3 s, 16-bit; generated once), each trained for a few
steps of the default config in a fresh process (num_workers=0: everything in that process).
Prints the peak RSS, the time from process start to the end of step 1, and their 40k/2k ratios.
Then the time to read a 1,000,000-line wav.scp + utt2spk (read_train_list: no file is opened)
and the memory that list holds.

Part 2, loader throughput: items/s of the DataLoader at the published crop config (1 x 4 s
global + 4 x 2 s local crops, noise at 60 %, Fbank), batches of 96, with 0, 1 and 2 workers.

Part 3, data wait: short trainings of the default config with num_workers 0, 1 and 2: steps/s
and the share of the loop's wall time spent waiting for the next batch (data/wait_share).

    python benchmarks/bench_data.py [--big 40000] [--batches 4] [--steps 40] [--parts 1,2,3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from monitors import Monitor  # noqa: E402
from monitors.formats.records import METRICS_FILE, RECORDS_DIR, STEP_KEY  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import SDPNTrainSet, ensure_synthetic_corpus, read_kaldi_dir, read_train_list  # noqa: E402
from pipeline.loader import TrainFeed  # noqa: E402

CONFIG = ROOT / "experiments/sdpn_tiny.yaml"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def builtin_train_dir() -> Path:
    cfg = load_config(CONFIG)
    return ensure_synthetic_corpus(cfg.data_cache, seed=cfg.corpus_seed, num_train_speakers=cfg.num_train_speakers,
                                   num_eval_speakers=cfg.num_eval_speakers, utts_per_speaker=cfg.utts_per_speaker,
                                   utt_seconds=cfg.utt_seconds)["train"]


def make_dir(out: Path, n: int, src: Path, spk_size: int = 20) -> Path:
    """n utterances (speakers of spk_size utterances) whose paths cycle over src's WAV files."""
    wavs = list(read_kaldi_dir(src).wavs.values())
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "wav.scp", "w") as scp, open(out / "utt2spk", "w") as u2s:
        for i in range(n):
            utt = f"spk{i // spk_size:06d}-u{i:07d}"
            scp.write(f"{utt} {wavs[i % len(wavs)]}\n")
            u2s.write(f"{utt} spk{i // spk_size:06d}\n")
    return out


class _FirstStep(Monitor):
    name = "first_step"

    def __init__(self) -> None:
        super().__init__(1)
        self.seconds = None

    def on_step_end(self, ctx) -> None:
        if self.seconds is None:
            self.seconds = time.perf_counter() - T_START


def child_rss(data: str, steps: int, exp_dir: str) -> None:
    """One short training in this (fresh) process; prints JSON."""
    from pipeline.train import train

    mon = _FirstStep()
    cfg = load_config(CONFIG, [f"data={data}", "eval_data=", f"max_steps={steps}", "monitors=none",
                               "wandb_mode=disabled", "progress=false", f"exp_dir={exp_dir}", "num_workers=0",
                               "ckpt_every=100000"])
    train(cfg, extra_monitors=[mon])
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "first_step_s": mon.seconds}))


def child_list(data: str) -> None:
    before = peak_rss_mb()
    t0 = time.perf_counter()
    tl = read_train_list(data)
    dt = time.perf_counter() - t0
    print(json.dumps({"n": len(tl.paths), "read_s": dt, "peak_rss_mb": peak_rss_mb(), "before_mb": before}))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part1(tmp: Path, big: int, steps: int) -> None:
    src = builtin_train_dir()
    rows = {}
    for n in (2000, big):
        d = make_dir(tmp / f"dir{n}", n, src)
        rows[n] = run_child("--child-rss", str(d), "--steps", str(steps), "--exp-dir", str(tmp / f"run{n}"))
        print(f"  {n:>7} utterances: peak RSS {rows[n]['peak_rss_mb']:7.1f} MB, "
              f"start to end of step 1 {rows[n]['first_step_s']:5.2f} s", flush=True)
    a, b = rows[2000], rows[big]
    print(f"  ratio {big}/2000: peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}x, "
          f"time to first step {b['first_step_s'] / a['first_step_s']:.3f}x")
    d = make_dir(tmp / "dir1m", 1_000_000, src, spk_size=100)
    r = run_child("--child-list", str(d))
    print(f"  1,000,000-line wav.scp + utt2spk: read in {r['read_s']:.2f} s, peak RSS {r['before_mb']:.0f} -> "
          f"{r['peak_rss_mb']:.0f} MB while reading; the list holds "
          f"{(d / 'wav.scp').stat().st_size / 1e6:.0f} MB of wav.scp as two numpy arrays", flush=True)


def part2(tmp: Path, batches: int) -> None:
    d = builtin_train_dir()
    # the published crops: max_frames 400 (4 s global), 4 x 2 s local, aug_prob 0.6
    ds = SDPNTrainSet(d, max_frames=400, glb_num=1, local_num=4, aug_prob=0.6)
    bs = 96
    per_epoch = len(ds) // bs
    rates = {}
    for w in (0, 1, 2):
        feed = TrainFeed(ds, batch_size=bs, per_epoch=per_epoch, seed=0, rank=0, world=1, device=torch.device("cpu"),
                         num_workers=w, prefetch_factor=2)
        it = feed.batches(0, batches + 1)
        next(it)  # workers started, first batch
        t0 = time.perf_counter()
        n = sum(b["global"].shape[0] for b in it)
        rates[w] = n / (time.perf_counter() - t0)
        print(f"  num_workers={w}: {rates[w]:6.1f} items/s ({1000 * bs / rates[w]:.0f} ms per batch of {bs})", flush=True)
    print(f"  ratio to num_workers=0: 1 worker {rates[1] / rates[0]:.2f}x, 2 workers {rates[2] / rates[0]:.2f}x "
          f"(on {os.cpu_count()} cores)")


def part3(tmp: Path, steps: int) -> None:
    from pipeline.train import train

    for w in (0, 1, 2):
        cfg = load_config(CONFIG, ["eval_data=", f"max_steps={steps}", "monitors=none", "wandb_mode=disabled",
                                   "progress=false", f"exp_dir={tmp / f'wait{w}'}", f"num_workers={w}",
                                   "ckpt_every=100000"])
        t0 = time.perf_counter()
        res = train(cfg)
        rows = [json.loads(l) for l in (tmp / f"wait{w}" / RECORDS_DIR / METRICS_FILE).read_text().splitlines()]
        step_ms = statistics.median(r["perf/step_ms"] for r in rows if "perf/step_ms" in r and r[STEP_KEY] > 2)
        print(f"  num_workers={w}: median step {step_ms:.0f} ms ({1000 / step_ms:.2f} steps/s), data wait "
              f"{100 * res['data/wait_share']:.1f} % of the loop ({time.perf_counter() - t0:.0f} s run)", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big", type=int, default=40000, help="utterances of the large dir")
    p.add_argument("--steps", type=int, default=40, help="training steps of part 3 (part 1: 3)")
    p.add_argument("--batches", type=int, default=4, help="batches of 96 timed per worker count (part 2)")
    p.add_argument("--parts", default="1,2,3")
    p.add_argument("--child-rss", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-list", default=None, help=argparse.SUPPRESS)
    p.add_argument("--exp-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_rss:
        child_rss(args.child_rss, 3, args.exp_dir)
        return 0
    if args.child_list:
        child_list(args.child_list)
        return 0
    parts = {int(x) for x in args.parts.split(",")}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        if 1 in parts:
            print("part 1: peak RSS and time to the first step (default config, 3 steps, num_workers=0)", flush=True)
            part1(Path(tmp), args.big, 3)
        if 2 in parts:
            print("part 2: loader items/s at the published crops (1 x 4 s + 4 x 2 s, aug 0.6), batch 96", flush=True)
            part2(Path(tmp), args.batches)
        if 3 in parts:
            print(f"part 3: data wait in short trainings of the default config ({args.steps} steps)", flush=True)
            part3(Path(tmp), args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
