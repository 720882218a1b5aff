"""The run's state and the checkpoint glue of the training loop: :class:`TrainState` (what a run
changes as it trains, in one object), the state to resume from, restoring it, writing the run's
state (never one seen non-finite), and the command that resumes a stopped run. The files
themselves are :mod:`pipeline.checkpoint`'s."""
from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from monitors import MonitorHub, RunContext
from monitors.core.codes import PROTO_NONFINITE
from monitors.formats.sinks import WandbSink

from . import checkpoint as ckpt
from .config import Config
from .loader import TrainFeed


@dataclass
class TrainState:
    """What a training run changes as it trains, built once by the loop's set-up: the networks,
    the prototypes ``(K, D)``, the optimizer, the fp16 GradScaler (None otherwise; not
    checkpointed), the data feed (its ``state_dict`` is the checkpoint's ``data``) and ``step``,
    the global step the loop is at (the next one to run). ``student_ddp`` is the student as the
    forward pass calls it: DDP with several processes, else the student itself.
    :class:`RunCheckpointer` writes it and :func:`restore` reads it back."""
    student: torch.nn.Module
    teacher: torch.nn.Module
    student_ddp: torch.nn.Module
    prototypes: torch.Tensor
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    feed: TrainFeed
    per_epoch: int
    step: int = 0

    @property
    def epoch(self) -> int:
        return self.step // self.per_epoch


def find_resume_state(cfg: Config, manager: ckpt.CheckpointManager, rank: int
                      ) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    """(state, its path) of the newest good checkpoint with ``resume=true``, else (None, None).
    Rank 0 clears the temporaries a killed run left first; a resumed config must match."""
    if rank == 0:
        manager.clean_temporaries()
    found = manager.load_newest_good(repoint=rank == 0, trust_pickle=cfg.trust_pickle) if cfg.resume else None
    if found is not None:
        state, resumed_from = found
        ckpt.check_resume_config(state.get("config", {}), cfg.to_dict(), resumed_from)
        return state, resumed_from
    if cfg.resume and rank == 0:
        print(f"resume=true but {manager.dir} holds no checkpoint yet: starting a new run", file=sys.stderr)
    return None, None


def restore(saved: dict[str, Any], run: TrainState, hub: MonitorHub, ctx: RunContext) -> int:
    """Load ``saved`` (a checkpoint dict) into ``run`` (networks, prototypes, optimizer, the feed's
    skipped files, ``step``), the RNG states and the monitor state; emit on_load_checkpoint.
    Returns the step to continue from."""
    run.student.load_state_dict(saved["student"])
    run.teacher.load_state_dict(saved["teacher"])
    if "prototypes" in saved:
        with torch.no_grad():
            run.prototypes.copy_(saved["prototypes"].to(run.prototypes.device))
    run.optimizer.load_state_dict(saved["optimizer"])
    run.feed.load_state_dict(saved.get("data"))
    run.step = int(saved["step"])
    ctx.step, ctx.epoch = run.step, run.epoch
    ckpt.set_rng_state(saved["rng"])
    hub.load_state_dict(saved.get("monitor_hub", {}))  # first: what it finds now is kept
    hub.emit_with("on_load_checkpoint", ctx, checkpoint=saved)
    return run.step


def nonfinite_seen(hub: MonitorHub, since_step: int) -> Optional[str]:
    """What was non-finite at this log interval (read from host values the hub already has:
    no extra sync), or None."""
    loss = hub.last_values.get("train/loss")
    if loss is not None and not math.isfinite(loss):
        return f"the loss is {loss}"
    for f in hub.findings:
        if f.code == PROTO_NONFINITE and f.severity == "error" and f.step >= since_step:
            return f"{PROTO_NONFINITE} at step {f.step}"
    return None


def resume_command(cfg: Config) -> str:
    """The command that resumes this run: the command line it was started with, plus resume=true."""
    argv = sys.argv[1:]
    if sys.argv and sys.argv[0].endswith(os.path.join("pipeline", "__main__.py")) and argv[:1] == ["train"]:
        args = [a for a in argv[1:] if not a.startswith("resume=")]
        return shlex.join(["python", "-m", "pipeline", "train", *args, "resume=true"])
    return f"python -m pipeline train --config <the run's config> {shlex.quote(f'exp_dir={cfg.exp_dir}')} resume=true"


class RunCheckpointer:
    """Writes the checkpoints of ``run`` (a :class:`TrainState`) at its current step. All ranks
    emit on_save_checkpoint (monitors may use collectives); rank 0 writes, unless non-finite values
    were seen at this interval (with ``on_nonfinite=stop``): then the last good checkpoint stays.
    ``last_good_step``: the step of the newest checkpoint written (or resumed from, with
    ``resumed``), None before the first."""

    def __init__(self, cfg: Config, manager: ckpt.CheckpointManager, hub: MonitorHub, ctx: RunContext,
                 run: TrainState, *, wandb_sink: Optional[WandbSink], rank: int, resumed: bool) -> None:
        self.cfg, self.manager, self.hub, self.ctx, self.run = cfg, manager, hub, ctx, run
        self.wandb_sink, self.rank = wandb_sink, rank
        self.start_step = run.step
        self.last_good_step: Optional[int] = run.step if resumed else None

    def state(self) -> dict[str, Any]:
        """The run's state at its current step, the monitors' own state not yet included."""
        run = self.run
        state = {
            "student": run.student.state_dict(), "teacher": run.teacher.state_dict(),
            "optimizer": run.optimizer.state_dict(), "step": run.step, "epoch": run.epoch,
            "config": self.cfg.to_dict(), "rng": ckpt.rng_state(),
            "wandb_run_id": self.wandb_sink.run_id if self.wandb_sink is not None else None,
            "data": run.feed.state_dict(),  # skipped files; the batch order itself follows from step
        }
        if not self.cfg.bug_proto_not_in_checkpoint:
            state["prototypes"] = run.prototypes.detach().cpu()
        return state

    def save(self, emit: bool = True) -> None:
        """Checkpoint the run's current step; ``emit=False`` writes quietly (no on_save_checkpoint,
        no flush)."""
        step = self.run.step
        state = self.state()
        if emit:
            self.hub.emit_with("on_save_checkpoint", self.ctx, checkpoint=state)
        state["monitor_hub"] = self.hub.state_dict()
        seen = nonfinite_seen(self.hub, self.start_step) if self.cfg.on_nonfinite == "stop" else None
        if seen is not None:  # finite maybe, yet diverged (e.g. 1e28 prototypes): not a good one
            if self.rank == 0:
                print(f"checkpoint of step {step} NOT written: {seen} at this interval", file=sys.stderr)
            return
        if self.rank == 0 and self.manager.save(state, step) is not None:
            self.last_good_step = step
