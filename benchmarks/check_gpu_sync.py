"""Check on a GPU that the monitors make no host-device synchronisation between log intervals.

Trains the default config on CUDA with every monitor's per-step hooks (on_after_backward,
on_before_optimizer_step, on_after_optimizer_step, on_step_end) run under
``torch.cuda.set_sync_debug_mode("error")``: any .item(), .cpu(), nonzero(), tensor truth test
... inside them raises, and the hub then switches that monitor off and records MONITOR_FAILED.
``on_log`` (the log interval) and the non-step events are allowed to read device values and are
not wrapped. Prints the number of checked hook calls and exits 1 if any monitor synchronised.

    python benchmarks/check_gpu_sync.py [--steps 60] [--every-step] [--num-proto 65536 --dim 256]

With ``--num-proto``/``--dim`` (DINO's 65,536 x 256) it also prints the time to read P twice
on the device and the per-step monitor time as a multiple of it (target: within 3x).

Then the same for ``attach()`` on a foreign loop (see :func:`attach_phase`).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitors import hub as hub_module  # noqa: E402
from monitors.events import STEP_EVENTS  # noqa: E402
from monitors.registry import DEFAULT  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.train import train  # noqa: E402


def _read_twice_ms(P: torch.Tensor, reps: int = 50) -> float:
    """Median device time of two fused reductions over P (CUDA events)."""
    P.sum()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        P.sum()
        P.sum()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every-step", action="store_true", help="run every monitor at every step")
    p.add_argument("--exp-dir", default="/tmp/check_gpu_sync")
    p.add_argument("--num-proto", type=_positive, default=None, help="number of prototypes K (config num_proto)")
    p.add_argument("--dim", type=_positive, default=None, help="prototype dimension D (config output_dim)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 2

    checked: collections.Counter[str] = collections.Counter()
    seconds: collections.Counter[str] = collections.Counter()
    events: list = []  # (monitor, start event, end event) of every checked hook call
    original = hub_module.MonitorHub._call

    def strict_call(self, monitor, hook, ctx):
        if hook not in STEP_EVENTS:
            return original(self, monitor, hook, ctx)
        torch.cuda.set_sync_debug_mode("error")
        t0 = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()  # device time of the hook's kernels: read after training (no sync here)
        try:
            return original(self, monitor, hook, ctx)
        finally:
            end.record()
            events.append((monitor.name, start, end))
            seconds[monitor.name] += time.perf_counter() - t0
            torch.cuda.set_sync_debug_mode("default")
            checked[monitor.name] += 1

    hub_module.MonitorHub._call = strict_call
    monitors = "{" + ", ".join(f"{n}: {{every_n_steps: 1}}" for n in DEFAULT if n != "tsne") + ", tsne: {}}" \
        if args.every_step else "default"
    cfg = load_config(ROOT / "experiments/sdpn_tiny.yaml", [
        "device=cuda", f"max_steps={args.steps}", "epochs=1000", "wandb_mode=disabled", "progress=false",
        f"exp_dir={args.exp_dir}", "eval_at_init=false", "threads=4", f"monitors={monitors}",
        *([f"num_proto={args.num_proto}"] if args.num_proto else []),
        *([f"output_dim={args.dim}"] if args.dim else [])])
    res = train(cfg)
    failed = [f for f in res["findings"] if "MONITOR_FAILED" in f]
    print(f"device {torch.cuda.get_device_name()}; {res['step']} steps; log every {cfg.log_every} steps")
    for name, n in sorted(checked.items()):
        print(f"  {name:<11} {n:5d} per-step hook calls under sync_debug_mode=error, "
              f"{1000 * seconds[name] / n:.3f} ms/call")
    torch.cuda.synchronize()
    device_ms: collections.Counter[str] = collections.Counter()
    for name, start, end in events:
        device_ms[name] += start.elapsed_time(end)
    steps = max(1, res["step"])
    per_step = sum(device_ms.values()) / steps
    print("  device time per step: " + ", ".join(f"{n} {v / steps:.3f} ms" for n, v in sorted(device_ms.items())))
    P = torch.empty(cfg.num_proto, cfg.output_dim, device="cuda")
    limit = _read_twice_ms(P)
    print(f"K={cfg.num_proto} D={cfg.output_dim}: per-step monitor hooks {per_step:.3f} ms of device time a step"
          f" (host {sum(seconds.values()) * 1000 / steps:.3f} ms); reading P twice {limit:.3f} ms "
          f"({2 * P.numel() * 4 / limit / 1e6:.0f} GB/s): {per_step / limit:.2f}x (target <= 3x)")
    if failed:
        print("SYNC FOUND:\n  " + "\n  ".join(failed))
        return 1
    print(f"no host-device synchronisation in {sum(checked.values())} per-step monitor hook calls")
    return attach_phase(args.steps)


def attach_phase(steps: int, device: str = "cuda") -> int:
    """attach() on a foreign SDPN-style loop on the GPU (automatic capture, a declared freeze, an
    EMA teacher): every step runs under sync_debug_mode="error" except the log-interval flush, so
    the hooks attach() adds (the capture, the assignments, the new checks) are covered too. The
    loop itself is written not to synchronise."""
    import copy
    import math

    import torch.nn.functional as F
    from torch import nn

    from monitors import attach

    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(80, 256), nn.GELU(), nn.Linear(256, 128)).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    P = nn.Parameter(torch.empty(512, 128, device=device).uniform_(-1 / math.sqrt(128), 1 / math.sqrt(128)))
    opt = torch.optim.SGD([{"params": student.parameters()}, {"params": [P], "weight_decay": 0.0}], lr=0.1,
                          momentum=0.9)
    hub = attach(opt, P, model=student, teacher=teacher, freeze_steps=5, run=False, console=False,
                 tsne={"background": False})
    strict = device == "cuda"
    original_flush = hub_module.MonitorHub.flush

    def lenient_flush(self):  # the log interval may read device values
        if strict:
            torch.cuda.set_sync_debug_mode("default")
        try:
            return original_flush(self)
        finally:
            if strict:
                torch.cuda.set_sync_debug_mode("error")

    hub_module.MonitorHub.flush = lenient_flush
    x_all = torch.randn(steps, 96, 80, device=device)
    error: Exception | None = None
    if strict:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(steps):
            x = x_all[step]
            p = torch.softmax(F.normalize(student(x), dim=-1) @ F.normalize(P, dim=-1).T / 0.1, dim=-1)
            with torch.no_grad():
                t = torch.softmax(F.normalize(teacher(x), dim=-1) @ F.normalize(P, dim=-1).T / 0.025, dim=-1)
            loss = -(t * torch.log(p + 1e-8)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step < 5:
                P.grad = None
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 0.01)
    except RuntimeError as exc:  # a synchronisation in the loop or the hooks
        error = exc
    finally:
        if strict:
            torch.cuda.set_sync_debug_mode("default")
        hub_module.MonitorHub.flush = original_flush
    hub.close()
    failed = [str(f) for f in hub.findings if f.code == "MONITOR_FAILED"]
    if error is not None or failed:
        print("SYNC FOUND in the attach() phase:\n  " + "\n  ".join([repr(error)] * (error is not None) + failed))
        return 1
    serious = [str(f) for f in hub.findings if f.severity != "info"]
    print(f"attach() phase: {steps} steps of a foreign loop (capture {hub._capture[1] if hub._capture else None!r}, "
          f"freeze 5 steps, EMA teacher) with no host-device synchronisation outside the log interval; "
          f"findings above info: {serious or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
