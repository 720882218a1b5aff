"""Check on a GPU that training makes no host-device synchronisation between log intervals.

Three checks, all under ``torch.cuda.set_sync_debug_mode("error")`` (any .item(), .cpu(),
nonzero(), tensor truth test, synchronize ... raises):

1. Monitors: every monitor's per-step hooks (on_after_backward, on_before_optimizer_step,
   on_after_optimizer_step, on_step_end). A hook that synchronises raises, and the hub switches
   that monitor off and records MONITOR_FAILED.
2. The full training step (``--full-step``, the default): the whole loop from on_train_start to
   the end of the last step is strict: fetching the batch from the DataLoader (pinned,
   non_blocking), the forward passes under autocast, the loss, backward, clipping, the optimizer,
   the EMA, the hooks and the hub's per-step bookkeeping. Only the log interval (MonitorHub.flush,
   the one sync point by design) runs in the default mode; there is no periodic checkpoint
   inside the checked steps (ckpt_every > steps: a checkpoint reads the tensors on purpose),
   and the final checkpoint, evaluation and t-SNE come after the loop. A synchronisation there
   raises out of train() and the check names the line.

3. ``attach()`` on a foreign SDPN-style loop (see :func:`attach_phase`): the hooks attach() adds
   (the automatic capture, the assignments, the trainer checks) under the same strict mode.

With ``--num-proto``/``--dim`` (DINO's 65,536 x 256) it also prints the time to read P twice
on the device and the per-step monitor time as a multiple of it (target: within 3x).

Defaults to amp=bf16 (none synchronises); ``--amp fp16`` shows the one sync per step that
torch.amp.GradScaler makes (it reads found_inf on the host to skip a step).

    python benchmarks/check_gpu_sync.py [--steps 60] [--every-step] [--amp bf16] [--num-workers 4] [--num-proto 65536 --dim 256]
    python benchmarks/check_gpu_sync.py --device cpu      # smoke test of the script itself
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli_args import positive  # noqa: E402

from monitors import hub as hub_module  # noqa: E402
from monitors.core.events import STEP_EVENTS  # noqa: E402
from monitors.core.registry import DEFAULT  # noqa: E402
from pipeline import checkpoint as ckpt_module  # noqa: E402
from pipeline import loader as loader_module  # noqa: E402
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


class _Strict:
    """sync_debug_mode switched on and off; a no-op (counting only) on the CPU smoke test."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.loop = False  # inside the checked steps (full-step check)

    def get(self) -> int:
        return torch.cuda.get_sync_debug_mode() if self.cuda else 0

    def set(self, mode) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(mode)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every-step", action="store_true", help="run every monitor at every step")
    p.add_argument("--exp-dir", default="/tmp/check_gpu_sync")
    p.add_argument("--num-proto", type=positive, default=None, help="number of prototypes K (config num_proto)")
    p.add_argument("--dim", type=positive, default=None, help="prototype dimension D (config output_dim)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the script (checks nothing)")
    p.add_argument("--amp", default="bf16", help="none | bf16 | fp16 (fp16: GradScaler syncs once a step)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (pinned batches on CUDA)")
    p.add_argument("--no-full-step", dest="full_step", action="store_false",
                   help="check the monitor hooks only, not the whole training step")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (--device cpu runs the script as a smoke test)")
        return 2

    strict = _Strict(cuda)
    checked: collections.Counter[str] = collections.Counter()
    seconds: collections.Counter[str] = collections.Counter()
    events: list = []  # (monitor, start event, end event) of every checked hook call (CUDA)
    steps_checked = collections.Counter()
    original_call = hub_module.MonitorHub._call
    original_emit = hub_module.MonitorHub.emit
    original_flush = hub_module.MonitorHub.flush
    original_rng_state = ckpt_module.rng_state
    original_batches = loader_module.TrainFeed.batches

    def strict_call(self, monitor, hook, ctx):
        if hook not in STEP_EVENTS:
            return original_call(self, monitor, hook, ctx)
        old = strict.get()
        strict.set("error")
        t0 = time.perf_counter()
        if cuda:  # device time of the hook's kernels: read after training (no sync here)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        try:
            return original_call(self, monitor, hook, ctx)
        finally:
            if cuda:
                end.record()
                events.append((monitor.name, start, end))
            seconds[monitor.name] += time.perf_counter() - t0
            strict.set(old)  # the full-step check stays strict between hooks
            checked[monitor.name] += 1

    def emit(self, event, ctx):
        original_emit(self, event, ctx)
        if strict.loop and event == "on_step_end":
            steps_checked["steps"] += 1

    def batches(self, start_step, total_steps):
        # strict from the first batch fetch to the end of the last step (a new run writes its
        # quiet step-0 checkpoint between on_train_start and the first fetch: not checked)
        it = original_batches(self, start_step, total_steps)
        if args.full_step:
            strict.loop = True
            strict.set("error")
        yield from it

    def flush(self):
        if not strict.loop:
            return original_flush(self)
        strict.set("default")  # the log interval: the one sync point by design
        try:
            return original_flush(self)
        finally:
            strict.set("error")

    def rng_state():  # the first thing a checkpoint touches on the device: the loop has ended
        strict.loop = False
        strict.set("default")
        return original_rng_state()

    hub_module.MonitorHub._call = strict_call
    hub_module.MonitorHub.emit = emit
    hub_module.MonitorHub.flush = flush
    ckpt_module.rng_state = rng_state
    loader_module.TrainFeed.batches = batches
    monitors = "{" + ", ".join(f"{n}: {{every_n_steps: 1}}" for n in DEFAULT if n != "tsne") + ", tsne: {}}" \
        if args.every_step else "default"
    cfg = load_config(ROOT / "experiments/sdpn_tiny.yaml", [
        f"device={args.device}", f"max_steps={args.steps}", "epochs=1000", "wandb_mode=disabled", "progress=false",
        f"exp_dir={args.exp_dir}", "eval_at_init=false", "threads=4", f"monitors={monitors}", f"amp={args.amp}",
        f"num_workers={args.num_workers}", f"ckpt_every={args.steps + 1000}",
        *([f"num_proto={args.num_proto}"] if args.num_proto else []),
        *([f"output_dim={args.dim}"] if args.dim else [])])
    try:
        res = train(cfg)
    except RuntimeError as exc:  # sync_debug_mode=error in the loop itself
        strict.set("default")
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(ROOT) in f.filename]
        where = "; ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.line}" for f in frames[-3:])
        print(f"SYNC FOUND in the training step (amp={args.amp}) after {steps_checked['steps']} checked steps: "
              f"{str(exc).splitlines()[0]}\n  at {where}")
        return 1
    failed = [f for f in res["findings"] if "MONITOR_FAILED" in f]
    dev = torch.cuda.get_device_name() if cuda else "CPU (smoke test: nothing is checked)"
    print(f"device {dev}; {res['step']} steps; log every {cfg.log_every} steps; amp={args.amp}; "
          f"num_workers={args.num_workers}")
    for name, n in sorted(checked.items()):
        print(f"  {name:<11} {n:5d} per-step hook calls under sync_debug_mode=error, "
              f"{1000 * seconds[name] / n:.3f} ms/call")
    if failed:
        print("SYNC FOUND:\n  " + "\n  ".join(failed))
        return 1
    if not cuda:
        print(f"CPU smoke test: {sum(checked.values())} hook calls and {steps_checked['steps']} steps ran through "
              f"the checking wrappers; without CUDA nothing is checked (run it on a GPU)")
        return attach_phase(args.steps, device="cpu")
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
    print(f"no host-device synchronisation in {sum(checked.values())} per-step monitor hook calls")
    if args.full_step:
        print(f"no host-device synchronisation in {steps_checked['steps']} full training steps "
              f"(data loader to EMA, log intervals excepted)")
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
