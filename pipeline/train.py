"""The reference SDPN training loop. It tells the story in order and emits the monitor events
of DESIGN.md; it does not know which monitors exist."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from monitors import MonitorHub, RunContext, StepOutputs, build_monitors
from monitors.sinks import LocalSink, WandbSink, check_online_credentials

from . import checkpoint as ckpt
from .config import Config
from .data import Fbank, SDPNTrainSet, ensure_synthetic_corpus, read_kaldi_dir
from .evaluate import evaluate_embeddings, extract_embeddings
from .loader import TrainFeed
from .loss import SDPNLoss
from .models import build_model, ema_update, init_prototypes, param_groups
from .schedules import cosine_schedule


# ----------------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} was asked for but CUDA is not available: use device=cpu or device=auto")
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def resolve_data(cfg: Config) -> tuple[Path, Optional[Path]]:
    """The training and evaluation directories; the built-in corpus is generated on first use."""
    need_builtin = cfg.data == "builtin" or cfg.eval_data == "builtin"
    builtin: dict[str, Path] = {}
    if need_builtin:
        builtin = ensure_synthetic_corpus(
            cfg.data_cache, seed=cfg.corpus_seed, num_train_speakers=cfg.num_train_speakers,
            num_eval_speakers=cfg.num_eval_speakers, utts_per_speaker=cfg.utts_per_speaker,
            utt_seconds=cfg.utt_seconds)
    train_dir = builtin["train"] if cfg.data == "builtin" else Path(cfg.data)
    eval_dir = None if not cfg.eval_data else (builtin["eval"] if cfg.eval_data == "builtin" else Path(cfg.eval_data))
    return train_dir, eval_dir


def make_prototypes(cfg: Config, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    protos = init_prototypes(cfg.num_proto, cfg.output_dim, generator=g).detach()
    if cfg.bug_non_leaf_prototypes:
        # The trap of the original: Parameter(x).cuda() is a plain non-leaf copy, not a Parameter.
        return torch.nn.Parameter(protos).to(device, copy=True)
    return protos.to(device).requires_grad_(True)


def build_optimizer(cfg: Config, student: torch.nn.Module, prototypes: torch.Tensor) -> torch.optim.Optimizer:
    groups = param_groups(student)
    if not (cfg.bug_proto_not_in_optimizer or cfg.bug_non_leaf_prototypes):
        groups.append({"params": [prototypes], "name": "prototypes", "weight_decay": 0.0,
                       "lr_scale": cfg.proto_lr_scale})
    # lr and weight decay are set by the schedule at every step
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.sgd_momentum)


def clip_per_parameter(params: list[torch.Tensor], max_norm: float) -> None:
    """Per-parameter gradient-norm clipping as in DINO, without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def amp_setup(amp: str, device: torch.device) -> tuple[Any, Optional[torch.amp.GradScaler]]:
    """(a context-manager factory for the forward passes, a GradScaler for fp16 or None)."""
    if amp == "none":
        return contextlib.nullcontext, None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device: use amp=bf16 or amp=none on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


@dataclass
class Schedules:
    lr: Any
    wd: Any
    momentum: Any


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop reads at the end of each step."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nsignal {signum}: writing a checkpoint, then exiting", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
def train(cfg: Config, extra_monitors: Optional[list] = None) -> dict[str, Any]:
    """Train SDPN as configured. Returns the final metrics (eval/*, step, paths).

    Before anything else: W&B online mode needs credentials, and ``exp_dir`` must not be held
    by a live run (rank 0 holds ``exp_dir/.lock`` while it trains; a killed run's lock is gone)."""
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if cfg.wandb_mode == "online" and main_rank:
        check_online_credentials()
    lock = ckpt.ExpDirLock(cfg.exp_dir).acquire() if main_rank else None
    try:
        return _train(cfg, extra_monitors)
    finally:
        if lock is not None:
            lock.release()


