"""The health doctor's log-interval judgement: the device accumulators, the one read per interval,
and one named judgement per finding.

:class:`IntervalChecks` is one group of the doctor's checks (see :mod:`monitors.health.settings`):
built with the settings and the doctor's report function, it owns the interval's state. Per step
the doctor hands it observations the other monitors computed anyway (:meth:`IntervalChecks.observe_grad`,
:meth:`~IntervalChecks.observe_update`, :meth:`~IntervalChecks.observe_rows`) and it accumulates
the collapse statistics on the device (:meth:`IntervalChecks.collapse_step`); at each log interval
:meth:`IntervalChecks.judge` reads every accumulator, the norm range, the duplicate fraction and
the per-step flags in ONE host transfer into an :class:`Interval` record, then judges it:
``_judge_not_updating``, ``_judge_nonfinite``, ``_judge_replicas``, ``_judge_collapse``,
``_judge_duplicates``, ``_judge_norms``, in that order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..core.cadence import on_multiple
from ..core.codes import (PROTO_COLLAPSE, PROTO_DUPLICATES, PROTO_NONFINITE, PROTO_NORM_OUT_OF_RANGE, PROTO_NOT_UPDATING,
                    PROTO_REPLICAS_DIVERGED, fix_of)
from ..core.distributed import world_size
from ..core.events import RunContext
from ..core.proto_stats import assignment_rows
from .duplicates import DuplicateCheck
from .settings import DoctorSettings, Report

#: device-side accumulators (all 0-dim) -> (dtype, reset value); see IntervalChecks.devstate.
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


class IntervalChecks:
    """The log-interval half of the doctor (see the module docstring); it owns its state."""

    def __init__(self, settings: DoctorSettings, report: Report) -> None:
        self.settings, self.report = settings, report
        self.collapse_intervals = 0  # consecutive collapsed log intervals
        self.collapse_checked = 0    # steps checked for collapse in this interval
        # consecutive-step counters, kept on the host and advanced at the log interval from the
        # observations below: current run and longest run since the last judgement
        self.stuck_run = self.stuck_longest = 0  # gradient non-zero, value unchanged by step()
        self.gnf_run = self.gnf_longest = 0      # NaN/Inf gradient
        self.nonfinite_seen = False              # a NaN/Inf prototype since the last judgement
        # per-step observations: device tensors other monitors computed anyway (ctx.proto_stats), kept
        # as they are and read in one transfer at the log interval, so a step costs no kernel here
        self._obs_gnorm: list[torch.Tensor] = []     # ||grad|| of each step with a gradient
        self._obs_stuck: list[torch.Tensor] = []     # ||grad|| of each snapshot step ...
        self._obs_update: list[torch.Tensor] = []    # ... and ||P_after - P_before|| of that step
        self._obs_rows: list[torch.Tensor] = []      # 0-dim ||P|| (or the update) at each step end
        # device state: 0-dim tensors, created on the prototypes' device on first use
        self._dev: dict[str, torch.Tensor] = {}
        self.duplicates = DuplicateCheck(settings)  # PROTO_DUPLICATES, spread over intervals

    # -- per step: observations ---------------------------------------------------------------
    def observe_grad(self, gnorm: torch.Tensor) -> None:
        """``||grad||`` of a step with a gradient (NaN/Inf iff an entry is)."""
        self._obs_gnorm.append(gnorm)

    def observe_update(self, gnorm: torch.Tensor, update: torch.Tensor) -> None:
        """``||grad||`` and ``||P_after - P_before||`` of a snapshot step (PROTO_NOT_UPDATING)."""
        self._obs_stuck.append(gnorm)
        self._obs_update.append(update)

    def observe_rows(self, norm: torch.Tensor) -> None:
        """A 0-dim norm of the prototypes (or of the step's update) at a step's end: NaN/Inf iff
        they are (PROTO_NONFINITE)."""
        self._obs_rows.append(norm)

    def observe_replica_gap(self, gap: torch.Tensor) -> None:
        """The replicas' relative disagreement at a step (PROTO_REPLICAS_DIVERGED), kept on the device."""
        d = self.devstate(gap.device)
        torch.maximum(d["div"], gap.to(d["div"].dtype), out=d["div"])

    @property
    def last_update(self) -> Optional[torch.Tensor]:
        """The update norm observed last (None before any)."""
        return self._obs_update[-1] if self._obs_update else None

    # -- per step: the collapse statistics, on the device -------------------------------------
    def collapse_step(self, ctx: RunContext) -> None:
        """Accumulate this step's collapse signs (identical rows, near-uniform rows, few
        prototypes used) on the device; nothing is read."""
        d = self.devstate(ctx.prototypes.device)
        out = ctx.outputs
        if out is None or not on_multiple(ctx.step, self.settings.collapse_every, start=self.settings.collapse_warmup):
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
        tol = self.settings.collapse_row_tol / x.shape[-1]
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
            near = (gap <= self.settings.collapse_uniform_gap).float().mean() > 0.5
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
            threshold = max(2.0, self.settings.collapse_min_fraction * min(k, n))  # perplexity
            collapsed = collapsed | (ent < math.log(threshold))
        d["col_hits"].add_(collapsed)
        d["col_ident"].add_(ident & ~uniform)
        d["col_uniform"].add_(uniform)
        self.collapse_checked += 1

    # -- the log interval ------------------------------------------------------------------------
    def judge(self, ctx: RunContext) -> None:
        """Read the interval (one host transfer), judge each finding, reset the interval state."""
        obs = self._read_interval(ctx)
        self._judge_not_updating(ctx, obs)
        self._judge_nonfinite(ctx, obs)
        self._judge_replicas(ctx, obs)
        self._judge_collapse(ctx, obs)
        self._judge_duplicates(ctx, obs)
        self._judge_norms(ctx, obs)
        self._reset_interval(ctx)

    def _read_interval(self, ctx: RunContext) -> Interval:
        """The accumulators, the cheap O(K^2 D) statistics of the interval and the per-step flags,
        moved to the host together; the consecutive-step counters advance with the flags."""
        P = ctx.prototypes.detach()
        d = self.devstate(P.device)
        K = P.shape[0]
        extra: list[torch.Tensor] = []
        dup_due = self.duplicates.due(ctx.step)
        if P.dim() == 2 and K >= 2:
            Pf = P.float()
            norms = Pf.norm(dim=1)
            extra += [norms.min().double(), norms.max().double()]
            if dup_due:
                dup = self.duplicates.advance(Pf, norms, ctx.step)
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
        if self.stuck_longest > self.settings.update_patience:
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
        if self.gnf_longest > self.settings.nonfinite_patience:
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
        if obs.div > self.settings.sync_tol:
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
        sev = "error" if self.collapse_intervals >= self.settings.collapse_patience else "warning"
        self.report(ctx, PROTO_COLLAPSE, sev, (
            f"assignment collapse in {int(obs.col_hits)} of {self.collapse_checked} steps up to "
            f"step {obs.step} ({self.collapse_intervals} log interval(s) in a row), {what}."
        ))

    def _judge_duplicates(self, ctx: RunContext, obs: Interval) -> None:
        """PROTO_DUPLICATES: too many prototypes have a near-duplicate (when a check finished)."""
        if obs.norm_range is None:
            return
        dup = obs.duplicates if obs.duplicates is not None else 0.0
        if dup > self.settings.dup_fraction:
            self.report(ctx, PROTO_DUPLICATES, "warning", (
                f"{100 * dup:.0f}% of the prototypes have a near-duplicate (cosine > "
                f"{self.settings.dup_cosine}) at step {obs.step}: they waste capacity. Fix: {fix_of(PROTO_DUPLICATES)}."
            ))

    def _judge_norms(self, ctx: RunContext, obs: Interval) -> None:
        """PROTO_NORM_OUT_OF_RANGE: the smallest or largest norm is outside [norm_min, norm_max]."""
        if obs.norm_range is None:
            return
        nmin, nmax = obs.norm_range
        if nmin < self.settings.norm_min or nmax > self.settings.norm_max:
            self.report(ctx, PROTO_NORM_OUT_OF_RANGE, "warning", (
                f"prototype norms span [{nmin:.3g}, {nmax:.3g}] at step {obs.step}, outside "
                f"[{self.settings.norm_min:g}, {self.settings.norm_max:g}]. Fix: {fix_of(PROTO_NORM_OUT_OF_RANGE)}."
            ))

    def _reset_interval(self, ctx: RunContext) -> None:
        """Reset the interval accumulators (the consecutive runs carry on)."""
        d = self.devstate(ctx.prototypes.device)
        self.stuck_longest, self.gnf_longest, self.nonfinite_seen = self.stuck_run, self.gnf_run, False
        d["div"].zero_()
        d["col_hits"].zero_()
        d["col_ident"].zero_()
        d["col_uniform"].zero_()
        d["col_ent_min"].fill_(math.inf)
        d["col_gap_min"].fill_(math.inf)
        self.collapse_checked = 0

    # -- the pieces of the read --------------------------------------------------------------------
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

    def devstate(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The 0-dim device accumulators, created on (or moved to) ``device`` on first use."""
        d = self._dev
        if not d:
            for k, (dtype, init) in DEVICE_STATE.items():
                d[k] = torch.full((), init, dtype=dtype, device=device)
        elif next(iter(d.values())).device != device:
            for k in list(d):
                d[k] = d[k].to(device)
        return d

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The counters and the device accumulators (on the CPU); the steps observed since the
        last judgement are read first, so the runs they continue are saved."""
        if self._obs_gnorm or self._obs_stuck or self._obs_rows:
            obs, n_g, n_s = self._observations((self._obs_gnorm or self._obs_stuck or self._obs_rows)[0].device)
            self._advance(obs.cpu().tolist(), n_g, n_s)
        return {
            "stuck_run": self.stuck_run, "stuck_longest": self.stuck_longest,
            "gnf_run": self.gnf_run, "gnf_longest": self.gnf_longest,
            "nonfinite_seen": self.nonfinite_seen,
            "collapse_intervals": self.collapse_intervals,
            "collapse_checked": self.collapse_checked,
            "device": {k: v.detach().cpu().clone() for k, v in self._dev.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (also the states of earlier versions, which kept the
        counters on the device)."""
        self.collapse_intervals = int(state.get("collapse_intervals", 0))
        self.collapse_checked = int(state.get("collapse_checked", 0))
        dev = state.get("device", {})
        self.stuck_run = int(state.get("stuck_run", dev.get("stuck", 0)))
        self.stuck_longest = int(state.get("stuck_longest", dev.get("stuck_max", 0)))
        self.gnf_run = int(state.get("gnf_run", dev.get("gnf", 0)))
        self.gnf_longest = int(state.get("gnf_longest", dev.get("gnf_max", 0)))
        self.nonfinite_seen = bool(state.get("nonfinite_seen", not math.isfinite(float(dev.get("psum", 0.0)))))
        self._dev = {}
        if dev:  # moved to the prototypes' device on first use (see devstate)
            for k, (dtype, init) in DEVICE_STATE.items():
                self._dev[k] = torch.as_tensor(dev.get(k, init), dtype=dtype).clone()
