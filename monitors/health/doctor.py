"""The health doctor: diagnoses why prototypes do not train, and says how to fix it.

Every diagnosis is a :class:`~monitors.core.finding.Finding` with a stable code from
:data:`monitors.core.codes.CODES`. Static facts (leaf, requires_grad, param group, lr) are read from
Python attributes (:mod:`monitors.health.static_checks`); dynamic facts (value unchanged after the step,
NaN/Inf, collapse, ranks disagreeing) are accumulated in small tensors on the device during the
step and read once per log interval, where one named method judges each finding
(:mod:`monitors.health.interval_checks`), so the per-step hooks never synchronise with the GPU. The
checkpoint check lives in :mod:`monitors.health.checkpoint_check`.

The doctor is one :class:`~monitors.core.base.Monitor` driving groups of checks through one
interface (:mod:`monitors.health.settings`): each group is built with the checked settings and the
doctor's report function, owns its state, and is called by the doctor's hooks through its public
methods. This module holds the hooks and the step bookkeeping between them, and re-exports the
codes and the checkpoint helpers for ``from monitors.health.doctor import ...``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from ..core.base import Metrics, Monitor
from ..core.cadence import Every, on_multiple
from .checkpoint_check import check_checkpoint, find_prototypes_in_checkpoint, prototype_optimizer_state_in_checkpoint
from ..core.codes import (CODES, PROTO_COLLAPSE, PROTO_DUPLICATES, PROTO_FREEZE_IGNORED, PROTO_GRAD_NOT_AVERAGED,
                    PROTO_LR_ZERO, PROTO_NO_GRAD, PROTO_NONFINITE, PROTO_NORM_OUT_OF_RANGE, PROTO_NOT_IN_CHECKPOINT,
                    PROTO_NOT_IN_OPTIMIZER, PROTO_NOT_LEAF, PROTO_NOT_UPDATING, PROTO_REPLICAS_DIVERGED, SINK_FAILED,
                    TEACHER_NOT_UPDATING, TEACHER_SHARES_STUDENT, fix_of)
from ..core.distributed import world_size
from ..core.events import RunContext
from .interval_checks import IntervalChecks
from .settings import DoctorSettings
from .static_checks import StaticChecks
from ..core.proto_stats import SAMPLE_ABOVE, SAMPLE_ROWS, row_sample

__all__ = ["HealthDoctor", "CODES", "check_checkpoint", "find_prototypes_in_checkpoint",
           "prototype_optimizer_state_in_checkpoint", "PROTO_NOT_LEAF", "PROTO_NO_GRAD", "PROTO_NOT_IN_OPTIMIZER",
           "PROTO_LR_ZERO", "PROTO_NOT_UPDATING", "PROTO_NOT_IN_CHECKPOINT", "PROTO_REPLICAS_DIVERGED",
           "PROTO_NONFINITE", "PROTO_COLLAPSE", "PROTO_DUPLICATES", "PROTO_NORM_OUT_OF_RANGE", "SINK_FAILED",
           "PROTO_GRAD_NOT_AVERAGED", "PROTO_FREEZE_IGNORED", "TEACHER_SHARES_STUDENT", "TEACHER_NOT_UPDATING"]


class HealthDoctor(Monitor):
    """Emits findings (see :data:`CODES`) about prototypes that do not train.

    Args:
        patience: consecutive checked steps without a gradient (PROTO_NO_GRAD) or with lr 0
            in the prototypes' group only (PROTO_LR_ZERO) that stay ``info``; one more is an
            error / a warning.
        update_patience: consecutive steps with a non-zero gradient and an unchanged value
            after ``optimizer.step()`` tolerated before PROTO_NOT_UPDATING (read at the log
            interval, so it fires within ``update_patience + log_every`` steps).
        static_every: re-check that the optimizer holds the prototypes every n steps.
        sync_every: compare the prototypes across DDP ranks every n steps (a collective: every
            rank runs it).
        sync_tol: relative tolerance of that comparison.
        nonfinite_patience: consecutive steps with a NaN/Inf gradient (AMP skips) tolerated.
        collapse_min_fraction: PROTO_COLLAPSE when the perplexity of the batch-mean student
            probability is below ``max(2, collapse_min_fraction * min(K, N))``.
        collapse_row_tol: rows count as identical when no column's range (max - min over the
            rows) exceeds ``collapse_row_tol / K``.
        collapse_patience: consecutive collapsed log intervals before the warning turns error.
        collapse_warmup: steps ignored by the collapse check.
        collapse_every: run the collapse check every n steps (it is O(N K)).
        collapse_uniform_gap: a sample's assignment counts as near uniform when its entropy is
            within this many nats of ln K; the uniform kind of PROTO_COLLAPSE is more than half
            of the samples so, in more than half of an interval's steps. It is judged on the
            student probabilities and on the teacher targets (these only while the
            student's rows differ: Sinkhorn makes the targets of identical rows uniform, which is
            the one-prototype kind).
        collapse_embed_tol: embeddings given to ``on_embeddings`` count as identical when each
            is within this fraction of their mean norm from their mean.
        dup_cosine, dup_fraction: PROTO_DUPLICATES when more than ``dup_fraction`` of the
            prototypes have another one at cosine > ``dup_cosine``.
        dup_max_rows: rows compared against all others (a random subset when K is larger).
        dup_every: run that O(K^2 D) comparison at the first log interval and then at most every
            n steps (near-duplicates build up slowly).
        dup_max_pairs: at most this many (row, prototype) similarities per check: above
            ``dup_max_pairs / K`` rows the compared subset shrinks to that (512 rows at
            K=65,536 with the default 2^25).
        dup_pairs_per_log: similarities computed per log interval; a larger check is spread over
            consecutive intervals and judged when its last rows are compared (a whole check in
            one interval up to K=1,024 with the default 2^20; 32 intervals at K=65,536), so an
            interval computes at most ``dup_pairs_per_log`` similarities (dot products of length D).
        norm_min, norm_max: the allowed range of prototype norms.
    """

    name = "health"

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        patience: int = 20,
        update_patience: int = 10,
        static_every: int = 50,
        sync_every: int = 5,
        sync_tol: float = 1e-5,
        nonfinite_patience: int = 5,
        collapse_min_fraction: float = 0.05,
        collapse_row_tol: float = 1e-3,
        collapse_patience: int = 3,
        collapse_warmup: int = 0,
        collapse_every: int = 1,
        collapse_uniform_gap: float = 0.01,
        collapse_embed_tol: float = 1e-3,
        dup_cosine: float = 0.99,
        dup_fraction: float = 0.1,
        dup_max_rows: int = 4096,
        dup_every: int = 50,
        dup_max_pairs: int = 1 << 25,
        dup_pairs_per_log: int = 1 << 20,
        norm_min: float = 1e-4,
        norm_max: float = 1e3,
    ) -> None:
        super().__init__(every_n_steps)
        #: the checked options (ValueError naming the option on a bad value)
        self.settings = DoctorSettings(
            patience=patience, update_patience=update_patience, static_every=static_every, sync_every=sync_every,
            sync_tol=sync_tol, nonfinite_patience=nonfinite_patience, collapse_min_fraction=collapse_min_fraction,
            collapse_row_tol=collapse_row_tol, collapse_patience=collapse_patience, collapse_warmup=collapse_warmup,
            collapse_every=collapse_every, collapse_uniform_gap=collapse_uniform_gap,
            collapse_embed_tol=collapse_embed_tol, dup_cosine=dup_cosine, dup_fraction=dup_fraction,
            dup_max_rows=dup_max_rows, dup_every=dup_every, dup_max_pairs=dup_max_pairs,
            dup_pairs_per_log=dup_pairs_per_log, norm_min=norm_min, norm_max=norm_max)
        #: the groups of checks: each owns its state and reports through ``self.report``
        self.static = StaticChecks(self.settings, self.report)
        self.interval = IntervalChecks(self.settings, self.report)
        # the step bookkeeping between the hooks (not state)
        self._ab_obs: Optional[tuple[int, bool]] = None  # (step, grad missing) from on_after_backward
        self._bos_step = -1
        self._collective_started = False      # the first on_collective compares the initial values
        self._snap_step = -1
        self._update_step = -1                # step whose update norm was observed
        self._snap_gnorm: Optional[torch.Tensor] = None
        self.checkpoint_findings: Optional[tuple[int, list]] = None  # (id of the checkpoint, its findings)

    # -- hooks --------------------------------------------------------------------------------
    def on_train_start(self, ctx: RunContext) -> Metrics:
        """The static checks at the start: leaf, requires_grad, optimizer membership, finite values."""
        P = ctx.prototypes
        self.static.check_not_leaf(ctx)
        if not P.requires_grad:
            if ctx.freeze_steps > 0:
                self.report(ctx, PROTO_NO_GRAD, "info", (
                    f"the prototypes have requires_grad=False at the start; freeze_steps="
                    f"{ctx.freeze_steps}, so this is taken as an intended freeze. Set "
                    "prototypes.requires_grad_(True) when the freeze ends."
                ))
            else:
                self.report(ctx, PROTO_NO_GRAD, "error", (
                    "the prototypes have requires_grad=False, so they never get a gradient. Fix: "
                    "create them as nn.Parameter(x) (or call prototypes.requires_grad_(True)) before "
                    "building the optimizer."
                ))
        self.static.check_optimizer(ctx)
        # non-step event: reading device values is allowed
        if not bool(torch.isfinite(P.detach()).all()):
            self.report(ctx, PROTO_NONFINITE, "error", (
                f"the prototypes hold NaN/Inf before training starts: check their initialisation. "
                f"Fix: {fix_of(PROTO_NONFINITE)}."
            ))
        return None

    def on_collective(self, ctx: RunContext) -> Metrics:
        """The replica comparison (a collective), called by the hub on every rank even if this
        monitor was switched off on one: first at train start, then every ``sync_every`` steps."""
        if world_size() <= 1:
            return None
        P = ctx.prototypes
        if not self._collective_started:  # train start: reading the value is allowed
            self._collective_started = True
            gap = float(self.static.replica_gap(P))
            if gap > self.settings.sync_tol:
                self.report(ctx, PROTO_REPLICAS_DIVERGED, "error", (
                    f"the ranks start from different prototypes (relative fingerprint gap {gap:.3g}): "
                    "initialise them identically: seed every rank the same (torch.manual_seed(seed)) "
                    "before creating them, or broadcast them from rank 0 after creating them: "
                    "dist.broadcast(prototypes.data, src=0)."
                ))
        elif on_multiple(ctx.step, self.settings.sync_every):
            self.interval.observe_replica_gap(self.static.replica_gap(P))
        return None

    def on_after_backward(self, ctx: RunContext) -> Metrics:
        """PROTO_NOT_LEAF; note whether the prototypes got a gradient."""
        if self.static.check_not_leaf(ctx):
            return None
        self._ab_obs = (ctx.step, ctx.prototypes.grad is None)
        return None

    def on_before_optimizer_step(self, ctx: RunContext) -> Metrics:
        """PROTO_NO_GRAD, PROTO_NOT_IN_OPTIMIZER, PROTO_LR_ZERO; keep the gradient norm and a snapshot."""
        P = ctx.prototypes
        self._bos_step = ctx.step
        if self.static.check_not_leaf(ctx):
            return None
        grad = P.grad
        self.static.grad_step_check(ctx, grad is None)
        if self.static.static_due(ctx.step):
            group = self.static.check_optimizer(ctx)
        else:
            group = self.static.proto_group(ctx, rescan=False)
        lr = self.static.check_lr(ctx, group)
        if grad is None or not ctx.proto_stats.full_step(ctx):  # above full_above: every full_every steps
            return None
        # the gradient norm (shared with the gradient monitor) is NaN/Inf iff an entry is (or
        # |g| > ~1e19 in float32) and > 0 iff an entry is non-zero
        gnorm = ctx.proto_stats.grad_norm(ctx)
        if gnorm is None:  # a sparse gradient: not checked
            return None
        self.interval.observe_grad(gnorm)
        # snapshot for PROTO_NOT_UPDATING (skipped when lr 0 or frozen: other codes cover it),
        # shared with the delta monitor
        if lr != 0.0 and ctx.step >= ctx.freeze_steps:
            ctx.proto_stats.snapshot(ctx)
            self._snap_gnorm = gnorm
            self._snap_step = ctx.step
        return None

    def on_after_optimizer_step(self, ctx: RunContext) -> Metrics:
        """Keep the update norm of a snapshot step (PROTO_NOT_UPDATING, read at the log interval)."""
        P = ctx.prototypes
        if self._bos_step != ctx.step and self.static.grad_checked_step != ctx.step and P.is_leaf:
            self.static.grad_step_check(ctx, P.grad is None)
        if self._snap_step == ctx.step:
            self._snap_step = -1
            update = ctx.proto_stats.update_norm(ctx)  # ||P - snapshot||, shared with the delta monitor
            if update is not None:
                self.interval.observe_update(self._snap_gnorm, update)
                self._update_step = ctx.step
        return None

    def on_step_end(self, ctx: RunContext) -> Metrics:
        """Keep the norm that tells NaN/Inf prototypes; accumulate the collapse signs (nothing read)."""
        P = ctx.prototypes
        if (self.static.grad_checked_step != ctx.step and self._ab_obs is not None
                and self._ab_obs[0] == ctx.step):
            self.static.grad_step_check(ctx, self._ab_obs[1])
        # NaN/Inf prototypes: ||P|| is NaN/Inf iff an entry is (or beyond ~1e19 in float32, where
        # its square overflows). The step's update norm ||P - P_before|| is NaN/Inf iff P is, or
        # was before the step: a step with an update needs no pass over P here
        if self._update_step == ctx.step and self.interval.last_update is not None:
            self.interval.observe_rows(self.interval.last_update)
        elif ctx.proto_stats.full_step(ctx):
            self.interval.observe_rows(ctx.proto_stats.norm(ctx))
        else:  # above full_above between full steps: the rows of the norm monitor's sample
            idx = row_sample(P.shape[0], SAMPLE_ABOVE, SAMPLE_ROWS, P.device)
            self.interval.observe_rows(ctx.proto_stats.norm(ctx) if idx is None
                                       else torch.linalg.vector_norm(ctx.proto_stats.sampled_row_norms(ctx, idx)))
        self.interval.collapse_step(ctx)
        return None

    def on_embeddings(self, ctx: RunContext) -> Metrics:
        """PROTO_COLLAPSE when the embeddings handed over (``hub.log_embeddings``, an eval
        capture) are (near-)identical. Not a step event: reading the value is allowed."""
        x = ctx.embeddings
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 2:
            return None
        x = x.detach().float()
        spread = (x - x.mean(dim=0)).norm(dim=1).amax()
        scale = x.norm(dim=1).mean().clamp_min(1e-12)
        rel = float(spread / scale)  # note: a sync point; embeddings events only
        if rel <= self.settings.collapse_embed_tol:
            self.report(ctx, PROTO_COLLAPSE, "warning", (
                f"the {x.shape[0]} embeddings logged at step {ctx.step} are (near-)identical (each within "
                f"{rel:.2g} of their norm from their mean): every input maps to the same output, the "
                "one-prototype kind of collapse. Fix: balance the targets (Sinkhorn, centering), keep the "
                "me-max regulariser, lower the lr, and check that the inputs and augmentations differ."
            ))
        return None

    def on_save_checkpoint(self, ctx: RunContext) -> Metrics:
        """PROTO_NOT_IN_CHECKPOINT / PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT for the dict about to be written."""
        if ctx.checkpoint is None:
            return None
        self._check_checkpoint(ctx, loaded=False)
        return None

    def on_load_checkpoint(self, ctx: RunContext) -> Metrics:
        """The same check for the dict just resumed from ("not restored" when the saved prototypes differ)."""
        if ctx.checkpoint is None:
            return None
        self._check_checkpoint(ctx, loaded=True)
        return None

    def _check_checkpoint(self, ctx: RunContext, loaded: bool) -> None:
        """The checkpoint check (:func:`monitors.health.checkpoint_check.check_checkpoint`, the optimizer
        state included); its answer stays in :attr:`checkpoint_findings` for ``hub.check_checkpoint``."""
        found = check_checkpoint(ctx.checkpoint, ctx.prototypes, step=ctx.step, loaded=loaded,
                                 name=ctx.extra.get("prototypes_name"), optimizer=ctx.optimizer)
        self.checkpoint_findings = (id(ctx.checkpoint), found)
        for f in found:
            self.report(ctx, f.code, f.severity, f.message)

    def on_log(self, ctx: RunContext) -> Metrics:
        """The judgement of the interval (:meth:`IntervalChecks.judge`: one host read)."""
        self.interval.judge(ctx)
        return None

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The groups' counters and device accumulators (on the CPU), in one flat dict."""
        return {**self.static.state_dict(), **self.interval.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (earlier versions' states too)."""
        self.static.load_state_dict(state)
        self.interval.load_state_dict(state)
