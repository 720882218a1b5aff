"""The checkpoint glue of the training loop: the state to resume from, restoring it, writing the
run's state (never one seen non-finite), and the command that resumes a stopped run. The files
themselves are :mod:`pipeline.checkpoint`'s."""
from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from monitors import MonitorHub, RunContext
from monitors.codes import PROTO_NONFINITE
from monitors.sinks import WandbSink

from . import checkpoint as ckpt
from .config import Config
from .loader import TrainFeed


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


def restore(state: dict[str, Any], *, student: torch.nn.Module, teacher: torch.nn.Module,
            prototypes: torch.Tensor, optimizer: torch.optim.Optimizer, hub: MonitorHub, ctx: RunContext,
            device: torch.device, per_epoch: int) -> int:
    """Load networks, prototypes, optimizer, RNG states and monitor state; emit
    on_load_checkpoint. Returns the step to continue from."""
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
    hub.emit_with("on_load_checkpoint", ctx, checkpoint=state)
    return start_step


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
    """Writes the run's checkpoints. All ranks emit on_save_checkpoint (monitors may use
    collectives); rank 0 writes, unless non-finite values were seen at this interval (with
    ``on_nonfinite=stop``): then the last good checkpoint stays. ``last_good_step``: the step
    of the newest checkpoint written (or resumed from), None before the first."""

    def __init__(self, cfg: Config, manager: ckpt.CheckpointManager, hub: MonitorHub, ctx: RunContext, *,
                 student: torch.nn.Module, teacher: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 prototypes: torch.Tensor, feed: TrainFeed, wandb_sink: Optional[WandbSink], rank: int,
                 per_epoch: int, start_step: int, resumed: bool) -> None:
        self.cfg, self.manager, self.hub, self.ctx = cfg, manager, hub, ctx
        self.student, self.teacher, self.optimizer, self.prototypes = student, teacher, optimizer, prototypes
        self.feed, self.wandb_sink, self.rank, self.per_epoch = feed, wandb_sink, rank, per_epoch
        self.start_step = start_step
        self.last_good_step: Optional[int] = start_step if resumed else None

    def state(self, step: int) -> dict[str, Any]:
        """The run's state at ``step``, the monitors' own state not yet included."""
        state = {
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(), "step": step, "epoch": step // self.per_epoch,
            "config": self.cfg.to_dict(), "rng": ckpt.rng_state(),
            "wandb_run_id": self.wandb_sink.run_id if self.wandb_sink is not None else None,
            "data": self.feed.state_dict(),  # skipped files; the batch order itself follows from step
        }
        if not self.cfg.bug_proto_not_in_checkpoint:
            state["prototypes"] = self.prototypes.detach().cpu()
        return state

    def save(self, step: int, emit: bool = True) -> None:
        """Checkpoint ``step``; ``emit=False`` writes quietly (no on_save_checkpoint, no flush)."""
        state = self.state(step)
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
