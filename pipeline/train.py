"""The reference SDPN training loop. It tells the story in order and emits the monitor events
of ``monitors.core.events.EVENTS``; it does not know which monitors exist.

The pieces it calls: :mod:`pipeline.build` (device, data, networks, optimizer, the monitor hub),
:mod:`pipeline.schedules` (lr, weight decay, momentum, the prototype freeze), :mod:`pipeline.step`
(the parts of one optimizer step), :mod:`pipeline.run_state` (resuming and checkpointing),
:mod:`pipeline.run_eval` (evaluation and on_embeddings) and :mod:`pipeline.loop_control` (stop
signals, progress bar)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from monitors import RunContext, StepOutputs
from monitors.formats.sinks import check_online_credentials

from . import checkpoint as ckpt
from .build import (amp_setup, build_hub, build_loss, build_networks, build_optimizer, finish_distributed,
                    init_distributed, load_data, resolve_device)
from .config import Config
from .data import Fbank
from .loader import TrainFeed
from .loop_control import Progress, StopSignal
from .models import ema_update
from .run_eval import RunEvaluator, report_final
from .run_state import RunCheckpointer, TrainState, find_resume_state, nonfinite_seen, restore, resume_command
from .schedules import apply_schedule, make_schedules
from .step import average_prototype_grad, clip_per_parameter, freeze_prototypes, optimizer_step, view_major


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


def _train(cfg: Config, extra_monitors: Optional[list] = None) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    exp_dir = Path(cfg.exp_dir)
    manager = ckpt.CheckpointManager(exp_dir, keep=cfg.keep_checkpoints)
    ckpt_path = manager.pointer     # checkpoint.pt: a hard link to the newest good checkpoint-<step>.pt

    # -- data, model, prototypes, loss, optimizer, schedules, the run's state -------------------
    trainset, eval_data, per_epoch, total_steps = load_data(cfg, rank, world)
    student, teacher, student_ddp, prototypes = build_networks(cfg, device, world)   # prototypes (K, D)
    criterion = build_loss(cfg)
    optimizer = build_optimizer(cfg, student, prototypes)
    fbank = Fbank().to(device)
    autocast, scaler = amp_setup(cfg.amp, device)
    sched = make_schedules(cfg, total_steps, per_epoch, world)
    feed = TrainFeed(trainset, batch_size=cfg.batch_size, per_epoch=per_epoch, seed=cfg.seed, rank=rank,
                     world=world, device=device, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                     max_bad_files=cfg.max_bad_files)
    run = TrainState(student=student, teacher=teacher, student_ddp=student_ddp, prototypes=prototypes,
                     optimizer=optimizer, scaler=scaler, feed=feed, per_epoch=per_epoch)

    # -- monitors and sinks --------------------------------------------------------------------
    saved, resumed_from = find_resume_state(cfg, manager, rank)   # the checkpoint dict, or None
    hub, wandb_sink = build_hub(cfg, rank, exp_dir, saved, student, extra_monitors)
    backbone_params = [p for n, p in student.named_parameters() if n.startswith("backbone.")]
    head_params = [p for n, p in student.named_parameters() if n.startswith("head.")]
    ctx = RunContext(prototypes=prototypes, optimizer=optimizer, model=student, teacher=teacher,
                     config=cfg.to_dict(), rank=rank, world_size=world, freeze_steps=sched.freeze_steps,
                     param_groups={"backbone": backbone_params, "head": head_params},
                     exp_dir=str(exp_dir) if rank == 0 else None)
    if scaler is not None:  # the local gradient PROTO_GRAD_NOT_AVERAGED copies in backward is scaled
        ctx.extra["grad_scaler"] = scaler

    # -- resume --------------------------------------------------------------------------------
    if saved is not None:
        restore(saved, run, hub, ctx)
        if rank == 0:
            print(f"resumed from {resumed_from} at step {run.step}", file=sys.stderr)
    start_step = run.step
    checkpoints = RunCheckpointer(cfg, manager, hub, ctx, run, wandb_sink=wandb_sink, rank=rank,
                                  resumed=saved is not None)
    evaluate = RunEvaluator(cfg, eval_data, fbank, device, hub, ctx, rank)

    # -- evaluation at initialisation ---------------------------------------------------------------
    result: dict[str, Any] = {}
    if saved is None and cfg.eval_at_init and evaluate.active:
        init = evaluate(teacher, "init")
        result["eval/eer_at_init"] = init["eer"]
        hub.set_summary({"eval/eer_at_init": init["eer"], "eval/min_dcf_at_init": init["min_dcf"]})
        print(f"EER at initialisation: {100 * init['eer']:.2f}%  minDCF {init['min_dcf']:.3f}", file=sys.stderr)

    # -- the loop ----------------------------------------------------------------------------------
    student.train()
    teacher.train()
    proto_params = [prototypes] if prototypes.is_leaf else []
    clip_params = list(student.parameters()) + proto_params
    progress = Progress(total_steps, start_step, enabled=cfg.progress and rank == 0)
    hub.emit("on_train_start", ctx)
    if saved is None and rank == 0:
        # the state before the first step: a run that diverges before its first checkpoint can
        # still resume (written quietly: no on_save_checkpoint event, no flush)
        checkpoints.save(emit=False)
    stopped_by = None
    nonfinite: Optional[str] = None
    last_t0: Optional[float] = None
    loop_t0 = time.perf_counter()
    batches = feed.batches(start_step, total_steps)  # the same batches for any num_workers / resume
    with StopSignal() as stop:
        while run.step < total_steps:
            epoch = run.epoch
            for b in range(run.step % per_epoch, per_epoch):
                if run.step >= total_steps or stop.signum is not None or hub.should_stop:
                    break
                step = run.step                                         # this step's index
                t0 = time.perf_counter()
                if last_t0 is not None:  # the whole previous step: data, compute, monitors, logging
                    hub.log({"perf/step_ms": 1000.0 * (t0 - last_t0)}, step=step)
                last_t0 = t0
                ctx.step, ctx.epoch = step, epoch
                batch = next(batches)                                   # on the device, non-blocking
                hub.log({"perf/data_wait_ms": 1000.0 * feed.last_wait_s,
                         "data/skipped_files": feed.skipped_files}, step=step)
                glb, loc, B = view_major(batch, cfg)                    # (g*B, T, 80), (l*B, T/2, 80)
                lr, wd, m = sched.at(step)                              # schedules of this step
                apply_schedule(optimizer, lr, wd)

                # forward: teacher on the global crops, student on the local crops
                with torch.no_grad(), autocast():
                    _, t_z = teacher(glb)                               # (g*B, D)
                with autocast():
                    s_emb, s_z = student_ddp(loc)                       # (l*B, E), (l*B, D)
                # the loss in fp32 (no-ops without amp)
                out = criterion(s_z.float(), t_z.float(), prototypes, cfg.local_num, student_emb=s_emb.float())

                optimizer.zero_grad(set_to_none=True)
                (scaler.scale(out["loss"]) if scaler else out["loss"]).backward()
                average_prototype_grad(prototypes, world, cfg)
                if scaler:
                    scaler.unscale_(optimizer)         # monitors and clipping see the true gradients
                hub.after_backward(ctx)
                clip_per_parameter(clip_params, cfg.clip_grad)
                if sched.frozen(step):
                    freeze_prototypes(cfg, student, prototypes)
                hub.before_step(ctx)
                optimizer_step(optimizer, scaler)
                hub.after_step(ctx)
                if not cfg.bug_no_ema:
                    ema_update(teacher, student, m, copy_buffers=False)  # as the original: parameters only

                outputs = StepOutputs(
                    loss=out["loss"].detach(),
                    terms={k: out[k] for k in ("ploss", "me_max", "ke_loss", "np", "max_t", "min_t")},
                    student_probs=out["student_probs"], teacher_targets=out["teacher_targets"],
                    embeddings=s_emb.detach()[:B], projections=t_z[:B].detach(),
                    labels=batch["speaker"].to(device, non_blocking=True),
                    schedules={"lr": lr, "wd": wd, "momentum": m},
                )
                hub.end_step(outputs, ctx, epoch=epoch)
                run.step = step + 1
                progress.update(run.step, hub.last_values)
                if run.step % cfg.ckpt_every == 0 and run.step < total_steps:
                    checkpoints.save()
                if cfg.on_nonfinite == "stop":  # host values of the last flush: no sync here
                    nonfinite = nonfinite_seen(hub, start_step)
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
            checkpoints.save()
    progress.close()
    loop_s = time.perf_counter() - loop_t0
    data_summary = {"data/skipped_files": feed.skipped_files,
                    "data/wait_share": feed.wait_seconds / loop_s if loop_s > 0 else 0.0,
                    "perf/threads": torch.get_num_threads()}   # the compute threads this process ran with
    hub.set_summary(data_summary)
    result.update(data_summary)

    if stopped_by is not None:
        if rank == 0:
            print(_stop_message(cfg, manager, run.step, stopped_by, nonfinite is not None, checkpoints.last_good_step),
                  file=sys.stderr)
        hub.close()
        finish_distributed(world)
        result.update({"step": run.step, "stopped_by": stopped_by, "checkpoint": str(ckpt_path),
                       "last_good_step": checkpoints.last_good_step})
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
    ctx.step = max(run.step - 1, 0)
    final = evaluate(teacher, "final")
    if final:
        print(report_final(final, result, hub, ctx.step), file=sys.stderr)
    hub.emit("on_train_end", ctx)
    result.update({"step": run.step, "checkpoint": str(ckpt_path), "findings": [str(f) for f in hub.findings],
                   "health": hub.health_summary()})
    if wandb_sink is not None and hub.sink_active(wandb_sink):
        result["wandb_run_id"] = wandb_sink.run_id
        result["wandb_run_dir"] = wandb_sink.run_dir
    hub.close()
    finish_distributed(world)
    return result


def _stop_message(cfg: Config, manager: ckpt.CheckpointManager, step: int, stopped_by: str, nonfinite: bool,
                  good: Optional[int]) -> str:
    """What rank 0 prints when the loop stopped early: where the last good checkpoint is and how to go on."""
    if not nonfinite:
        return (f"stopped at step {step} by {stopped_by}; checkpoint written to {manager.pointer}; "
                f"continue with resume=true")
    where = (f"the last good checkpoint is {manager.step_path(good)} (step {good}), linked as {manager.pointer}; "
             f"lower lr (now {cfg.lr}) or set clip_grad, then resume from it with: {resume_command(cfg)}"
             if good is not None else "no finite checkpoint was written before: lower lr or set clip_grad and start again")
    return f"stopped at step {step} by {stopped_by}; nothing non-finite was saved; {where}"
