"""The health doctor's log-interval judgement: the device accumulators, the one read per interval,
and one named judgement per finding.

:class:`IntervalJudge` is a part of :class:`~monitors.health.doctor.HealthDoctor` (a mixin): per step it
accumulates the collapse statistics on the device (:meth:`IntervalJudge._collapse_step`); at each
log interval :meth:`IntervalJudge.on_log` reads every accumulator, the norm range, the duplicate
fraction and the per-step flags in ONE host transfer into an :class:`Interval` record, then judges
it: ``_judge_not_updating``, ``_judge_nonfinite``, ``_judge_replicas``, ``_judge_collapse``,
``_judge_duplicates``, ``_judge_norms``, in that order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.base import Metrics
from ..core.cadence import on_multiple
from ..core.codes import (PROTO_COLLAPSE, PROTO_DUPLICATES, PROTO_NONFINITE, PROTO_NORM_OUT_OF_RANGE, PROTO_NOT_UPDATING,
                    PROTO_REPLICAS_DIVERGED, fix_of)
from ..core.distributed import world_size
from ..core.events import RunContext
from ..core.proto_stats import assignment_rows

#: device-side accumulators (all 0-dim) -> (dtype, reset value); see HealthDoctor._devstate.
#: div: largest rank disagreement; col_*: collapsed steps, identical-rows steps, smallest entropy
#: of the mean assignment, smallest batch-mean gap of the per-sample entropy to ln K.
DEVICE_STATE: dict[str, tuple[torch.dtype, float]] = {
    "div": (torch.float64, 0.0),
    "col_hits": (torch.int64, 0), "col_ident": (torch.int64, 0), "col_uniform": (torch.int64, 0),
    "col_ent_min": (torch.float32, math.inf), "col_gap_min": (torch.float32, math.inf),
}


def longest_run(flags: list[float], run: int) -> tuple[int, int]:
    """Continue a run of consecutive true ``flags`` (0/1 floats) from ``run``; returns (the run
    at the end, the longest run seen, which includes the starting run)."""
    longest = run
    for f in flags:
        run = run + 1 if f else 0
        longest = max(longest, run)
    return run, longest


@dataclass(frozen=True)
class Interval:
    """What one log interval observed, read on the host: the judgements read only this."""

    step: int
    num_proto: int
    div: float            # largest relative replica disagreement
    col_hits: float       # steps judged collapsed
    col_ident: float      # ... of them with identical rows
    col_uniform: float    # ... of them near uniform
    col_ent_min: float    # smallest entropy of the batch-mean assignment (nats)
    col_gap_min: float    # smallest batch-mean gap of the per-sample entropy to ln K (nats)
    norm_range: Optional[tuple[float, float]]  # smallest and largest prototype norm (None: not 2-D, K < 2)
    duplicates: Optional[float]                # duplicate fraction of a finished check, else None


def _row_entropy(m: torch.Tensor) -> torch.Tensor:
    """(N,) entropy in nats of each row of probabilities ``m`` (0 log 0 = 0; NaN stays NaN).
    ``torch.special.entr`` takes a per-element branch on CPU: ~10x slower than this on a batch."""
    logs = m.clamp_min(torch.finfo(m.dtype).tiny).log_()
    return -(logs.mul_(m)).sum(dim=-1)


class IntervalJudge:
    """The log-interval half of the doctor (see the module docstring); the doctor owns the state."""

    # -- per step: the collapse statistics, on the device -------------------------------------
    def _collapse_step(self, ctx: RunContext, d: dict[str, torch.Tensor]) -> None:
        """Accumulate this step's collapse signs (identical rows, near-uniform rows, few
        prototypes used) into the device state ``d``; nothing is read."""
        out = ctx.outputs
        if out is None or not on_multiple(ctx.step, self.collapse_every, start=self.collapse_warmup):
            return
        # large K: the first assignment_rows(K) rows of each matrix (every row of a usual batch at K=512)
        probs, targets = (m if m is None or m.dim() != 2 else m[:assignment_rows(m.shape[-1])]
                          for m in (out.student_probs, out.teacher_targets))
        mats = [m.detach() for m in (probs, targets) if m is not None and m.dim() == 2 and m.shape[0] >= 2]
        if not mats:
            return
        # rows identical: every input maps to the same assignment (representation collapse).
        # The largest column range over the rows, in units of 1/K, of each matrix.
        x = torch.stack(mats) if len(mats) == 2 and mats[0].shape == mats[1].shape else mats[0][None]
        lo, hi = x.amin(dim=1), x.amax(dim=1)  # (M, K); aminmax over a middle dim takes a slow path on CPU
        spread = (hi - lo).amax(dim=-1)  # (M,) largest column range of each matrix
        tol = self.collapse_row_tol / x.shape[-1]
        ident = spread.amax() <= tol  # all M identical
        # near uniform (the "loss stuck at ln K" kind): most samples' entropy within
        # collapse_uniform_gap of ln K, in the student probabilities, or in the targets while the
        # student's rows differ (Sinkhorn makes the targets of identical rows uniform too: that
        # is the one-prototype kind)
        uniform = torch.zeros((), dtype=torch.bool, device=x.device)
        have_p = probs is not None and probs.dim() == 2 and probs.shape[0] >= 2
        for m, is_target in ((probs, False), (targets, True)):
            if m is None or m.dim() != 2 or m.shape[0] < 2:
                continue
            gap = math.log(m.shape[-1]) - _row_entropy(m.detach().float())  # (N,) nats
            near = (gap <= self.collapse_uniform_gap).float().mean() > 0.5
            if is_target and have_p:
                near = near & (spread[0] > tol)
            uniform = uniform | near
            torch.minimum(d["col_gap_min"], gap.mean(), out=d["col_gap_min"])
        collapsed = ident | uniform
        # few prototypes used: entropy of the batch-mean student probability (rows sum to 1)
        a = probs.detach() if probs is not None and probs.dim() == 2 else mats[0]
        n, k = a.shape
        if min(k, n) >= 4:
            ent = torch.special.entr(a.float().mean(dim=0)).sum()
            torch.minimum(d["col_ent_min"], ent, out=d["col_ent_min"])
            threshold = max(2.0, self.collapse_min_fraction * min(k, n))  # perplexity
            collapsed = collapsed | (ent < math.log(threshold))
        d["col_hits"].add_(collapsed)
        d["col_ident"].add_(ident & ~uniform)
        d["col_uniform"].add_(uniform)
        self.collapse_checked += 1

    # -- the log interval ------------------------------------------------------------------------
    def on_log(self, ctx: RunContext) -> Metrics:
        """Read the interval (one host transfer), judge each finding, reset the interval state."""
        obs = self._read_interval(ctx)
        self._judge_not_updating(ctx, obs)
        self._judge_nonfinite(ctx, obs)
        self._judge_replicas(ctx, obs)
        self._judge_collapse(ctx, obs)
        self._judge_duplicates(ctx, obs)
        self._judge_norms(ctx, obs)
        self._reset_interval(ctx)
        return None

    def _read_interval(self, ctx: RunContext) -> Interval:
        """The accumulators, the cheap O(K^2 D) statistics of the interval and the per-step flags,
        moved to the host together; the consecutive-step counters advance with the flags."""
        P = ctx.prototypes.detach()
        d = self._devstate(P.device)
        K = P.shape[0]
        extra: list[torch.Tensor] = []
        dup_due = self._dup_todo is not None or self._dup_cadence.due(ctx.step)
        if P.dim() == 2 and K >= 2:
            Pf = P.float()
            norms = Pf.norm(dim=1)
            extra += [norms.min().double(), norms.max().double()]
            if dup_due:
                dup = self._duplicate_fraction(Pf, norms, ctx.step)
                if dup is not None:  # None: the check goes on at the next interval
                    extra.append(dup)
        keys = tuple(DEVICE_STATE)
        flags, n_g, n_s = self._observations(P.device)
        head = len(keys) + len(extra)
        # note: the one CPU-GPU sync point of this monitor per interval
        values = torch.cat([torch.stack([d[k].double() for k in keys] + extra), flags]).cpu().tolist()
        self._advance(values[head:], n_g, n_s)
        v = dict(zip(keys, values))
        rest = values[len(keys):head]
        return Interval(step=ctx.step, num_proto=K, **v,
                        norm_range=(rest[0], rest[1]) if rest else None,
                        duplicates=rest[2] if len(rest) == 3 else None)

    def _judge_not_updating(self, ctx: RunContext, obs: Interval) -> None:
        """PROTO_NOT_UPDATING: a non-zero gradient but an unchanged value for too many steps."""
        if self.stuck_longest > self.update_patience:
            self.report(ctx, PROTO_NOT_UPDATING, "error", (
                f"the prototypes had a non-zero gradient but did not change across optimizer.step() "
                f"for {self.stuck_longest} consecutive steps (up to step {obs.step}): the optimizer that "
                f"steps does not update them. Fix: {fix_of(PROTO_NOT_UPDATING)}."
            ))

    def _judge_nonfinite(self, ctx: RunContext, obs: Interval) -> None:
        """PROTO_NONFINITE: NaN/Inf prototypes, or NaN/Inf gradients (isolated ones are info)."""
        step = obs.step
        if self.nonfinite_seen:
            self.report(ctx, PROTO_NONFINITE, "error", (
                f"the prototypes hold NaN/Inf (seen by step {step}): training of the prototypes is "
                f"lost from there on; resume from an earlier checkpoint. Fix: {fix_of(PROTO_NONFINITE)}."
            ))
        if self.gnf_longest > self.nonfinite_patience:
            self.report(ctx, PROTO_NONFINITE, "error", (
                f"the prototypes' gradient was NaN/Inf for {self.gnf_longest} consecutive steps (by "
                f"step {step}). Fix: {fix_of(PROTO_NONFINITE)}."
            ))
        elif self.gnf_longest > 0:
            self.report(ctx, PROTO_NONFINITE, "info", (
                f"the prototypes' gradient was NaN/Inf in step(s) up to step {step}; "
                "isolated ones are normal with AMP (GradScaler skips those steps)."
            ))

    def _judge_replicas(self, ctx: RunContext, obs: Interval) -> None:
        """PROTO_REPLICAS_DIVERGED: the ranks' prototypes drifted apart during the interval."""
        if obs.div > self.sync_tol:
            self.report(ctx, PROTO_REPLICAS_DIVERGED, "error", (
                f"the prototypes differ across the {world_size()} ranks (relative fingerprint "
                f"gap {obs.div:.3g} by step {obs.step}): their gradient is not averaged across ranks "
                f"because they live outside the DDP module, so each rank trains its own. Fix: "
                f"{fix_of(PROTO_REPLICAS_DIVERGED)}."
            ))

    def _judge_collapse(self, ctx: RunContext, obs: Interval) -> None:
        """PROTO_COLLAPSE: most checked steps collapsed; error after ``collapse_patience`` intervals."""
        if self.collapse_checked <= 0:
            return
        if 2 * obs.col_hits <= self.collapse_checked:
            self.collapse_intervals = 0
            return
        self.collapse_intervals += 1
        K = obs.num_proto
        if obs.col_uniform * 2 > self.collapse_checked:
            what = (f"uniform kind: most samples' assignment is near uniform (mean entropy "
                    f"{obs.col_gap_min:.2g} nats below ln K = {math.log(K):.3g}): the targets "
                    "carry no information and the loss sits at ln K. Fix: sharpen the targets: "
                    "lower the teacher temperature (DINO: 0.04, warm-up from 0.04), a slower "
                    "center momentum (0.9), sharpening in SDPN/MSN; check that the centering does "
                    "not dominate")
        elif obs.col_ident * 2 > self.collapse_checked:
            what = ("one-prototype kind: every input of the batch maps to the same assignment (the "
                    "rows of the student probabilities / teacher targets are identical): the "
                    "representation collapsed, or the inputs are all the same. Fix: balance the "
                    "targets (Sinkhorn, centering), keep the me-max regulariser, lower the lr, and "
                    "check that the inputs and augmentations differ")
        else:
            what = (f"one-prototype kind: the batch-mean student probability uses few prototypes "
                    f"(perplexity {math.exp(obs.col_ent_min):.3g} of {K}). Fix: balance the "
                    "targets (Sinkhorn, centering), keep the me-max regulariser, lower the lr")
        sev = "error" if self.collapse_intervals >= self.collapse_patience else "warning"
        self.report(ctx, PROTO_COLLAPSE, sev, (
            f"assignment collapse in {int(obs.col_hits)} of {self.collapse_checked} steps up to "
            f"step {obs.step} ({self.collapse_intervals} log interval(s) in a row), {what}."
        ))

    def _judge_duplicates(self, ctx: RunContext, obs: Interval) -> None:
        """PROTO_DUPLICATES: too many prototypes have a near-duplicate (when a check finished)."""
        if obs.norm_range is None:
            return
        dup = obs.duplicates if obs.duplicates is not None else 0.0
        if dup > self.dup_fraction:
            self.report(ctx, PROTO_DUPLICATES, "warning", (
                f"{100 * dup:.0f}% of the prototypes have a near-duplicate (cosine > "
                f"{self.dup_cosine}) at step {obs.step}: they waste capacity. Fix: {fix_of(PROTO_DUPLICATES)}."
            ))

    def _judge_norms(self, ctx: RunContext, obs: Interval) -> None:
        """PROTO_NORM_OUT_OF_RANGE: the smallest or largest norm is outside [norm_min, norm_max]."""
        if obs.norm_range is None:
            return
        nmin, nmax = obs.norm_range
        if nmin < self.norm_min or nmax > self.norm_max:
            self.report(ctx, PROTO_NORM_OUT_OF_RANGE, "warning", (
                f"prototype norms span [{nmin:.3g}, {nmax:.3g}] at step {obs.step}, outside "
                f"[{self.norm_min:g}, {self.norm_max:g}]. Fix: {fix_of(PROTO_NORM_OUT_OF_RANGE)}."
            ))

    def _reset_interval(self, ctx: RunContext) -> None:
        """Reset the interval accumulators (the consecutive runs carry on)."""
        d = self._devstate(ctx.prototypes.device)
        self.stuck_longest, self.gnf_longest, self.nonfinite_seen = self.stuck_run, self.gnf_run, False
        d["div"].zero_()
        d["col_hits"].zero_()
        d["col_ident"].zero_()
        d["col_uniform"].zero_()
        d["col_ent_min"].fill_(math.inf)
        d["col_gap_min"].fill_(math.inf)
        self.collapse_checked = 0

    # -- the pieces of the read --------------------------------------------------------------------
    def _duplicate_fraction(self, Pf: torch.Tensor, norms: torch.Tensor, step: int) -> Optional[torch.Tensor]:
        """Continue the duplicate check: compare up to ``dup_pairs_per_log`` similarities' worth of
        its rows with every prototype. When its last rows are done, return the 0-dim float64
        fraction of the compared rows with another prototype at cosine > ``dup_cosine``; until
        then None. A check compares at most ``dup_max_rows`` and ``dup_max_pairs / K`` rows, a
        random subset seeded by the step it starts at when K is larger. No (K, D) temporary:
        the (m, K) block of dot products is divided by the norms in place."""
        K = Pf.shape[0]
        if self._dup_todo is None or self._dup_todo.device != Pf.device or self._dup_k != K:
            n = min(K, self.dup_max_rows, max(1, self.dup_max_pairs // K))
            if n < K:
                g = torch.Generator().manual_seed(step)
                idx = torch.randperm(K, generator=g)[:n].to(Pf.device)
            else:
                idx = torch.arange(K, device=Pf.device)
            self._dup_todo, self._dup_best, self._dup_k = idx, [], K
            self._dup_cadence.last = int(step)  # the cadence counts from the start of a check
        inv = norms.clamp_min(1e-12).reciprocal()                     # (K,)
        per_block = max(1, min(self.dup_pairs_per_log, 1 << 24) // K)  # rows per (m, K) block
        budget = max(1, self.dup_pairs_per_log // K)                   # rows this interval
        now, self._dup_todo = self._dup_todo[:budget], self._dup_todo[budget:]
        for chunk in now.split(per_block):
            sim = Pf[chunk] @ Pf.T                                     # (m, K) dot products
            sim.mul_(inv[chunk, None]).mul_(inv[None, :])              # cosines, in place
            sim[torch.arange(chunk.numel(), device=Pf.device), chunk] = -2.0  # not yourself
            self._dup_best.append(sim.amax(dim=1))
        if self._dup_todo.numel():
            return None
        best = torch.cat(self._dup_best)
        self._dup_todo, self._dup_best, self.dup_checked_rows = None, [], best.numel()
        return (best > self.dup_cosine).double().mean()

    def _observations(self, device: torch.device) -> tuple[torch.Tensor, int, int]:
        """The per-step observations since the last call as one float64 vector of flags on the
        device (nothing read): NaN/Inf gradient per step (n_g), stuck per snapshot step (n_s),
        then whether any row norm was NaN/Inf. Returns (flags, n_g, n_s) and clears them."""
        parts = []
        n_g, n_s = len(self._obs_gnorm), len(self._obs_stuck)
        if n_g:
            parts.append((~(torch.stack(self._obs_gnorm) < math.inf)).double())  # NaN < inf is False
        if n_s:
            # stuck: gradient non-zero and value unchanged (an update norm is 0 iff no entry
            # changed; NaN > 0 and NaN == 0 are False: a NaN step is not "stuck")
            g, u = torch.stack(self._obs_stuck), torch.stack(self._obs_update)
            parts.append(((g > 0) & (u == 0)).double())
        total = torch.zeros((), dtype=torch.float64, device=device)
        if self._obs_rows:
            try:
                total = torch.stack(self._obs_rows).sum(dtype=torch.float64)
            except RuntimeError:  # K changed within the interval
                total = torch.stack([r.sum(dtype=torch.float64) for r in self._obs_rows]).sum()
        parts.append((~torch.isfinite(total)).double().reshape(1))
        self._obs_gnorm, self._obs_stuck, self._obs_update, self._obs_rows = [], [], [], []
        return torch.cat([x.to(device) for x in parts]), n_g, n_s

    def _advance(self, flags: list[float], n_g: int, n_s: int) -> None:
        """Continue the consecutive-step counters with the flags of :meth:`_observations`, read."""
        self.gnf_run, longest = longest_run(flags[:n_g], self.gnf_run)
        self.gnf_longest = max(self.gnf_longest, longest)
        self.stuck_run, longest = longest_run(flags[n_g:n_g + n_s], self.stuck_run)
        self.stuck_longest = max(self.stuck_longest, longest)
        self.nonfinite_seen = self.nonfinite_seen or bool(flags[n_g + n_s])

    def _devstate(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The 0-dim device accumulators, created on (or moved to) ``device`` on first use."""
        d = self._dev
        if not d:
            for k, (dtype, init) in DEVICE_STATE.items():
                d[k] = torch.full((), init, dtype=dtype, device=device)
        elif next(iter(d.values())).device != device:
            for k in list(d):
                d[k] = d[k].to(device)
        return d
