"""Steps/s of the reference training loop against a loop written the way the original SDPN
trainer runs, on the same model, data loader and batches, in one run of this script.

  reference  pipeline.train.train(): no host sync between log intervals, foreach EMA and
             clipping, amp as configured (--amp), monitors off (--monitors to change)
  original   autograd anomaly detection on for every step, fp32, five .item() calls (loss,
             ploss, me_max, ke_loss, np) and a torch.cuda.synchronize() (where CUDA runs) per
             step, a Python loop over the parameters for the teacher EMA and for clipping

Both arms read the same DataLoader (num_workers from --num-workers). Prints the mean step
time of each (steps --warmup .. --steps, the clock read after a final synchronisation),
steps/s, their ratio, and the data-wait share of each.
The data is a Kaldi dir of the built-in corpus (3 s files; 4 s crops wrap).

On this machine's CPUs (the default, a small size):
    python benchmarks/bench_step.py
On a GPU, the published model at batch 96 with bf16 and workers:
    python benchmarks/bench_step.py --device cuda --config experiments/sdpn_voxceleb.yaml \\
        --batch-size 96 --amp bf16 --num-workers 8 --steps 60
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from monitors import Monitor  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import SDPNTrainSet, ensure_synthetic_corpus  # noqa: E402
from pipeline.loader import TrainFeed  # noqa: E402
from pipeline.loss import SDPNLoss  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.schedules import cosine_schedule  # noqa: E402
from pipeline.build import build_optimizer, make_prototypes, resolve_device  # noqa: E402
from pipeline.train import train  # noqa: E402


class _StepClock(Monitor):
    name = "step_clock"

    def __init__(self, cuda: bool, last_step: int) -> None:
        super().__init__(1)
        self.cuda, self.last_step = cuda, last_step
        self.times: list[float] = []

    def on_step_end(self, ctx) -> None:
        if self.cuda and ctx.step == self.last_step:  # one sync, at the very end: the queue has drained
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def reference(cfg, steps: int) -> tuple[list[float], float]:
    clock = _StepClock(cfg.device.startswith("cuda"), steps - 1)
    res = train(cfg, extra_monitors=[clock])
    return clock.times, res["data/wait_share"]


def original(cfg, steps: int) -> tuple[list[float], float]:
    """The loop as the original SDPN trainer runs it (see the module docstring)."""
    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    trainset = SDPNTrainSet(cfg.data, max_frames=cfg.max_frames, glb_num=cfg.glb_num, local_num=cfg.local_num,
                            aug_prob=cfg.aug_prob, snr_range=(cfg.snr_min, cfg.snr_max), seed=cfg.seed)
    per_epoch = len(trainset) // cfg.batch_size
    student = build_model(channels=cfg.channels, embed_dim=cfg.embed_dim, scale=cfg.scale, output_dim=cfg.output_dim,
                          hidden_dim=cfg.hidden_dim, nlayers=cfg.head_layers).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    prototypes = make_prototypes(cfg, device)
    criterion = SDPNLoss(tau=cfg.tau, teacher_temp=cfg.teacher_temp, sinkhorn_iters=cfg.sinkhorn_iters,
                         memax_weight=cfg.memax_weight, koleo_weight=cfg.koleo_loss_weight, koleo_reduction="sum")
    optimizer = build_optimizer(cfg, student, prototypes)
    lr = cosine_schedule(cfg.lr * cfg.batch_size / 256.0, cfg.min_lr, steps, cfg.warmup_epochs * per_epoch)
    mom = cosine_schedule(cfg.momentum_teacher, 1.0, steps)
    feed = TrainFeed(trainset, batch_size=cfg.batch_size, per_epoch=per_epoch, seed=cfg.seed, rank=0, world=1,
                     device=device, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor)
    student.train()
    teacher.train()
    params = list(student.parameters()) + [prototypes]
    times, logged = [], []
    t_loop = time.perf_counter()
    with torch.autograd.set_detect_anomaly(True):
        for step, batch in enumerate(feed.batches(0, steps)):
            glb, loc = batch["global"], batch["local"]
            B = glb.shape[0]
            glb = glb.transpose(0, 1).reshape(cfg.glb_num * B, *glb.shape[2:])
            loc = loc.transpose(0, 1).reshape(cfg.local_num * B, *loc.shape[2:])
            for g in optimizer.param_groups:
                g["lr"] = float(lr[step]) * g.get("lr_scale", 1.0)
            with torch.no_grad():
                _, t_z = teacher(glb)
            s_emb, s_z = student(loc)
            out = criterion(s_z, t_z, prototypes, cfg.local_num, student_emb=s_emb)
            optimizer.zero_grad()
            out["loss"].backward()
            for p in params:  # per-parameter clipping, one norm at a time
                if p.grad is not None:
                    norm = p.grad.data.norm(2)
                    p.grad.data.mul_(torch.clamp(cfg.clip_grad / (norm + 1e-6), max=1.0))
            optimizer.step()
            m = float(mom[step])
            with torch.no_grad():  # the Python EMA loop
                for ps, pt in zip(student.parameters(), teacher.parameters()):
                    pt.data.mul_(m).add_((1 - m) * ps.detach().data)
            logged.append([out[k].item() for k in ("loss", "ploss", "me_max", "ke_loss", "np")])  # five syncs
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
    loop_s = time.perf_counter() - t_loop
    return times, feed.wait_seconds / loop_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "experiments/sdpn_tiny.yaml"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--amp", default="none", help="the reference arm's amp (none | bf16 | fp16)")
    p.add_argument("--num-workers", type=int, default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the config's)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of both arms, in alternating order")
    p.add_argument("--monitors", default="none", help="the reference arm's monitors (none | default)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        tiny = load_config(ROOT / "experiments/sdpn_tiny.yaml")
        data = ensure_synthetic_corpus(tiny.data_cache, seed=tiny.corpus_seed,
                                       num_train_speakers=tiny.num_train_speakers, num_eval_speakers=tiny.num_eval_speakers,
                                       utts_per_speaker=tiny.utts_per_speaker, utt_seconds=tiny.utt_seconds)["train"]
        over = [f"data={data}", "eval_data=", f"device={args.device}", f"max_steps={args.steps}", "epochs=100000",
                "wandb_mode=disabled", "progress=false", f"exp_dir={tmp}/ref", "ckpt_every=1000000",
                f"monitors={args.monitors}", "warmup_epochs=0"]
        if args.batch_size:
            over.append(f"batch_size={args.batch_size}")
        if args.threads is not None:
            over.append(f"threads={args.threads}")
        if args.num_workers is not None:
            over.append(f"num_workers={args.num_workers}")
        cfg_ref = load_config(args.config, over + [f"amp={args.amp}"])
        cfg_orig = load_config(args.config, over + ["amp=none"])
        n = len(SDPNTrainSet(data))
        if n < cfg_ref.batch_size:  # a bigger dir over the same files
            from benchmarks.bench_data import make_dir

            data = make_dir(Path(tmp) / "data", 4 * cfg_ref.batch_size, data)
            cfg_ref = load_config(args.config, over + [f"data={data}", f"amp={args.amp}"])
            cfg_orig = load_config(args.config, over + [f"data={data}", "amp=none"])
        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({cfg_ref.threads or torch.get_num_threads()} threads)"
        print(f"{dev}; config {Path(args.config).name}, batch {cfg_ref.batch_size}, num_workers {cfg_ref.num_workers}, "
              f"{args.steps} steps per arm, timed after {args.warmup}", flush=True)
        arms = {"original": (original, cfg_orig), "reference": (reference, cfg_ref)}
        rows: dict[str, list[float]] = {a: [] for a in arms}
        for r in range(args.rounds):  # ABBA...: a drifting machine load hits both arms alike
            for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
                fn, cfg = arms[name]
                times, wait = fn(cfg, args.steps)
                # seconds per step over the window after warm-up, ending at a synchronised clock
                # (a GPU's queue drained), so host run-ahead cannot flatter the reference arm
                per_step = (times[-1] - times[args.warmup]) / (len(times) - 1 - args.warmup)
                rows[name].append(per_step)
                print(f"  round {r}: {name:<9} {1000 * per_step:8.1f} ms per step = {1 / per_step:6.2f} steps/s; "
                      f"data wait {100 * wait:4.1f} % of the loop (amp={cfg.amp})", flush=True)
        ratios = [o / f for o, f in zip(rows["original"], rows["reference"])]
        o, f = statistics.median(rows["original"]), statistics.median(rows["reference"])
        print(f"  median: original {1 / o:.2f} steps/s, reference {1 / f:.2f} steps/s; reference / original "
              f"{o / f:.3f}x (per round: {', '.join(f'{x:.3f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
