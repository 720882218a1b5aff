"""The event protocol between a training loop and the monitors.

A loop (the reference pipeline, ``attach()`` on a foreign loop, or the Lightning callback)
fills one :class:`RunContext` per run and emits the events of :data:`EVENTS` in order; every
monitor hook receives that same context.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from .proto_stats import ProtoStats

#: Events in the order one optimizer step emits them (train start/end and checkpoints aside).
EVENTS: tuple[str, ...] = (
    "on_train_start",            # once, before the first step
    "on_after_backward",         # gradients accumulated: prototypes.grad is valid
    "on_before_optimizer_step",  # after clipping/cancelling, before step(): params still old
    "on_after_optimizer_step",   # right after step(): params new
    "on_step_end",               # end of the step: ctx.outputs holds the step outputs
    "on_embeddings",             # labelled embeddings available: ctx.embeddings, ctx.labels
    "on_save_checkpoint",        # ctx.checkpoint is the dict about to be written
    "on_load_checkpoint",        # ctx.checkpoint is the dict just read
    "on_train_end",              # once
)

#: Events that happen once per optimizer step; a monitor's ``every_n_steps`` applies to these.
STEP_EVENTS: frozenset[str] = frozenset(
    {"on_after_backward", "on_before_optimizer_step", "on_after_optimizer_step", "on_step_end"}
)

#: Hooks a monitor may define besides the events: ``on_log`` at each log interval;
#: ``on_collective`` on every rank at the start of :data:`COLLECTIVE_EVENTS`, also for a monitor
#: switched off for raising, so that the ranks keep meeting in its collectives.
EXTRA_HOOKS: tuple[str, ...] = ("on_log", "on_collective")

#: The events that begin with the ``on_collective`` hooks.
COLLECTIVE_EVENTS: tuple[str, ...] = ("on_train_start", "on_after_optimizer_step")


@dataclass(frozen=True)
class StepOutputs:
    """What one training step produced, detached. Tensors stay on the training device."""

    loss: Optional[torch.Tensor] = None
    #: loss terms and statistics as 0-dim tensors: ploss, me_max, ke_loss, np, max_t, min_t, ...
    terms: Mapping[str, torch.Tensor] = field(default_factory=dict)
    student_probs: Optional[torch.Tensor] = None    # (N_student, K) soft assignments p
    teacher_targets: Optional[torch.Tensor] = None  # (N_student, K) targets t after Sinkhorn
    embeddings: Optional[torch.Tensor] = None       # (B, E) speaker embeddings (backbone output)
    projections: Optional[torch.Tensor] = None      # (B, D) head outputs, the prototypes' space
    labels: Optional[torch.Tensor] = None           # (B,) speaker indices when known (monitoring only)
    #: schedule values of this step as Python floats: lr, wd, momentum, ...
    schedules: Mapping[str, float] = field(default_factory=dict)


@dataclass
class RunContext:
    """The state every hook sees. The loop updates ``step``, ``epoch`` and ``outputs``."""

    prototypes: torch.Tensor                   # (K, D) the watched tensor
    optimizer: Optional[torch.optim.Optimizer] = None
    model: Optional[torch.nn.Module] = None    # the student (or the whole model)
    teacher: Optional[torch.nn.Module] = None
    config: Mapping[str, Any] = field(default_factory=dict)
    step: int = 0                              # index of the current optimizer step, from 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    outputs: Optional[StepOutputs] = None
    checkpoint: Optional[dict] = None
    embeddings: Optional[torch.Tensor] = None  # (N, D) for on_embeddings, in the prototypes' space
    labels: Optional[Sequence[Any]] = None     # N speaker labels for on_embeddings
    #: steps during which a frozen prototype is intended (freeze_last_layer, lr-0 warm-up)
    freeze_steps: int = 0
    #: name -> tensor groups the gradient monitor reports besides the prototypes
    param_groups: Mapping[str, Sequence[torch.nn.Parameter]] = field(default_factory=dict)
    #: where local files (records, images) go; None keeps them in memory only
    exp_dir: Optional[str] = None
    #: free-form values an integration shares with its monitors
    extra: dict[str, Any] = field(default_factory=dict)
    #: statistics of the prototypes and their gradient that several monitors need in the same
    #: event (row norms, the pre-step snapshot, the update's row norms), computed once; the hub
    #: resets it before each event. See :mod:`monitors.core.proto_stats`
    proto_stats: ProtoStats = field(default_factory=ProtoStats, repr=False, compare=False)

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0