def _resume_command(cfg: Config) -> str:
    """The command that resumes this run: the command line it was started with, plus resume=true."""
    argv = sys.argv[1:]
    if sys.argv and sys.argv[0].endswith(os.path.join("pipeline", "__main__.py")) and argv[:1] == ["train"]:
        args = [a for a in argv[1:] if not a.startswith("resume=")]
        return shlex.join(["python", "-m", "pipeline", "train", *args, "resume=true"])
    return f"python -m pipeline train --config <the run's config> {shlex.quote(f'exp_dir={cfg.exp_dir}')} resume=true"


def _nonfinite_seen(hub: MonitorHub, since_step: int) -> Optional[str]:
    """What was non-finite at this log interval (read from host values the hub already has:
    no extra sync), or None."""
    loss = hub.last_values.get("train/loss")
    if loss is not None and not math.isfinite(loss):
        return f"the loss is {loss}"
    for f in hub.findings:
        if f.code == "PROTO_NONFINITE" and f.severity == "error" and f.step >= since_step:
            return f"PROTO_NONFINITE at step {f.step}"
    return None


def _train(cfg: Config, extra_monitors: Optional[list] = None) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    exp_dir = Path(cfg.exp_dir)
    manager = ckpt.CheckpointManager(exp_dir, keep=cfg.keep_checkpoints)
    ckpt_path = manager.pointer     # checkpoint.pt: a hard link to the newest good checkpoint-<step>.pt

    # -- data ------------------------------------------------------------------------------
    train_dir, eval_dir = resolve_data(cfg) if rank == 0 else (None, None)
    if world > 1:  # rank 0 generated the corpus; everyone reads the same directories
        paths = [str(train_dir), str(eval_dir) if eval_dir else ""]
        dist.broadcast_object_list(paths, src=0)
        train_dir, eval_dir = Path(paths[0]), (Path(paths[1]) if paths[1] else None)
    trainset = SDPNTrainSet(train_dir, max_frames=cfg.max_frames, glb_num=cfg.glb_num,
                            local_num=cfg.local_num, aug_prob=cfg.aug_prob,
                            snr_range=(cfg.snr_min, cfg.snr_max), seed=cfg.seed + rank,
                            noise_data=cfg.noise_data or None, rir_data=cfg.rir_data or None)
    trainset.check_first_file()  # a wrong sample rate fails here, not at step 1
    eval_data = read_kaldi_dir(eval_dir, require_trials=True) if eval_dir is not None else None
    per_epoch = len(trainset) // (cfg.batch_size * world)
    if per_epoch < 1:
        raise ValueError(f"the training data has {len(trainset)} utterances, fewer than one batch of "
                         f"{cfg.batch_size} x {world} processes: lower batch_size or add data")
    total_steps = cfg.epochs * per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    # -- model, prototypes, loss, optimizer ----------------------------------------------------
    student = build_model(channels=cfg.channels, embed_dim=cfg.embed_dim, scale=cfg.scale,
                          output_dim=cfg.output_dim, hidden_dim=cfg.hidden_dim,
                          nlayers=cfg.head_layers).to(device)
    teacher = student if cfg.bug_teacher_shares_student else copy.deepcopy(student)
    for p in teacher.parameters() if teacher is not student else ():
        p.requires_grad_(False)
    prototypes = make_prototypes(cfg, device)                  # (K, D)
    if world > 1:
        with torch.no_grad():
            dist.broadcast(prototypes.data if prototypes.is_leaf else prototypes, src=0)
        if device.type == "cuda":
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        student_ddp = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        student_ddp = student
    criterion = SDPNLoss(tau=cfg.tau, teacher_temp=cfg.teacher_temp, sinkhorn_iters=cfg.sinkhorn_iters,
                         memax_weight=cfg.memax_weight, koleo_weight=cfg.koleo_loss_weight,
                         koleo_reduction="sum")  # as 3D-Speaker: summed over the local views
    optimizer = build_optimizer(cfg, student, prototypes)
    fbank = Fbank().to(device)
    autocast, scaler = amp_setup(cfg.amp, device)

    batch_total = cfg.batch_size * world
    sched = Schedules(
        lr=cosine_schedule(cfg.lr * batch_total / 256.0, cfg.min_lr, total_steps, cfg.warmup_epochs * per_epoch),
        wd=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total_steps),
        momentum=cosine_schedule(cfg.momentum_teacher, 1.0, total_steps),
    )
    freeze_steps = cfg.freeze_last_layer * per_epoch

    # -- monitors and sinks --------------------------------------------------------------------
    state: Optional[dict[str, Any]] = None
    if rank == 0:
        manager.clean_temporaries()
    found = manager.load_newest_good(repoint=rank == 0) if cfg.resume else None
    if found is not None:
        state, resumed_from = found
        ckpt.check_resume_config(state.get("config", {}), cfg.to_dict(), resumed_from)
    elif cfg.resume and rank == 0:
        print(f"resume=true but {exp_dir} holds no checkpoint yet: starting a new run", file=sys.stderr)
    sinks: list[Any] = []
    wandb_sink: Optional[WandbSink] = None
    if rank == 0:
        if cfg.wandb_mode != "disabled":
            wandb_sink = WandbSink(project=cfg.wandb_project, dir=str(exp_dir), mode=cfg.wandb_mode,
                                   config=cfg.to_dict(), run_id=(state or {}).get("wandb_run_id"),
                                   resume=state is not None, name=cfg.wandb_name or None,
                                   group=cfg.wandb_group or None, init_timeout=cfg.wandb_init_timeout)
            sinks.append(wandb_sink)
        sinks.append(LocalSink(exp_dir / "records"))
    hub = MonitorHub(build_monitors(cfg.monitors) + list(extra_monitors or []), sinks=sinks,
                     log_every=cfg.log_every, stop_on_error=cfg.stop_on_error)
    if wandb_sink is not None and cfg.wandb_watch:  # W&B's own gradient/parameter hooks, for comparison
        hub.call_sink(wandb_sink, "watch", student, cfg.wandb_watch, cfg.wandb_watch_freq)  # isolated: opens the run
    backbone_params = [p for n, p in student.named_parameters() if n.startswith("backbone.")]
    head_params = [p for n, p in student.named_parameters() if n.startswith("head.")]
    ctx = RunContext(prototypes=prototypes, optimizer=optimizer, model=student, teacher=teacher,
                     config=cfg.to_dict(), rank=rank, world_size=world, freeze_steps=freeze_steps,
                     param_groups={"backbone": backbone_params, "head": head_params},
                     exp_dir=str(exp_dir) if rank == 0 else None)

    # -- resume --------------------------------------------------------------------------------
    start_step = 0
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        if "prototypes" in state:
            with torch.no_grad():
                prototypes.copy_(state["prototypes"].to(device))
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        ctx.step, ctx.epoch = start_step, start_step // per_epoch
        ckpt.set_rng_state(state["rng"])
        hub.load_state_dict(state.get("monitor_hub", {}))  # first: what it finds now is kept
        ctx.checkpoint = state
        hub.emit("on_load_checkpoint", ctx)
        ctx.checkpoint = None
        if rank == 0:
            print(f"resumed from {resumed_from} at step {start_step}", file=sys.stderr)

    feed = TrainFeed(trainset, batch_size=cfg.batch_size, per_epoch=per_epoch, seed=cfg.seed, rank=rank,
                     world=world, device=device, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                     max_bad_files=cfg.max_bad_files, state=(state or {}).get("data"))

    last_good = {"step": start_step if state is not None else None}

    def save_checkpoint(step: int, emit: bool = True) -> None:
        """All ranks emit the event (monitors may use collectives); rank 0 writes, unless the
        state holds NaN/Inf (one finite check per checkpoint): then the last good one stays."""
        state = {
            "student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(), "step": step, "epoch": step // per_epoch,
            "config": cfg.to_dict(), "rng": ckpt.rng_state(),
            "wandb_run_id": wandb_sink.run_id if wandb_sink is not None else None,
            "data": feed.state_dict(),  # skipped files; the batch order itself follows from step
        }
        if not cfg.bug_proto_not_in_checkpoint:
            state["prototypes"] = prototypes.detach().cpu()
        if emit:
            ctx.checkpoint = state
            hub.emit("on_save_checkpoint", ctx)
            ctx.checkpoint = None
        state["monitor_hub"] = hub.state_dict()
        seen = _nonfinite_seen(hub, start_step) if cfg.on_nonfinite == "stop" else None
        if seen is not None:  # finite maybe, yet diverged (e.g. 1e28 prototypes): not a good one
            if rank == 0:
                print(f"checkpoint of step {step} NOT written: {seen} at this interval", file=sys.stderr)
            return
        if rank == 0 and manager.save(state, step) is not None:
            last_good["step"] = step

    def evaluate(model: torch.nn.Module, tag: str) -> dict[str, float]:
        """EER/minDCF of the backbone on the evaluation trials; at the end, the head outputs of
        the same embeddings go to on_embeddings (one pass over the audio serves both)."""
        if eval_data is None or rank != 0:
            return {}
        was_training = model.training
        model.eval()
        final = tag == "final"
        trial_utts = list(dict.fromkeys(u for _, a, b in eval_data.trials for u in (a, b)))
        emb = extract_embeddings(model.backbone, eval_data, fbank, device=device,
                                 max_seconds=cfg.eval_max_seconds or None,
                                 utts=None if final else trial_utts)       # utt -> (E,)
        res = evaluate_embeddings(emb, eval_data.trials)
        if final:  # the speaker embeddings in the prototypes' space, for the t-SNE
            utts = list(emb)
            with torch.no_grad():  # eval mode: the head maps each row as it would one at a time
                ctx.embeddings = model.head(torch.stack([emb[u] for u in utts]).to(device))  # (N, D)
            ctx.labels = [eval_data.utt2spk[u] for u in utts]
            hub.emit("on_embeddings", ctx)
            ctx.embeddings, ctx.labels = None, None
        model.train(was_training)
        return res

    # -- evaluation at initialisation ---------------------------------------------------------------
    result: dict[str, Any] = {}
    if state is None and cfg.eval_at_init and rank == 0 and eval_data is not None:
        init = evaluate(teacher, "init")
        result["eval/eer_at_init"] = init["eer"]
        hub.set_summary({"eval/eer_at_init": init["eer"], "eval/min_dcf_at_init": init["min_dcf"]})
        print(f"EER at initialisation: {100 * init['eer']:.2f}%  minDCF {init['min_dcf']:.3f}", file=sys.stderr)

    # -- the loop ----------------------------------------------------------------------------------
    student.train()
    teacher.train()
    proto_params = [prototypes] if prototypes.is_leaf else []
    clip_params = list(student.parameters()) + proto_params
    progress = _Progress(total_steps, start_step, enabled=cfg.progress and rank == 0)
    hub.emit("on_train_start", ctx)
    if state is None and rank == 0:
        # the state before the first step: a run that diverges before its first checkpoint can
        # still resume (written quietly: no on_save_checkpoint event, no flush)
        save_checkpoint(0, emit=False)
    step = start_step
    stopped_by = None
    nonfinite: Optional[str] = None
    last_t0: Optional[float] = None
    loop_t0 = time.perf_counter()
    batches = feed.batches(start_step, total_steps)  # the same batches for any num_workers / resume
    with _StopSignal() as stop:
        while step < total_steps:
            epoch = step // per_epoch
            for b in range(step % per_epoch, per_epoch):
                if step >= total_steps or stop.signum is not None or hub.should_stop:
                    break
                t0 = time.perf_counter()
                if last_t0 is not None:  # the whole previous step: data, compute, monitors, logging
                    hub.log({"perf/step_ms": 1000.0 * (t0 - last_t0)}, step=step)
                last_t0 = t0
                ctx.step, ctx.epoch = step, epoch
                batch = next(batches)                                   # on the device, non-blocking
                hub.log({"perf/data_wait_ms": 1000.0 * feed.last_wait_s,
                         "data/skipped_files": feed.skipped_files}, step=step)
                glb, loc = batch["global"], batch["local"]              # (B, g, T, 80), (B, l, T/2, 80)
                B = glb.shape[0]
                glb = glb.transpose(0, 1).reshape(cfg.glb_num * B, *glb.shape[2:])     # view-major
                loc = loc.transpose(0, 1).reshape(cfg.local_num * B, *loc.shape[2:])

                # schedules of this step
                lr, wd, m = float(sched.lr[step]), float(sched.wd[step]), float(sched.momentum[step])
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                    if g.get("name") == "regularized":
                        g["weight_decay"] = wd

                # forward: teacher on the global crops, student on the local crops
                with torch.no_grad(), autocast():
                    _, t_z = teacher(glb)                               # (g*B, D)
                with autocast():
                    s_emb, s_z = student_ddp(loc)                       # (l*B, E), (l*B, D)
                # the loss in fp32 (no-ops without amp)
                out = criterion(s_z.float(), t_z.float(), prototypes, cfg.local_num, student_emb=s_emb.float())

                optimizer.zero_grad(set_to_none=True)
                (scaler.scale(out["loss"]) if scaler else out["loss"]).backward()
                if world > 1 and prototypes.grad is not None and not cfg.bug_no_grad_allreduce:
                    dist.all_reduce(prototypes.grad)   # prototypes live outside DDP: average by hand
                    if not cfg.bug_grad_allreduce_sum:
                        prototypes.grad.div_(world)
                if scaler:
                    scaler.unscale_(optimizer)         # monitors and clipping see the true gradients
                hub.emit("on_after_backward", ctx)
                clip_per_parameter(clip_params, cfg.clip_grad)
                if step < freeze_steps and prototypes.is_leaf:
                    if cfg.bug_freeze_by_name:         # cancel by name, as 3D-Speaker: matches nothing here
                        for n, q in student.named_parameters():
                            if "last_layer" in n:
                                q.grad = None
                    else:
                        prototypes.grad = None         # freeze_last_layer: cancel the prototype gradient
                hub.emit("on_before_optimizer_step", ctx)
                if scaler:  # note: GradScaler reads found_inf on the host: one sync per step (fp16 only)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                hub.emit("on_after_optimizer_step", ctx)
                if not cfg.bug_no_ema:
                    ema_update(teacher, student, m, copy_buffers=False)  # as the original: parameters only

                ctx.outputs = StepOutputs(
                    loss=out["loss"].detach(),
                    terms={k: out[k] for k in ("ploss", "me_max", "ke_loss", "np", "max_t", "min_t")},
                    student_probs=out["student_probs"], teacher_targets=out["teacher_targets"],
                    embeddings=s_emb.detach()[:B], projections=t_z[:B].detach(),
                    labels=batch["speaker"].to(device, non_blocking=True),
                    schedules={"lr": lr, "wd": wd, "momentum": m},
                )
                hub.log({"train/loss": ctx.outputs.loss,
                         **{f"train/{k}": v for k, v in ctx.outputs.terms.items()},
                         "train/lr": lr, "train/wd": wd, "train/momentum": m, "train/epoch": epoch},
                        step=step)
                hub.emit("on_step_end", ctx)
                ctx.outputs = None
                step += 1
                progress.update(step, hub.last_values)
                if step % cfg.ckpt_every == 0 and step < total_steps:
                    save_checkpoint(step)
                if cfg.on_nonfinite == "stop":  # host values of the last flush: no sync here
                    nonfinite = _nonfinite_seen(hub, start_step)
                    if nonfinite is not None:
                        break
            else:
                continue
            break
        if nonfinite is not None:
            stopped_by = f"non-finite values ({nonfinite}; on_nonfinite=stop)"
        elif stop.signum is not None:
            stopped_by = f"signal {stop.signum}"
        elif hub.should_stop:
            stopped_by = "an error finding (stop_on_error=true)"
        if nonfinite is None:
            save_checkpoint(step)
    progress.close()
    loop_s = time.perf_counter() - loop_t0
    data_summary = {"data/skipped_files": feed.skipped_files,
                    "data/wait_share": feed.wait_seconds / loop_s if loop_s > 0 else 0.0}
    hub.set_summary(data_summary)
    result.update(data_summary)

    if stopped_by is not None:
        if rank == 0 and nonfinite is not None:
            good = last_good["step"]
            where = (f"the last good checkpoint is {manager.step_path(good)} (step {good}), linked as {manager.pointer}; "
                     f"lower lr (now {cfg.lr}) or set clip_grad, then resume from it with: {_resume_command(cfg)}"
                     if good is not None else "no finite checkpoint was written before: lower lr or set clip_grad and start again")
            print(f"stopped at step {step} by {stopped_by}; nothing non-finite was saved; {where}", file=sys.stderr)
        elif rank == 0:
            print(f"stopped at step {step} by {stopped_by}; checkpoint written to {ckpt_path}; "
                  f"continue with resume=true", file=sys.stderr)
        hub.close()
        if world > 1:
            dist.barrier()  # every rank done before the group is torn down
            dist.destroy_process_group()
        result.update({"step": step, "stopped_by": stopped_by, "checkpoint": str(ckpt_path),
                       "last_good_step": last_good["step"]})
        return result

    if world > 1:  # the replicas must agree: compare every rank's prototypes with rank 0's
        gathered = [torch.empty_like(prototypes.detach()) for _ in range(world)]
        dist.all_gather(gathered, prototypes.detach().contiguous())
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        hub.set_summary({"dist/world_size": world, "dist/proto_max_abs_diff": diff})
        result["dist/proto_max_abs_diff"] = diff
        if rank == 0:
            print(f"prototypes on {world} ranks: max abs difference {diff:.3g}", file=sys.stderr)

    # -- final evaluation ----------------------------------------------------------------------------
    ctx.step = max(step - 1, 0)
    final = evaluate(teacher, "final")
    if final:
        result.update({"eval/eer": final["eer"], "eval/min_dcf": final["min_dcf"]})
        hub.log({"eval/eer": final["eer"], "eval/min_dcf": final["min_dcf"]}, step=ctx.step)
        hub.set_summary({"eval/eer": final["eer"], "eval/min_dcf": final["min_dcf"]})
        init_eer = result.get("eval/eer_at_init")
        msg = f"EER after training: {100 * final['eer']:.2f}%  minDCF {final['min_dcf']:.3f}"
        if init_eer:
            msg += f"  (at initialisation {100 * init_eer:.2f}%, ratio {final['eer'] / init_eer:.2f})"
        print(msg, file=sys.stderr)
    hub.emit("on_train_end", ctx)
    result.update({"step": step, "checkpoint": str(ckpt_path), "findings": [str(f) for f in hub.findings],
                   "health": hub.health_summary()})
    if wandb_sink is not None and hub.sink_active(wandb_sink):
        result["wandb_run_id"] = wandb_sink.run_id
        result["wandb_run_dir"] = wandb_sink.run_dir
    hub.close()
    if world > 1:
        dist.barrier()  # rank 0 may still be evaluating: tear the group down together
        dist.destroy_process_group()
    return result


class _Progress:
    """A tqdm bar showing the loss (read at log intervals only: no per-step sync) and steps/s."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._shown = None

    def update(self, step: int, values: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        loss = values.get("train/loss")
        if loss is not None and loss != self._shown:
            self._shown = loss
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
