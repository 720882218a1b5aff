"""Checks of the bugs that real self-supervised trainers ship around the prototypes and the teacher.

The :class:`TrainerChecks` monitor (name ``checks``, in the default set) reports four codes of
:data:`monitors.core.codes.CODES`:

==============================  ==============================================================
``PROTO_GRAD_NOT_AVERAGED``     under ``torch.distributed``, every ``grad_avg_every`` steps: the
                                gradient the step used is the sum of the ranks' local gradients,
                                not their mean (3D-Speaker's ``AllReduceSum``, MSN): SGD then
                                trains the prototypes at world_size x the lr.
``PROTO_FREEZE_IGNORED``        a freeze was declared (``freeze_steps``) but the prototypes changed
                                across ``optimizer.step()`` during it.
``TEACHER_SHARES_STUDENT``      the teacher's parameters are the student's own tensors.
``TEACHER_NOT_UPDATING``        the teacher has not changed for ``teacher_patience`` steps while
                                the student trained: the EMA is not applied.
==============================  ==============================================================

Cost: the gradient comparison copies the local (K, D) gradient in the prototypes' post-accumulate
hook and all-reduces it once (in :meth:`on_collective`, on every rank), only at sampled steps; the
freeze check reads the update norm the delta monitor computes anyway (``ctx.proto_stats``), during the
freeze only; the teacher check sums each parameter of teacher and student once per log interval.
Nothing is read on the host between log intervals.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from ..core.base import Metrics, Monitor
from ..core.cadence import on_multiple
from ..core.codes import PROTO_FREEZE_IGNORED, PROTO_GRAD_NOT_AVERAGED, TEACHER_NOT_UPDATING, TEACHER_SHARES_STUDENT
from ..core.distributed import world_size
from ..core.events import RunContext
from ..core.grad_scaling import scale_tensor
from .optimizer_lookup import unwrap
from ..core.options import positive_int

#: optimizers whose update does not change when the gradient is multiplied by a constant (up to
#: eps): a summed gradient is then harmless, so PROTO_GRAD_NOT_AVERAGED stays info. Matched on the
#: class name of the optimizer (or of the one a wrapper holds), case-insensitively.
SCALE_INVARIANT = ("adam", "adamw", "nadam", "radam", "adamax", "sparseadam", "rmsprop", "adagrad",
                   "adadelta", "rprop", "adafactor", "lamb", "lars", "larc", "lion", "sign")


def scale_invariant(optimizer: Any) -> bool:
    """Whether the optimizer's update ignores a constant scale of the gradient (see
    :data:`SCALE_INVARIANT`). SGD, with or without momentum, is not: its step is lr x gradient."""
    names = {type(optimizer).__name__.lower(), type(unwrap(optimizer)).__name__.lower()}
    return any(n in SCALE_INVARIANT or n.startswith(("adam", "nadam", "radam")) for n in names)


def _storages(module: torch.nn.Module, skip: Optional[torch.nn.Module] = None) -> dict[int, str]:
    """storage pointer -> parameter name, for every parameter of ``module``; with ``skip``, the
    parameters reached only through that submodule (a LightningModule holding its teacher) are
    left out, while a tensor also reached by another path (an aliased module) stays."""
    prefixes = [n + "." for n, m in module.named_modules(remove_duplicate=False) if m is skip and n] if skip else []
    out: dict[int, str] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        if any(n.startswith(pre) for pre in prefixes):
            continue
        try:
            out.setdefault(p.untyped_storage().data_ptr(), n)
        except RuntimeError:  # pragma: no cover - meta / fake tensors
            continue
    return out


def _fingerprint(params: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """(n,) float64 sums of the parameters: equal before and after iff (in practice) no element
    changed (a change of one float32 ulp moves a float64 sum). Computed on the device."""
    if not params:
        return None
    return torch.stack([p.detach().sum(dtype=torch.float64).to(params[0].device) for p in params])


#: the cause and fix of TEACHER_NOT_UPDATING, worded once for a live run and for ``inspect``
EMA_NOT_APPLIED = ("the EMA update is not applied (or its momentum is 1). Fix: after optimizer.step(), update it "
                   "every step: with torch.no_grad(): for t, s in zip(teacher.parameters(), student.parameters()): "
                   "t.mul_(m).add_(s.detach(), alpha=1 - m), with m < 1 (e.g. 0.996 -> 1 on a cosine).")


class TrainerChecks(Monitor):
    """The checks of :mod:`monitors.health.trainer_checks`.

    Args:
        grad_avg_every: compare the prototypes' gradient with the mean of the ranks' local ones
            at steps divisible by n (one all-reduce of (K, D) each; step 0 is one of them).
        grad_avg_tol: the gradient counts as summed when its projection on the mean of the local
            gradients is more than ``1 + grad_avg_tol * (world_size - 1)`` times that mean (a mean
            gives 1, a sum world_size; clipping only lowers it).
        freeze_every: during a declared freeze, check every n-th step that the prototypes did not
            move.
        teacher_patience: steps without any change of the teacher while the student changes
            before TEACHER_NOT_UPDATING (read at the log interval).
    """

    name = "checks"

    def __init__(self, every_n_steps: Optional[int] = None, grad_avg_every: int = 50,
                 grad_avg_tol: float = 0.5, freeze_every: int = 1, teacher_patience: int = 10) -> None:
        super().__init__(every_n_steps)
        owner = type(self).__name__
        self.grad_avg_every = positive_int(owner, "grad_avg_every", grad_avg_every)
        if isinstance(grad_avg_tol, bool) or not isinstance(grad_avg_tol, (int, float)) or not 0 < grad_avg_tol < 1:
            raise ValueError(f"{owner}: grad_avg_tol must be a number in (0, 1), got {grad_avg_tol!r}")
        self.grad_avg_tol = float(grad_avg_tol)
        self.freeze_every = positive_int(owner, "freeze_every", freeze_every)
        self.teacher_patience = positive_int(owner, "teacher_patience", teacher_patience)
        # gradient averaging
        self._ctx: Optional[RunContext] = None
        self._hook: Any = None
        self._local: Optional[torch.Tensor] = None   # local (K, D) gradient of a sampled step
        self._local_step = -1
        self._started = False
        self._ratios: list[torch.Tensor] = []       # per sampled step: (ratio, valid)
        # freeze
        self._fz_step = -1
        self._fz_updates: list[torch.Tensor] = []   # ||P_after - P_before|| of checked freeze steps
        self.freeze_moved = 0                        # freeze steps seen moving (host, read at on_log)
        self.freeze_checked = 0
        # teacher
        self._t_params: list[torch.Tensor] = []
        self._s_params: list[torch.Tensor] = []
        self._t_ref: Optional[torch.Tensor] = None
        self._s_ref: Optional[torch.Tensor] = None
        self._t_ref_step = 0
        self.teacher_still = 0                       # steps the teacher has not changed (student did)

    # -- train start: teacher aliasing, references, the local-gradient hook ------------------------
    def on_train_start(self, ctx: RunContext) -> Metrics:
        self._ctx = ctx
        self._check_teacher_storage(ctx)
        self._teacher_refs(ctx)
        P = ctx.prototypes
        if world_size() > 1 and self._hook is None and P.is_leaf and P.requires_grad:
            # the post-accumulate hook sees the rank's own gradient, before the loop all-reduces it
            self._hook = P.register_post_accumulate_grad_hook(self._on_local_grad)
        return None

    def _check_teacher_storage(self, ctx: RunContext) -> None:
        teacher, student = ctx.teacher, ctx.model
        if not isinstance(teacher, torch.nn.Module) or not isinstance(student, torch.nn.Module):
            return
        proto_ptr = ctx.prototypes.untyped_storage().data_ptr() if ctx.prototypes.is_leaf else None
        if teacher is student:
            shared = [n for n, _ in student.named_parameters()]
        else:
            mine = _storages(student, skip=teacher)
            shared = [n for ptr, n in _storages(teacher).items() if ptr in mine and ptr != proto_ptr]
        if shared:
            n_t = sum(1 for _ in teacher.parameters())
            self.report(ctx, TEACHER_SHARES_STUDENT, "error", (
                f"the teacher ({type(teacher).__name__}) shares {len(shared)} of its {n_t} parameter tensors "
                f"with the student (e.g. {', '.join(shared[:3])}): it is the student's own tensors, not a "
                "copy, so the EMA update is a no-op and the teacher is the student. Fix: build the teacher "
                "as a copy: teacher = copy.deepcopy(student) (then teacher.requires_grad_(False)), or "
                "teacher.load_state_dict(student.state_dict()) into a separately built network."
            ))

    def _teacher_refs(self, ctx: RunContext) -> None:
        teacher = ctx.teacher
        if not isinstance(teacher, torch.nn.Module):
            return
        self._t_params = [p for p in teacher.parameters() if p.is_floating_point()]
        t_ptrs = {p.untyped_storage().data_ptr() for p in self._t_params}
        student = list(ctx.model.parameters()) if isinstance(ctx.model, torch.nn.Module) else []
        # the student's own tensors (a LightningModule may hold the teacher too)
        self._s_params = [p for p in student if p.is_floating_point() and p.untyped_storage().data_ptr() not in t_ptrs]
        if ctx.prototypes.is_leaf and all(p is not ctx.prototypes for p in self._s_params) \
                and ctx.prototypes.untyped_storage().data_ptr() not in t_ptrs:
            self._s_params.append(ctx.prototypes)
        self._t_ref, self._s_ref = _fingerprint(self._t_params), _fingerprint(self._s_params)
        self._t_ref_step = ctx.step

    # -- gradient summed across ranks ------------------------------------------------------------
    def _on_local_grad(self, param: torch.Tensor) -> None:
        ctx = self._ctx
        if ctx is None or not on_multiple(ctx.step, self.grad_avg_every) or param.grad is None or param.grad.is_sparse:
            return
        g = param.grad.detach()
        if self._local is None or self._local.numel() != g.numel() + 3 or self._local.device != g.device:
            self._local = torch.empty(g.numel() + 3, dtype=torch.float32, device=g.device)
        self._local[:-3].copy_(g.reshape(-1))  # the latest backward: the accumulated local gradient
        self._local_step = ctx.step

    def on_collective(self, ctx: RunContext) -> Metrics:
        """Every ``grad_avg_every`` steps, right after ``optimizer.step()``, on every rank: one
        all-reduce of the local gradients (plus a count and the norm of the step's gradient, to
        tell a reduced gradient from an unreduced one), then the step's own gradient is compared
        with their mean, on the device."""
        world = world_size()
        if world <= 1:
            return None
        if not self._started:  # train start: no gradient yet
            self._started = True
            return None
        if not on_multiple(ctx.step, self.grad_avg_every):
            return None
        P = ctx.prototypes
        n = P.numel()
        buf = self._local
        have = buf is not None and self._local_step == ctx.step and buf.numel() == n + 3
        if not have:  # take part with zeros: every rank must call the same collectives
            buf = torch.zeros(n + 3, dtype=torch.float32, device=P.device)
        else:
            scale = scale_tensor(ctx.extra.get("grad_scaler"))
            if scale is not None:  # copied during a GradScaler's backward: S x the local gradient
                buf[:-3].div_(scale.to(buf.device, buf.dtype))
        g = P.grad
        usable = g is not None and not g.is_sparse and g.numel() == n
        gf = g.detach().reshape(-1).float() if usable else None
        a = torch.linalg.vector_norm(gf) if gf is not None else torch.zeros((), device=P.device)
        buf[-3] = 1.0 if have and usable else 0.0
        buf[-2:] = torch.stack([a, a * a])  # is the step's gradient the same on every rank?
        # (K*D + 3,): sum of the local gradients, ranks that had one, sum of ||g|| and ||g||^2
        dist.all_reduce(buf)
        if gf is None:
            return None
        count, s1, s2 = buf[-3], buf[-2], buf[-1]
        mean = buf[:-3] / count.clamp_min(1.0)
        mm = (mean * mean).sum()
        ratio = (gf * mean).sum() / mm.clamp_min(1e-30)  # 1 for a mean, world_size for a sum
        # reduced at all (else PROTO_REPLICAS_DIVERGED tells): ||g|| equal across ranks
        spread = (s2 / world - (s1 / world) ** 2).clamp_min(0).sqrt() / (s1 / world).clamp_min(1e-30)
        valid = (count == world) & (mm > 0) & (spread < 1e-3)
        self._ratios.append(torch.stack([ratio, valid.float()]))
        return None

    # -- freeze that freezes nothing -------------------------------------------------------------
    def on_before_optimizer_step(self, ctx: RunContext) -> Metrics:
        if ctx.step < ctx.freeze_steps and on_multiple(ctx.step, self.freeze_every) and ctx.prototypes.is_leaf:
            ctx.proto_stats.snapshot(ctx)  # shared with the delta monitor and the doctor
            self._fz_step = ctx.step
        return None

    def on_after_optimizer_step(self, ctx: RunContext) -> Metrics:
        if self._fz_step == ctx.step:
            self._fz_step = -1
            u = ctx.proto_stats.update_norm(ctx)
            if u is not None:
                self._fz_updates.append(u)
        return None

    # -- the log interval: one read of everything ----------------------------------------------
    def on_log(self, ctx: RunContext) -> Metrics:
        parts: list[torch.Tensor] = []
        n_r, n_f = len(self._ratios), len(self._fz_updates)
        dev = ctx.prototypes.device
        if n_r:
            parts.append(torch.stack(self._ratios).reshape(-1).double().to(dev))
        if n_f:
            parts.append(torch.stack(self._fz_updates).double().to(dev))
        t_changed = s_changed = None
        if self._t_params:
            t_now, s_now = _fingerprint(self._t_params), _fingerprint(self._s_params)
            if t_now is not None and self._t_ref is not None and t_now.shape == self._t_ref.shape:
                t_changed = sum(x.numel() for x in parts)  # an index into the flat read, not into parts
                parts.append((t_now != self._t_ref).any().double().reshape(1).to(dev))
            if s_now is not None and self._s_ref is not None and s_now.shape == self._s_ref.shape:
                s_changed = sum(x.numel() for x in parts)
                parts.append((s_now != self._s_ref).any().double().reshape(1).to(dev))
            self._t_ref, self._s_ref = t_now, s_now
        self._ratios, self._fz_updates = [], []
        if not parts:
            return None
        # note: the one CPU-GPU sync point of this monitor per interval
        flat = torch.cat(parts).cpu().tolist()
        i = 0
        if n_r:
            pairs = flat[: 2 * n_r]
            i = 2 * n_r
            self._judge_grad_avg(ctx, [r for r, ok in zip(pairs[::2], pairs[1::2]) if ok and math.isfinite(r)])
        if n_f:
            ups = flat[i: i + n_f]
            i += n_f
            self.freeze_checked += n_f
            self.freeze_moved += sum(1 for u in ups if u > 0)
            if self.freeze_moved:
                self._say_freeze(ctx)
        if t_changed is not None:
            elapsed = ctx.step - self._t_ref_step
            self._t_ref_step = ctx.step
            student_moved = s_changed is None or flat[s_changed] > 0
            if flat[t_changed] > 0:
                self.teacher_still = 0
            elif student_moved:
                self.teacher_still += elapsed
            if self.teacher_still >= self.teacher_patience:
                self.report(ctx, TEACHER_NOT_UPDATING, "warning", (
                    f"the teacher ({type(ctx.teacher).__name__}) has not changed for {self.teacher_still} "
                    f"steps (up to step {ctx.step}) while the student trained: {EMA_NOT_APPLIED}"
                ))
        return None

    def _judge_grad_avg(self, ctx: RunContext, ratios: list[float]) -> None:
        world = world_size()
        if not ratios or world <= 1:
            return
        r = sorted(ratios)[len(ratios) // 2]
        if r <= 1.0 + self.grad_avg_tol * (world - 1):
            return
        opt = ctx.optimizer
        invariant = opt is not None and scale_invariant(opt)
        name = type(unwrap(opt)).__name__ if opt is not None else "the optimizer"
        common = (
            f"the prototypes' gradient is the sum of the {world} ranks' local gradients, not their mean "
            f"(it is {r:.3g}x their mean, by step {ctx.step}; checked every {self.grad_avg_every} steps), "
            f"while DDP averages every other gradient"
        )
        if invariant:
            self.report(ctx, PROTO_GRAD_NOT_AVERAGED, "info", (
                f"{common}. {name} is invariant to the gradient's scale, so this only changes its eps: "
                "taken as intended."
            ))
            return
        self.report(ctx, PROTO_GRAD_NOT_AVERAGED, "warning", (
            f"{common}: with {name} the prototypes train at {world}x the configured lr (effective lr "
            f"factor {world}; 3D-Speaker's AllReduceSum, MSN). Fix: average after the all-reduce: "
            "dist.all_reduce(prototypes.grad); prototypes.grad /= dist.get_world_size() (or "
            "op=dist.ReduceOp.AVG), or divide their lr by the world size if the sum is intended."
        ))

    def _say_freeze(self, ctx: RunContext) -> None:
        name = ctx.extra.get("prototypes_name", "prototypes")
        in_model = isinstance(ctx.model, torch.nn.Module) and any(p is ctx.prototypes for p in ctx.model.parameters())
        where = (f"they are the model parameter {name!r}" if in_model else
                 "they live outside the model (a bare tensor), so no name-based cancel function sees them")
        self.report(ctx, PROTO_FREEZE_IGNORED, "warning", (
            f"a freeze of the prototypes was declared (freeze_steps={ctx.freeze_steps}) but they changed "
            f"across optimizer.step() in {self.freeze_moved} of {self.freeze_checked} checked steps during "
            f"it (by step {ctx.step}). Likely cause: the gradient-cancelling function matches no parameter "
            f"name: a freeze_last_layer / cancel_gradients_last_layer that sets p.grad = None for names "
            f"containing 'last_layer'; {where}. Fix: cancel the prototypes' own gradient while step < "
            "freeze_steps: prototypes.grad = None (before optimizer.step()), or match their name; and "
            "freeze the student's layer, not the teacher's."
        ))

    # -- state and end ---------------------------------------------------------------------------
    def on_train_end(self, ctx: RunContext) -> Metrics:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return None

    def close(self) -> Any:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_still": self.teacher_still,
                "freeze_moved": self.freeze_moved, "freeze_checked": self.freeze_checked}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.teacher_still = int(state.get("teacher_still", 0))
        self.freeze_moved = int(state.get("freeze_moved", 0))
        self.freeze_checked = int(state.get("freeze_checked", 0))
