"""Memory and time of ``python -m monitors inspect`` over a long series of large checkpoints.

Writes N checkpoints (default 20) with K = 65,536 prototypes of dimension D = 256, a student and a
teacher backbone and SGD momentum buffers (this project's layout) to a temporary directory, in a
child process, so that writing them does not raise this process's high-water mark. Then, in this
process: the baseline (``VmHWM`` of /proc/self/status once the imports are done), the inspection
of the series, and the peak RSS increase (``VmHWM`` after minus the baseline) against the size of
one file. Target: the ratio at about 2x or below (memory holds about one checkpoint at a time; the
files are memory-mapped, and mapped pages that are read count in RSS too).

    python benchmarks/bench_inspect.py [--num 20] [--num-proto 65536] [--dim 256] [--keep DIR]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM: the peak resident set; VmRSS: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def write_series(out: Path, num: int, K: int, D: int, backbone: int) -> None:
    """The child: N checkpoints of a run whose prototypes and backbone move a little each time."""
    import torch

    g = torch.Generator().manual_seed(0)
    student = {f"backbone.layer{i}.weight": torch.randn(backbone, backbone, generator=g) * 0.02 for i in range(8)}
    teacher = {k: v.clone() for k, v in student.items()}
    P = torch.empty(K, D).uniform_(-D ** -0.5, D ** -0.5, generator=g)
    names = [*student, "prototypes"]
    for i in range(num):
        for k in student:
            student[k] += 1e-3 * torch.randn(backbone, backbone, generator=g)
            teacher[k].mul_(0.99).add_(student[k], alpha=0.01)
        P += 1e-3 * torch.randn(K, D, generator=g)
        tensors = [*student.values(), P]
        state = {"student": student, "teacher": teacher, "prototypes": P, "step": 100 * i,
                 "optimizer": {"state": {j: {"momentum_buffer": 1e-3 * t} for j, t in enumerate(tensors)},
                               "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": list(range(len(names)))}]}}
        torch.save(state, out / f"checkpoint-{100 * i}.pt")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=20, help="checkpoints in the series (default 20)")
    ap.add_argument("--num-proto", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--backbone", type=int, default=512, help="side of each of 8 square backbone matrices")
    ap.add_argument("--keep", default=None, help="write the series here and keep it (default: a temporary dir)")
    ap.add_argument("--write-only", default=None, help=argparse.SUPPRESS)  # the child
    args = ap.parse_args()
    if args.write_only:
        write_series(Path(args.write_only), args.num, args.num_proto, args.dim, args.backbone)
        return 0

    import torch  # noqa: F401  (the imports inspection needs, before the baseline)

    from monitors.audit.inspect import inspect_series

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_inspect_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-only", str(work), "--num", str(args.num),
                        "--num-proto", str(args.num_proto), "--dim", str(args.dim),
                        "--backbone", str(args.backbone)], check=True)
        t_write = time.perf_counter() - t0
        sizes = [p.stat().st_size for p in work.glob("checkpoint-*.pt")]
        one = max(sizes)
        base = vm_kib("VmHWM") * 1024
        t0 = time.perf_counter()
        report = inspect_series([work])
        t_inspect = time.perf_counter() - t0
        peak = vm_kib("VmHWM") * 1024
        inc = peak - base
        bad = [str(f) for f in report.findings if f.severity != "info"]
        print(f"series: {len(sizes)} checkpoints, K={args.num_proto}, D={args.dim}, one file {one / 2**20:.1f} MiB "
              f"(written in {t_write:.1f} s)")
        print(f"inspect: {t_inspect:.1f} s ({t_inspect / len(sizes):.2f} s a checkpoint)")
        print(f"RSS: baseline after imports {base / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, "
              f"increase {inc / 2**20:.0f} MiB")
        print(f"peak RSS increase / one file size: {inc / one:.2f} (target <= ~2)")
        print(f"findings at warning or error: {bad or 'none'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
