"""Overhead of ``attach(monitors="default")`` on a foreign SDPN-style loop, measured in one process.

One setup (student MLP + EMA teacher + free prototypes + Sinkhorn targets) runs in short blocks
of steps that alternate between the hub detached (bare) and attached, A B B A A B ..., so that
machine drift (other processes, CPU frequency) hits both alike; the first pair is warm-up. It
prints, for the attached/bare step time: the median of the per-pair ratios (target: at most
1.03), the ratio of the pooled medians, the ratio of the means (which include the log-interval
work; target: at most 1.05), and the monitors' own time per step as the hub measures it.

By default the benchmark re-runs itself with ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_MMAP_THRESHOLD_`` set so that both arms keep their memory, and prints the minor page
faults per step of each arm; ``--malloc system`` measures with glibc's defaults instead (why:
benchmarks/README.md, "Notes on measuring").

    python benchmarks/bench_attach.py                 # the default size
    python benchmarks/bench_attach.py --monitors none # the hooks and the hub alone
    python benchmarks/bench_attach.py --wandb         # include an offline W&B run as the sink
    python benchmarks/bench_attach.py --num-proto 65536 --dim 256 --pairs 12   # DINO's size
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.cli_args import positive  # noqa: E402
from monitors import attach  # noqa: E402


class Student(nn.Module):
    def __init__(self, in_dim: int, hidden: int, embed: int, out_dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                      nn.Linear(hidden, embed))
        self.head = nn.Sequential(nn.Linear(embed, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=-1)


def snn(z: torch.Tensor, P: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    return torch.softmax(F.normalize(z, dim=-1) @ F.normalize(P, dim=-1).T / tau, dim=-1)


@torch.no_grad()
def sinkhorn(t: torch.Tensor, iters: int = 3) -> torch.Tensor:
    q = t.T / t.sum()
    K, B = q.shape
    for _ in range(iters):
        q = q / (q.sum(dim=1, keepdim=True) * K)
        q = q / (q.sum(dim=0, keepdim=True) * B)
    return (q * B).T


class Setup:
    """One foreign training loop; ``step()`` is the user's unchanged step."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        self.args = args
        self.student = Student(args.in_dim, args.hidden, args.embed, args.dim)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        D = args.dim
        self.P = nn.Parameter(torch.empty(args.num_proto, D).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
        self.opt = torch.optim.SGD([{"params": self.student.parameters()},
                                    {"params": [self.P], "weight_decay": 0.0}], lr=0.05, momentum=0.9,
                                   weight_decay=5e-5)
        self.means = torch.randn(64, args.in_dim) * 2
        self.hub = None

    def step(self) -> None:
        a, B = self.args, self.args.batch
        x = self.means[torch.randint(64, (B,))] + torch.randn(B, a.in_dim)
        views = torch.cat([x + 0.3 * torch.randn_like(x) for _ in range(a.local_views)])
        p = snn(self.student(views), self.P)
        with torch.no_grad():
            t = sinkhorn(snn(self.teacher(x), self.P) ** 4).repeat(a.local_views, 1)
        mp = p.mean(0)
        loss = -(t * torch.log(p + 1e-8)).sum(1).mean() + (mp * torch.log(mp + 1e-8)).sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
                pt.mul_(0.996).add_(ps.detach(), alpha=0.004)


class _PerfSink:
    """Keeps the hub's own measure of the monitors' time per step."""

    def __init__(self) -> None:
        self.monitor_ms: list[float] = []

    def log_rows(self, rows) -> None:
        self.monitor_ms.extend(r["perf/monitor_ms"] for _, r in rows if "perf/monitor_ms" in r)

    def set_summary(self, values) -> None:
        pass

    def alert(self, finding) -> None:
        pass

    def close(self) -> None:
        pass


#: targets of the attached/bare ratios: the median of the pair ratios, and the ratio of the means
MEDIAN_TARGET, MEAN_TARGET = 1.03, 1.05

_KEEP_MEMORY = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(1 << 30)}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _read_twice_ms(P: torch.Tensor, reps: int = 21) -> float:
    """Median time of two fused reductions over P: the least any per-step statistic of P costs
    (the per-step work needs the prototypes, the snapshot and the gradient read about twice)."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        P.sum()
        P.sum()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=10, help="steps per block")
    ap.add_argument("--pairs", type=int, default=40, help="bare/attached block pairs (the first is warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--local-views", type=int, default=2)
    ap.add_argument("--in-dim", type=int, default=80)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--embed", type=int, default=256)
    ap.add_argument("--dim", type=positive, default=128, help="prototype dim D")
    ap.add_argument("--num-proto", type=positive, default=512, help="number of prototypes K")
    ap.add_argument("--capture", action="store_true", help="attach(capture='head'): assignments per step")
    ap.add_argument("--no-auto-capture", action="store_true",
                    help="attach(capture=False): without the capture found from model= (every 5 steps)")
    ap.add_argument("--full-every", type=positive, default=None,
                    help="attach(full_every=): whole-tensor statistics every n steps above 16,384 prototypes")
    ap.add_argument("--wandb", action="store_true", help="write an offline W&B run (else no sink)")
    ap.add_argument("--monitors", default="default", help="monitors to attach ('none': the hooks and hub only)")
    ap.add_argument("--malloc", choices=("keep", "system"), default="keep",
                    help="keep: glibc keeps freed memory (both arms alike, see benchmarks/README.md); system: glibc's defaults")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.malloc == "keep" and any(os.environ.get(k) != v for k, v in _KEEP_MEMORY.items()):
        # glibc reads these at start-up: run again with them set
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, **_KEEP_MEMORY})
    torch.set_num_threads(args.threads)

    # One model for both: blocks alternate between the hub detached (bare) and attached, so that
    # the two setups differ in nothing but the hooks.
    s = Setup(args)
    tmp = tempfile.mkdtemp(prefix="bench_attach_")
    extra = {"capture": "head"} if args.capture else ({"capture": False} if args.no_auto_capture else {})
    if args.full_every is not None:
        extra["full_every"] = args.full_every
    perf = _PerfSink()
    t_attach = time.perf_counter()
    s.hub = attach(s.opt, s.P, model=s.student, run=None if args.wandb else False,
                   dir=tmp, console=False, log_every=10, monitors=args.monitors, sinks=[perf], **extra)
    t_attach = time.perf_counter() - t_attach

    times: dict[str, list[float]] = {"bare": [], "attached": []}
    cpu: dict[str, list[float]] = {"bare": [], "attached": []}  # this thread's CPU time per step
    cpu_ratios: list[float] = []
    faults: dict[str, int] = {"bare": 0, "attached": 0}
    pair_ratios: list[float] = []
    for r in range(args.pairs):
        block_median = {}
        for name in ("bare", "attached") if r % 2 == 0 else ("attached", "bare"):
            if name == "bare":
                s.hub.detach()
            else:
                s.hub.reattach()
            ts, cs, f0 = [], [], _faults()
            for _ in range(args.block):
                t0, c0 = time.perf_counter(), time.thread_time()
                s.step()
                ts.append(time.perf_counter() - t0)
                cs.append(time.thread_time() - c0)
            block_median[name] = statistics.median(ts)
            block_median[name + "_cpu"] = statistics.median(cs)
            if r > 0:  # pair 0 is warm-up
                times[name] += ts
                cpu[name] += cs
                faults[name] += _faults() - f0
        if r > 0:
            pair_ratios.append(block_median["attached"] / block_median["bare"])
            cpu_ratios.append(block_median["attached_cpu"] / block_median["bare_cpu"])
    s.hub.close()

    n = len(times["bare"])
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    mean = {k: statistics.fmean(v) * 1000 for k, v in times.items()}
    print(f"steps per arm: {n} ({args.pairs - 1} block pairs of {args.block} after warm-up), K={args.num_proto} "
          f"D={args.dim}, hidden={args.hidden}, threads={args.threads}, monitors={args.monitors}, "
          f"sink={'wandb offline' if args.wandb else 'none'}, malloc={args.malloc}")
    for k in ("bare", "attached"):
        print(f"{k:9s} median {med[k]:7.2f} ms  mean {mean[k]:7.2f} ms  minor page faults {faults[k] / n:7.1f} per step")
    ratio = statistics.median(pair_ratios)
    mean_ratio = mean["attached"] / mean["bare"]
    met = ratio <= MEDIAN_TARGET and mean_ratio <= MEAN_TARGET
    print(f"ratio attached/bare: median of pair ratios {ratio:.3f}   pooled medians {med['attached'] / med['bare']:.3f}"
          f"   means {mean_ratio:.3f}   (target: median <= {MEDIAN_TARGET}, mean <= {MEAN_TARGET})"
          f" -> {'met' if met else 'MISSED'}")
    print(f"CPU time of the training thread (insensitive to being descheduled on a shared machine): "
          f"bare median {statistics.median(cpu['bare']) * 1000:.2f} ms, attached {statistics.median(cpu['attached']) * 1000:.2f} ms,"
          f" median of pair ratios {statistics.median(cpu_ratios):.3f}, means {statistics.fmean(cpu['attached']) / statistics.fmean(cpu['bare']):.3f}")
    if perf.monitor_ms:
        m = statistics.median(perf.monitor_ms)
        print(f"monitors' own time per step (hub perf/monitor_ms): median {m:.2f} ms = {m / med['bare']:.3f} of a bare step,"
              f" mean {statistics.fmean(perf.monitor_ms):.2f} ms")
    limit = _read_twice_ms(s.P.detach())
    print(f"physical limit: reading P ({args.num_proto} x {args.dim}, {s.P.numel() * s.P.element_size() / 1e6:.1f} MB)"
          f" twice takes {limit:.2f} ms here ({2 * s.P.numel() * s.P.element_size() / limit / 1e6:.1f} GB/s)"
          + (f"; the monitors' own time is {statistics.median(perf.monitor_ms) / limit:.1f}x that" if perf.monitor_ms else ""))
    print(f"attach() itself took {t_attach:.2f} s once (static checks; the heatmap monitor imports matplotlib then)."
          " Means include the log-interval work (the flush, heatmap renders at most every 60 s); background"
          " processes (W&B, t-SNE worker) are outside")
    print(f"findings: {sorted({f.code for f in s.hub.findings}) or 'none'}")


if __name__ == "__main__":
    main()
