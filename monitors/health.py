"""The health doctor: diagnoses why prototypes do not train, and says how to fix it.

Every diagnosis is a :class:`~monitors.finding.Finding` with a stable code from :data:`CODES`.
Static facts (leaf, requires_grad, param group, lr) are read from Python attributes; dynamic
facts (value unchanged after the step, NaN/Inf, collapse, ranks disagreeing) are accumulated
in small tensors on the device during the step and read once per log interval in
:meth:`HealthDoctor.on_log`, so the per-step hooks never synchronise with the GPU.

Checkpoint helpers (:func:`find_prototypes_in_checkpoint`,
:func:`prototype_optimizer_state_in_checkpoint`, :func:`check_checkpoint`) are public so that
``hub.check_checkpoint`` can reuse them outside a training loop.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from .base import Metrics, Monitor
from .events import RunContext
from .finding import Finding
from .shared import SAMPLE_ABOVE, SAMPLE_ROWS, assignment_rows, row_sample

# -- codes ------------------------------------------------------------------------------------
PROTO_NOT_LEAF = "PROTO_NOT_LEAF"
PROTO_NO_GRAD = "PROTO_NO_GRAD"
PROTO_NOT_IN_OPTIMIZER = "PROTO_NOT_IN_OPTIMIZER"
PROTO_LR_ZERO = "PROTO_LR_ZERO"
PROTO_NOT_UPDATING = "PROTO_NOT_UPDATING"
PROTO_NOT_IN_CHECKPOINT = "PROTO_NOT_IN_CHECKPOINT"
PROTO_REPLICAS_DIVERGED = "PROTO_REPLICAS_DIVERGED"
PROTO_NONFINITE = "PROTO_NONFINITE"
PROTO_COLLAPSE = "PROTO_COLLAPSE"
PROTO_DUPLICATES = "PROTO_DUPLICATES"
PROTO_NORM_OUT_OF_RANGE = "PROTO_NORM_OUT_OF_RANGE"
SINK_FAILED = "SINK_FAILED"  # reported by the hub (monitors/hub.py), not by the doctor
# reported by monitors.trainer_checks.TrainerChecks (the `checks` monitor)
PROTO_GRAD_NOT_AVERAGED = "PROTO_GRAD_NOT_AVERAGED"
PROTO_FREEZE_IGNORED = "PROTO_FREEZE_IGNORED"
TEACHER_SHARES_STUDENT = "TEACHER_SHARES_STUDENT"
TEACHER_NOT_UPDATING = "TEACHER_NOT_UPDATING"

#: code -> (default severity, what it means, the fix). docs/findings.md mirrors this table.
CODES: dict[str, tuple[str, str, str]] = {
    PROTO_NOT_LEAF: (
        "error",
        "the prototypes tensor is not a leaf of the autograd graph (nn.Parameter(x).cuda() or "
        ".to(copy=True) returned a copy), so it gets no .grad and the optimizer cannot step it",
        "create the Parameter on the device: nn.Parameter(x.to(device)) instead of "
        "nn.Parameter(x).cuda(), and use that same tensor in the forward pass and the optimizer",
    ),
    PROTO_NO_GRAD: (
        "error",
        "the prototypes get no gradient (requires_grad is False, they are not used in the loss, "
        "or the gradient is cancelled) while the rest of the model does; info during an "
        "intended freeze (step < freeze_steps) or for up to `patience` steps",
        "make them trainable (nn.Parameter(x), requires_grad=True), use that same tensor in the "
        "loss, and cancel their gradient only while step < freeze_last_layer steps",
    ),
    PROTO_NOT_IN_OPTIMIZER: (
        "error",
        "no param group of the optimizer holds the prototypes, so optimizer.step() skips them",
        "add the prototypes to the optimizer: "
        "optimizer.add_param_group({'params': [prototypes], 'weight_decay': 0.0})",
    ),
    PROTO_LR_ZERO: (
        "warning",
        "the prototypes' param group has lr 0 while other groups train, for more than "
        "`patience` steps; info while every group has lr 0 (warm-up) or during a freeze",
        "a loop that rewrites every group's lr overrode the prototype lr: scale per group, "
        "for g in optimizer.param_groups: g['lr'] = lr * g.get('lr_scale', 1.0)",
    ),
    PROTO_NOT_UPDATING: (
        "error",
        "the prototypes have a non-zero gradient but their value did not change across "
        "optimizer.step() for more than `update_patience` consecutive steps",
        "make sure the optimizer that steps is the one holding the prototypes "
        "(optimizer.add_param_group({'params': [prototypes], 'weight_decay': 0.0})), that "
        "their group's lr is > 0, and that no code copies old values back into them",
    ),
    PROTO_NOT_IN_CHECKPOINT: (
        "error",
        "the checkpoint holds no tensor equal to the prototypes (or a resume did not restore "
        "them), so a resumed run restarts them from random",
        "save them: checkpoint['prototypes'] = prototypes; on resume: "
        "prototypes.data.copy_(checkpoint['prototypes'])",
    ),
    PROTO_REPLICAS_DIVERGED: (
        "error",
        "under torch.distributed the ranks hold different prototypes (their fingerprints "
        "differ by more than `sync_tol`), at the start or after some steps",
        "all-reduce the gradient after backward: dist.all_reduce(prototypes.grad); "
        "prototypes.grad /= world_size (or make them a parameter of the DDP-wrapped module); "
        "at the start: dist.broadcast(prototypes.data, src=0)",
    ),
    PROTO_NONFINITE: (
        "error",
        "the prototypes hold NaN/Inf, or their gradient was NaN/Inf for more than "
        "`nonfinite_patience` consecutive steps (isolated non-finite gradients, as in AMP "
        "steps skipped by GradScaler, are info)",
        "lower the lr, clip gradients (torch.nn.utils.clip_grad_norm_), use a GradScaler with "
        "AMP, and check the loss for log(0) or division by a zero norm",
    ),
    PROTO_COLLAPSE: (
        "warning",
        "assignments collapsed in most steps of a log interval, of one of two kinds. One "
        "prototype: every row of the batch maps to the same assignment, or the batch-mean student "
        "probability uses few prototypes (perplexity < max(2, collapse_min_fraction * min(K, N))). "
        "Uniform: most samples' assignment entropy is within `collapse_uniform_gap` nats of ln K "
        "(the loss stuck at ln K). Also when embeddings logged are (near-)identical. Error after "
        "`collapse_patience` consecutive intervals",
        "one-prototype kind: balance the targets (Sinkhorn, centering), keep the mean-entropy "
        "(me-max) regulariser, lower the lr, and check that the inputs and augmentations differ; "
        "uniform kind: sharpen the targets: lower the teacher temperature (DINO: 0.04, warm-up "
        "from 0.04), a slower center momentum (0.9), sharpening in SDPN/MSN",
    ),
    PROTO_DUPLICATES: (
        "warning",
        "more than `dup_fraction` of the prototypes have a near-duplicate (cosine > "
        "`dup_cosine`)",
        "initialise them randomly (uniform in +-1/sqrt(D)) instead of copies, and keep the "
        "targets balanced (Sinkhorn) or a KoLeo/me-max regulariser",
    ),
    PROTO_NORM_OUT_OF_RANGE: (
        "warning",
        "the smallest or largest prototype norm is outside [norm_min, norm_max]",
        "set weight decay 0 for the prototypes, L2-normalise them in the forward pass, and "
        "check the lr",
    ),
    SINK_FAILED: (
        "warning",
        "a sink raised (W&B init timeout or CommError, a full disk) and was switched off, or the "
        "W&B sink fell back to an offline run; training and the other sinks (local records) go on",
        "for W&B: upload the offline run later with the printed `wandb sync <run dir>`; check "
        "the network, WANDB_BASE_URL and wandb_init_timeout; otherwise free disk space",
    ),
    PROTO_GRAD_NOT_AVERAGED: (
        "warning",
        "under torch.distributed the prototypes' gradient is the sum of the ranks' local gradients, "
        "not their mean (compared every `grad_avg_every` steps: one all-reduce of (K, D)): SGD "
        "trains them at world_size x the lr; info when the optimizer is invariant to the gradient's "
        "scale (Adam, AdamW, RMSprop, Adagrad, LARS/LARC, LAMB)",
        "average: dist.all_reduce(prototypes.grad); prototypes.grad /= dist.get_world_size(), or "
        "dist.all_reduce(prototypes.grad, op=dist.ReduceOp.AVG)",
    ),
    PROTO_FREEZE_IGNORED: (
        "warning",
        "a freeze was declared (freeze_steps, freeze_last_layer) but the prototypes changed across "
        "optimizer.step() during it: the gradient-cancelling function matches no parameter name",
        "cancel the prototypes' own gradient while step < freeze_steps: prototypes.grad = None "
        "before optimizer.step(), or match their parameter name; freeze the student, not the teacher",
    ),
    TEACHER_SHARES_STUDENT: (
        "error",
        "the teacher's parameters share storage with the student's (the teacher is the student's "
        "own tensors, not a copy), so the EMA is a no-op",
        "build the teacher as a copy: teacher = copy.deepcopy(student); teacher.requires_grad_(False)",
    ),
    TEACHER_NOT_UPDATING: (
        "warning",
        "the teacher has not changed for `teacher_patience` steps while the student trained: "
        "the EMA update is not applied (or its momentum is 1)",
        "after optimizer.step() update the teacher every step: t = m * t + (1 - m) * s with m < 1",
    ),
}


def _fix(code: str) -> str:
    return CODES[code][2]


# -- checkpoint helpers ---------------------------------------------------------------------------
def _walk(obj: Any, path: tuple, seen: set, depth: int = 0) -> Iterator[tuple[tuple, torch.Tensor]]:
    """Yield (key path, tensor) for every tensor in nested dicts/lists/modules/optimizers."""
    if depth > 32:
        return
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict(keep_vars=True)
    elif isinstance(obj, torch.optim.Optimizer):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, path + (k,), seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,), seen, depth + 1)


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _same_storage(t: torch.Tensor, prototypes: torch.Tensor) -> bool:
    return (
        t.device == prototypes.device and t.dtype == prototypes.dtype
        and t.shape == prototypes.shape and t.stride() == prototypes.stride()
        and t.data_ptr() == prototypes.data_ptr()
    )


class _Matcher:
    """Is a tensor the prototypes? Identity, then shared storage, then equal values on CPU."""

    def __init__(self, prototypes: torch.Tensor) -> None:
        self.p = prototypes
        self._cpu: Optional[torch.Tensor] = None

    def __call__(self, t: torch.Tensor) -> bool:
        p = self.p
        if t is p:
            return True
        if t.shape != p.shape or t.is_sparse or t.device.type == "meta":
            return False
        try:
            if _same_storage(t, p):
                return True
            if self._cpu is None:
                self._cpu = p.detach().to("cpu")  # note: a sync point; checkpoint events only
            return torch.equal(t.detach().to("cpu", self._cpu.dtype), self._cpu)
        except (RuntimeError, TypeError):
            return False


def find_prototypes_in_checkpoint(checkpoint: Any, prototypes: torch.Tensor) -> list[str]:
    """Key paths (components joined by "/") where ``checkpoint`` holds a tensor equal to
    ``prototypes``: e.g. ``["prototypes"]`` or ``["model/head.prototypes"]``. Nested dicts,
    lists, tuples, modules and optimizers are searched; a match is the same tensor, the same
    storage, or the same shape with equal values (compared on CPU copies). Empty: not saved."""
    match = _Matcher(prototypes)
    return [_path_str(path) for path, t in _walk(checkpoint, (), set()) if match(t)]


def _proto_like_paths(checkpoint: Any, prototypes: torch.Tensor, name: Optional[str] = None) -> list[str]:
    """Paths of tensors with the prototypes' shape whose key mentions "proto" or ends with the
    watched tensor's own name (``head.last_layer.weight_v``, ``...parametrizations.weight.original1``)."""
    tails = {name, name.removeprefix("module.")} if name and name != "prototypes" else set()

    def named(path: str) -> bool:
        return "proto" in path.lower() or any(path.endswith(t) for t in tails if t)

    return [
        _path_str(path) for path, t in _walk(checkpoint, (), set())
        if t.shape == prototypes.shape and named(_path_str(path))
    ]


def _optimizer_param_groups(optimizer: Any) -> Optional[list]:
    """param_groups of an optimizer or of a wrapper (LightningOptimizer, ...)."""
    for obj in (optimizer, getattr(optimizer, "optimizer", None), getattr(optimizer, "_optimizer", None)):
        groups = getattr(obj, "param_groups", None) if obj is not None else None
        if isinstance(groups, list):
            return groups
    return None


def _is_prototypes(p: Any, prototypes: torch.Tensor) -> bool:
    return p is prototypes or (isinstance(p, torch.Tensor) and _same_storage(p, prototypes))


def _locate(optimizer: Any, prototypes: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """(group index, index in the group, flat index as in optimizer.state_dict()) or None."""
    groups = _optimizer_param_groups(optimizer)
    if groups is None:
        return None
    flat = 0
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g.get("params", ())):
            if _is_prototypes(p, prototypes):
                return gi, pi, flat
            flat += 1
    return None


def prototype_optimizer_state_in_checkpoint(checkpoint: Any, prototypes: torch.Tensor, optimizer: Any) -> bool:
    """True when ``checkpoint`` holds an optimizer state_dict (a mapping with ``state`` and
    ``param_groups``) whose param groups list the prototypes' position in ``optimizer`` and
    whose state for that position holds a tensor of the prototypes' shape (momentum_buffer,
    exp_avg, ...). When the live optimizer keeps no tensor state for the prototypes (plain
    SGD), being listed in the saved param groups is enough. False when the prototypes are not
    in ``optimizer``."""
    where = _locate(optimizer, prototypes) if optimizer is not None else None
    if where is None:
        return False
    pos = where[2]
    live = getattr(optimizer, "state", {})
    live_state = live.get(prototypes, {}) if isinstance(live, Mapping) else {}
    needs_tensor = any(isinstance(v, torch.Tensor) and v.shape == prototypes.shape for v in live_state.values())
    stack: list[Any] = [checkpoint]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.optim.Optimizer):
            obj = obj.state_dict()
        if isinstance(obj, Mapping):
            if "state" in obj and "param_groups" in obj and isinstance(obj["state"], Mapping):
                listed = any(
                    pos in list(g.get("params", ())) for g in obj["param_groups"] if isinstance(g, Mapping)
                )
                entry = obj["state"].get(pos, obj["state"].get(str(pos), {}))
                has_tensor = isinstance(entry, Mapping) and any(
                    isinstance(v, torch.Tensor) and v.shape == prototypes.shape for v in entry.values()
                )
                if listed and (has_tensor or not needs_tensor):
                    return True
            stack.extend(v for v in obj.values() if isinstance(v, (Mapping, list, tuple, torch.optim.Optimizer)))
        elif isinstance(obj, (list, tuple)):
            stack.extend(v for v in obj if isinstance(v, (Mapping, list, tuple, torch.optim.Optimizer)))
    return False


def check_checkpoint(checkpoint: Any, prototypes: torch.Tensor, step: int = 0, loaded: bool = False,
                     name: Optional[str] = None) -> list[Finding]:
    """Findings about a checkpoint dict: [] when it holds the prototypes. ``loaded=True``
    words the message for a checkpoint that was just resumed from (the prototypes must then
    equal the saved ones): a tensor of their shape saved under a prototype name (``*proto*``, or
    the watched tensor's ``name``) that differs from them was "not restored"."""
    if find_prototypes_in_checkpoint(checkpoint, prototypes):
        return []
    candidates = _proto_like_paths(checkpoint, prototypes, name)
    if loaded and candidates:
        return [Finding(PROTO_NOT_IN_CHECKPOINT, "warning", step, (
            f"the checkpoint holds prototypes at {candidates[0]!r} but the current prototypes "
            "differ from them after the resume: they were not restored. Restore them: "
            f"prototypes.data.copy_(checkpoint{''.join(f'[{k!r}]' for k in candidates[0].split('/'))})."
        ))]
    if loaded:
        return [Finding(PROTO_NOT_IN_CHECKPOINT, "error", step, (
            "resumed from a checkpoint without prototypes: they restart from random while the "
            "rest of the model is trained. Save them when writing checkpoints: "
            "checkpoint['prototypes'] = prototypes, and restore them on resume: "
            "prototypes.data.copy_(checkpoint['prototypes'])."
        ))]
    return [Finding(PROTO_NOT_IN_CHECKPOINT, "error", step, (
        f"the checkpoint does not contain the prototypes {tuple(prototypes.shape)}: a resumed run "
        "would restart them from random. Save them: checkpoint['prototypes'] = prototypes (or "
        "make them an nn.Parameter of a module whose state_dict is saved), and restore them on "
        "resume: prototypes.data.copy_(checkpoint['prototypes'])."
    ))]


# -- the monitor ------------------------------------------------------------------------------
def _check_int(owner: str, name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_float(owner: str, name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{owner}: {name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _lr(group: Mapping[str, Any]) -> Optional[float]:
    """A group's lr as a Python float, or None when reading it would sync (lr on the GPU)."""
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor):
        return float(lr) if lr.device.type == "cpu" and lr.numel() == 1 else None
    return float(lr) if isinstance(lr, (int, float)) else None


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


#: device-side accumulators (all 0-dim) -> (dtype, reset value); see HealthDoctor._devstate.
#: div: largest rank disagreement; col_*: collapsed steps, identical-rows steps, smallest entropy
#: of the mean assignment, smallest batch-mean gap of the per-sample entropy to ln K.
_DEV: dict[str, tuple[torch.dtype, float]] = {
    "div": (torch.float64, 0.0),
    "col_hits": (torch.int64, 0), "col_ident": (torch.int64, 0), "col_uniform": (torch.int64, 0),
    "col_ent_min": (torch.float32, math.inf), "col_gap_min": (torch.float32, math.inf),
}


def _longest_run(flags: list[float], run: int) -> tuple[int, int]:
    """Continue a run of consecutive true ``flags`` (0/1 floats) from ``run``; returns (the run
    at the end, the longest run seen, which includes the starting run)."""
    longest = run
    for f in flags:
        run = run + 1 if f else 0
        longest = max(longest, run)
    return run, longest


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
            n steps (near-duplicates build up slowly; every interval cost ~1 ms at K=512).
        dup_max_pairs: at most this many (row, prototype) similarities per check: above
            ``dup_max_pairs / K`` rows the compared subset shrinks to that (512 rows at
            K=65,536 with the default 2^25; the full 4,096 rows would be 137 GFLOP at D=256).
        dup_pairs_per_log: similarities computed per log interval; a larger check is spread over
            consecutive intervals and judged when its last rows are compared (a whole check in
            one interval up to K=1,448 with the default 2^21; 16 intervals at K=65,536), so no
            interval stalls its step by more than ~1 GFLOP at D=256 (~25 ms on one CPU core).
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
        dup_pairs_per_log: int = 1 << 21,
        norm_min: float = 1e-4,
        norm_max: float = 1e3,
    ) -> None:
        super().__init__(every_n_steps)
        owner = type(self).__name__
        self.patience = _check_int(owner, "patience", patience, 0)
        self.update_patience = _check_int(owner, "update_patience", update_patience, 0)
        self.static_every = _check_int(owner, "static_every", static_every, 1)
        self.sync_every = _check_int(owner, "sync_every", sync_every, 1)
        self.sync_tol = _check_float(owner, "sync_tol", sync_tol, 0.0)
        self.nonfinite_patience = _check_int(owner, "nonfinite_patience", nonfinite_patience, 0)
        self.collapse_min_fraction = _check_float(owner, "collapse_min_fraction", collapse_min_fraction, 0.0, 1.0)
        self.collapse_row_tol = _check_float(owner, "collapse_row_tol", collapse_row_tol, 0.0)
        self.collapse_patience = _check_int(owner, "collapse_patience", collapse_patience, 1)
        self.collapse_warmup = _check_int(owner, "collapse_warmup", collapse_warmup, 0)
        self.collapse_every = _check_int(owner, "collapse_every", collapse_every, 1)
        self.collapse_uniform_gap = _check_float(owner, "collapse_uniform_gap", collapse_uniform_gap, 0.0)
        self.collapse_embed_tol = _check_float(owner, "collapse_embed_tol", collapse_embed_tol, 0.0)
        self.dup_cosine = _check_float(owner, "dup_cosine", dup_cosine, -1.0, 1.0)
        self.dup_fraction = _check_float(owner, "dup_fraction", dup_fraction, 0.0, 1.0)
        self.dup_max_rows = _check_int(owner, "dup_max_rows", dup_max_rows, 1)
        self.dup_every = _check_int(owner, "dup_every", dup_every, 1)
        self.dup_max_pairs = _check_int(owner, "dup_max_pairs", dup_max_pairs, 1)
        self.dup_pairs_per_log = _check_int(owner, "dup_pairs_per_log", dup_pairs_per_log, 1)
        self.norm_min = _check_float(owner, "norm_min", norm_min, 0.0)
        self.norm_max = _check_float(owner, "norm_max", norm_max, 0.0)
        if self.norm_max <= self.norm_min:
            raise ValueError(f"{owner}: norm_max ({norm_max}) must be larger than norm_min ({norm_min})")

        # Python state (no sync to read)
        self.nograd_steps = 0        # consecutive checked steps without a prototype gradient
        self.lr_zero_steps = 0       # consecutive steps with lr 0 in the prototypes' group only
        self.collapse_intervals = 0  # consecutive collapsed log intervals
        self.collapse_checked = 0    # steps checked for collapse in this interval
        self._reported: set[tuple[str, str]] = set()
        # consecutive-step counters, kept on the host and advanced at the log interval from the
        # observations below: current run and longest run since the last on_log
        self.stuck_run = self.stuck_longest = 0  # gradient non-zero, value unchanged by step()
        self.gnf_run = self.gnf_longest = 0      # NaN/Inf gradient
        self.nonfinite_seen = False              # a NaN/Inf prototype since the last on_log
        # per-step observations: device tensors other monitors computed anyway (ctx.shared), kept
        # as they are and read in one transfer at the log interval, so a step costs no kernel here
        self._obs_gnorm: list[torch.Tensor] = []     # ||grad|| of each step with a gradient
        self._obs_stuck: list[torch.Tensor] = []     # ||grad|| of each snapshot step ...
        self._obs_update: list[torch.Tensor] = []    # ... and ||P_after - P_before|| of that step
        self._obs_rows: list[torch.Tensor] = []      # 0-dim ||P|| (or the update) at each step end
        # device state: 0-dim tensors, created on the prototypes' device on first use
        self._dev: dict[str, torch.Tensor] = {}
        # per-step scratch (not state)
        self._where: Optional[tuple[int, int, int]] = None
        self._last_static = -1
        self._grad_checked_step = -1
        self._ab_obs: Optional[tuple[int, bool]] = None  # (step, grad missing) from on_after_backward
        self._bos_step = -1
        self._last_dup: Optional[int] = None  # step the last duplicate check started at
        self._dup_todo: Optional[torch.Tensor] = None  # rows of the running check still to compare
        self._dup_best: list[torch.Tensor] = []        # their best cosine so far, per chunk
        self._dup_k = 0                                # K the running check was drawn for
        self.dup_checked_rows = 0                      # rows of the last finished check
        self._collective_started = False      # the first on_collective compares the initial values
        self._snap_step = -1
        self._update_step = -1                # step whose update norm was observed
        self._snap_gnorm: Optional[torch.Tensor] = None
        self._proj: Optional[torch.Tensor] = None

    # -- small helpers ----------------------------------------------------------------------
    def _say(self, ctx: RunContext, code: str, severity: str, message: str) -> None:
        """Report once per (code, severity); the hub deduplicates too, this skips the work."""
        if (code, severity) in self._reported:
            return
        self._reported.add((code, severity))
        self.report(ctx, code, severity, message)

    def _devstate(self, device: torch.device) -> dict[str, torch.Tensor]:
        d = self._dev
        if not d:
            for k, (dtype, init) in _DEV.items():
                d[k] = torch.full((), init, dtype=dtype, device=device)
        elif next(iter(d.values())).device != device:
            for k in list(d):
                d[k] = d[k].to(device)
        return d

    def _groups(self, ctx: RunContext) -> Optional[list]:
        return _optimizer_param_groups(ctx.optimizer) if ctx.optimizer is not None else None

    def _proto_group(self, ctx: RunContext, rescan: bool) -> Optional[Mapping[str, Any]]:
        """The param group holding the prototypes (O(1) with the cached position)."""
        groups = self._groups(ctx)
        if groups is None:
            return None
        w = self._where
        if w is not None and w[0] < len(groups):
            params = groups[w[0]].get("params", ())
            if w[1] < len(params) and _is_prototypes(params[w[1]], ctx.prototypes):
                return groups[w[0]]
        if not rescan:
            return None
        self._where = _locate(ctx.optimizer, ctx.prototypes)
        return groups[self._where[0]] if self._where is not None else None

    def _check_optimizer(self, ctx: RunContext) -> Optional[Mapping[str, Any]]:
        """PROTO_NOT_IN_OPTIMIZER; returns the prototypes' group."""
        self._last_static = ctx.step
        if ctx.optimizer is None:
            return None
        group = self._proto_group(ctx, rescan=True)
        if group is None:
            P = ctx.prototypes
            self._say(ctx, PROTO_NOT_IN_OPTIMIZER, "error", (
                f"the prototypes {tuple(P.shape)} are in no param group of the optimizer "
                f"({type(ctx.optimizer).__name__}), so optimizer.step() never changes them. "
                f"Fix: {_fix(PROTO_NOT_IN_OPTIMIZER)}."
                + (" (They are also not a leaf tensor: see PROTO_NOT_LEAF.)" if not P.is_leaf else "")
            ))
        return group

    def _others_have_grad(self, ctx: RunContext) -> bool:
        P = ctx.prototypes
        groups = self._groups(ctx)
        params: list = []
        if groups is not None:
            params = [p for g in groups for p in g.get("params", ())]
        if not params and ctx.model is not None:
            params = list(ctx.model.parameters())
        if not params:
            return True  # cannot tell: assume the rest of the model trains
        return any(p is not P and isinstance(p, torch.Tensor) and p.grad is not None for p in params)

    def _check_not_leaf(self, ctx: RunContext) -> bool:
        P = ctx.prototypes
        if P.is_leaf:
            return False
        self._say(ctx, PROTO_NOT_LEAF, "error", (
            f"the prototypes are not a leaf tensor (grad_fn={type(P.grad_fn).__name__}): they are "
            "a copy of the parameter, so they never get a .grad and no optimizer can step them. "
            "This is the nn.Parameter(x).cuda() / .to(copy=True) trap. Fix: "
            f"{_fix(PROTO_NOT_LEAF)}."
        ))
        return True

    def _grad_step_check(self, ctx: RunContext, grad_missing: bool) -> None:
        """PROTO_NO_GRAD: count consecutive steps without a gradient (once per step)."""
        self._grad_checked_step = ctx.step
        if not grad_missing:
            self.nograd_steps = 0
            return
        if not self._others_have_grad(ctx):
            return  # nothing has gradients (accumulation step, eval): not our business
        P = ctx.prototypes
        if ctx.step < ctx.freeze_steps:
            self._say(ctx, PROTO_NO_GRAD, "info", (
                f"the prototypes get no gradient at step {ctx.step}: expected during the freeze "
                f"(freeze_steps={ctx.freeze_steps}, e.g. freeze_last_layer cancels it)."
            ))
            return
        self.nograd_steps += 1
        why = "requires_grad is False" if not P.requires_grad else "they are not used in the loss or the gradient is cancelled"
        if self.nograd_steps > self.patience:
            self._say(ctx, PROTO_NO_GRAD, "error", (
                f"the prototypes got no gradient for {self.nograd_steps} consecutive steps while the "
                f"rest of the model did ({why}). Fix: {_fix(PROTO_NO_GRAD)}."
            ))
        else:
            self._say(ctx, PROTO_NO_GRAD, "info", (
                f"the prototypes got no gradient at step {ctx.step} while the rest of the model did "
                f"({why}); an error follows after {self.patience} such steps in a row."
            ))

    def _check_lr(self, ctx: RunContext, group: Optional[Mapping[str, Any]]) -> Optional[float]:
        """PROTO_LR_ZERO from Python floats; returns the prototypes' lr (None if unknown)."""
        if group is None:
            return None
        lr = _lr(group)
        if lr is None or lr != 0.0:
            self.lr_zero_steps = 0
            return lr
        groups = self._groups(ctx) or [group]
        others = [_lr(g) for g in groups if g is not group]
        all_zero = all(x == 0.0 for x in others if x is not None)
        if all_zero or ctx.step < ctx.freeze_steps:
            self.lr_zero_steps = 0
            why = "every param group has lr 0 (a warm-up starting at 0)" if all_zero else \
                f"an intended freeze (freeze_steps={ctx.freeze_steps})"
            self._say(ctx, PROTO_LR_ZERO, "info", (
                f"the prototypes' lr is 0 at step {ctx.step}: {why}; they do not move this step."
            ))
            return lr
        self.lr_zero_steps += 1
        if self.lr_zero_steps > self.patience:
            self._say(ctx, PROTO_LR_ZERO, "warning", (
                f"the prototypes' param group has had lr 0 for {self.lr_zero_steps} steps while other "
                f"groups train (lr up to {max(x for x in others if x is not None):g}): the prototypes "
                f"are frozen. Likely cause: {_fix(PROTO_LR_ZERO)}."
            ))
        else:
            self._say(ctx, PROTO_LR_ZERO, "info", (
                f"the prototypes' param group has lr 0 at step {ctx.step} while other groups train; "
                f"a warning follows after {self.patience} such steps in a row."
            ))
        return lr

    def _fingerprint(self, P: torch.Tensor) -> torch.Tensor:
        """(3,) float64: sum, sum of squares, projection on a fixed random vector (same seed
        on every rank)."""
        x = P.detach().reshape(-1).to(torch.float64)
        if self._proj is None or self._proj.numel() != x.numel() or self._proj.device != x.device:
            g = torch.Generator().manual_seed(20250101)
            self._proj = (torch.rand(x.numel(), generator=g, dtype=torch.float64) - 0.5).to(x.device)
        return torch.stack([x.sum(), (x * x).sum(), (x * self._proj).sum()])

    def _replica_gap(self, P: torch.Tensor) -> torch.Tensor:
        """Largest relative disagreement of the fingerprint across ranks (a collective)."""
        f = self._fingerprint(P)
        both = torch.cat([f, -f])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        mx, mn = both[:3], -both[3:]
        return ((mx - mn) / (1.0 + mx.abs())).amax()

    # -- hooks --------------------------------------------------------------------------------
    def on_train_start(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes
        self._check_not_leaf(ctx)
        if not P.requires_grad:
            if ctx.freeze_steps > 0:
                self._say(ctx, PROTO_NO_GRAD, "info", (
                    f"the prototypes have requires_grad=False at the start; freeze_steps="
                    f"{ctx.freeze_steps}, so this is taken as an intended freeze. Set "
                    "prototypes.requires_grad_(True) when the freeze ends."
                ))
            else:
                self._say(ctx, PROTO_NO_GRAD, "error", (
                    "the prototypes have requires_grad=False, so they never get a gradient. Fix: "
                    "create them as nn.Parameter(x) (or call prototypes.requires_grad_(True)) before "
                    "building the optimizer."
                ))
        self._check_optimizer(ctx)
        # non-step event: reading device values is allowed
        if not bool(torch.isfinite(P.detach()).all()):
            self._say(ctx, PROTO_NONFINITE, "error", (
                f"the prototypes hold NaN/Inf before training starts: check their initialisation. "
                f"Fix: {_fix(PROTO_NONFINITE)}."
            ))
        return None

    def on_collective(self, ctx: RunContext) -> Metrics:
        """The replica comparison (a collective), called by the hub on every rank even if this
        monitor was switched off on one: first at train start, then every ``sync_every`` steps."""
        if _distributed_world() <= 1:
            return None
        P = ctx.prototypes
        if not self._collective_started:  # train start: reading the value is allowed
            self._collective_started = True
            gap = float(self._replica_gap(P))
            if gap > self.sync_tol:
                self._say(ctx, PROTO_REPLICAS_DIVERGED, "error", (
                    f"the ranks start from different prototypes (relative fingerprint gap {gap:.3g}): "
                    "initialise them identically: seed every rank the same (torch.manual_seed(seed)) "
                    "before creating them, or broadcast them from rank 0 after creating them: "
                    "dist.broadcast(prototypes.data, src=0)."
                ))
        elif ctx.step % self.sync_every == 0:
            d = self._devstate(P.device)
            torch.maximum(d["div"], self._replica_gap(P), out=d["div"])
        return None

    def on_after_backward(self, ctx: RunContext) -> Metrics:
        if self._check_not_leaf(ctx):
            return None
        self._ab_obs = (ctx.step, ctx.prototypes.grad is None)
        return None

    def on_before_optimizer_step(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes
        self._bos_step = ctx.step
        if self._check_not_leaf(ctx):
            return None
        grad = P.grad
        self._grad_step_check(ctx, grad is None)
        if ctx.step - self._last_static >= self.static_every or ctx.step % self.static_every == 0:
            group = self._check_optimizer(ctx)
        else:
            group = self._proto_group(ctx, rescan=False)
        lr = self._check_lr(ctx, group)
        if grad is None or not ctx.shared.full_step(ctx):  # above full_above: every full_every steps
            return None
        # the gradient norm (shared with the gradient monitor) is NaN/Inf iff an entry is (or
        # |g| > ~1e19 in float32) and > 0 iff an entry is non-zero
        gnorm = ctx.shared.grad_norm(ctx)
        if gnorm is None:  # a sparse gradient: not checked
            return None
        self._obs_gnorm.append(gnorm)
        # snapshot for PROTO_NOT_UPDATING (skipped when lr 0 or frozen: other codes cover it),
        # shared with the delta monitor
        if lr != 0.0 and ctx.step >= ctx.freeze_steps:
            ctx.shared.snapshot(ctx)
            self._snap_gnorm = gnorm
            self._snap_step = ctx.step
        return None

    def on_after_optimizer_step(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes
        if self._bos_step != ctx.step and self._grad_checked_step != ctx.step and P.is_leaf:
            self._grad_step_check(ctx, P.grad is None)
        if self._snap_step == ctx.step:
            self._snap_step = -1
            update = ctx.shared.update_norm(ctx)  # ||P - snapshot||, shared with the delta monitor
            if update is not None:
                self._obs_stuck.append(self._snap_gnorm)
                self._obs_update.append(update)
                self._update_step = ctx.step
        return None

    def on_step_end(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes
        d = self._devstate(P.device)
        if (self._grad_checked_step != ctx.step and self._ab_obs is not None
                and self._ab_obs[0] == ctx.step):
            self._grad_step_check(ctx, self._ab_obs[1])
        # NaN/Inf prototypes: ||P|| is NaN/Inf iff an entry is (or beyond ~1e19 in float32, where
        # its square overflows). The step's update norm ||P - P_before|| is NaN/Inf iff P is, or
        # was before the step: a step with an update needs no pass over P here
        if self._update_step == ctx.step and self._obs_update:
            self._obs_rows.append(self._obs_update[-1])
        elif ctx.shared.full_step(ctx):
            self._obs_rows.append(ctx.shared.norm(ctx))
        else:  # above full_above between full steps: the rows of the norm monitor's sample
            idx = row_sample(P.shape[0], SAMPLE_ABOVE, SAMPLE_ROWS, P.device)
            self._obs_rows.append(ctx.shared.norm(ctx) if idx is None
                                  else torch.linalg.vector_norm(ctx.shared.sampled_row_norms(ctx, idx)))
        out = ctx.outputs
        if out is None or ctx.step < self.collapse_warmup:
            return None
        if (ctx.step - self.collapse_warmup) % self.collapse_every != 0:
            return None
        # large K: the first assignment_rows(K) rows of each matrix (every row of a usual batch at K=512)
        probs, targets = (m if m is None or m.dim() != 2 else m[:assignment_rows(m.shape[-1])]
                          for m in (out.student_probs, out.teacher_targets))
        mats = [m.detach() for m in (probs, targets) if m is not None and m.dim() == 2 and m.shape[0] >= 2]
        if not mats:
            return None
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
            gap = math.log(m.shape[-1]) - torch.special.entr(m.detach().float()).sum(dim=-1)  # (N,) nats
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
        return None

    def on_log(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes.detach()
        d = self._devstate(P.device)
        K = P.shape[0]
        # cheap O(K^2 D) statistics at the interval, read together with the accumulators
        extra: list[torch.Tensor] = []
        dup_due = self._dup_todo is not None or self._last_dup is None \
            or ctx.step - self._last_dup >= self.dup_every
        if P.dim() == 2 and K >= 2:
            Pf = P.float()
            norms = Pf.norm(dim=1)
            extra += [norms.min().double(), norms.max().double()]
            if dup_due:
                dup = self._duplicate_fraction(Pf, norms, ctx.step)
                if dup is not None:  # None: the check goes on at the next interval
                    extra.append(dup)
        keys = tuple(_DEV)
        obs, n_g, n_s = self._observations(P.device)
        head = len(keys) + len(extra)
        # note: the one CPU-GPU sync point of this monitor per interval
        values = torch.cat([torch.stack([d[k].double() for k in keys] + extra), obs]).cpu().tolist()
        v = dict(zip(keys, values))
        self._advance(values[head:], n_g, n_s)
        step = ctx.step

        if self.stuck_longest > self.update_patience:
            self._say(ctx, PROTO_NOT_UPDATING, "error", (
                f"the prototypes had a non-zero gradient but did not change across optimizer.step() "
                f"for {self.stuck_longest} consecutive steps (up to step {step}): the optimizer that "
                f"steps does not update them. Fix: {_fix(PROTO_NOT_UPDATING)}."
            ))
        if self.nonfinite_seen:
            self._say(ctx, PROTO_NONFINITE, "error", (
                f"the prototypes hold NaN/Inf (seen by step {step}): training of the prototypes is "
                f"lost from there on; resume from an earlier checkpoint. Fix: {_fix(PROTO_NONFINITE)}."
            ))
        if self.gnf_longest > self.nonfinite_patience:
            self._say(ctx, PROTO_NONFINITE, "error", (
                f"the prototypes' gradient was NaN/Inf for {self.gnf_longest} consecutive steps (by "
                f"step {step}). Fix: {_fix(PROTO_NONFINITE)}."
            ))
        elif self.gnf_longest > 0:
            self._say(ctx, PROTO_NONFINITE, "info", (
                f"the prototypes' gradient was NaN/Inf in step(s) up to step {step}; "
                "isolated ones are normal with AMP (GradScaler skips those steps)."
            ))
        if v["div"] > self.sync_tol:
            self._say(ctx, PROTO_REPLICAS_DIVERGED, "error", (
                f"the prototypes differ across the {_distributed_world()} ranks (relative fingerprint "
                f"gap {v['div']:.3g} by step {step}): their gradient is not averaged across ranks "
                f"because they live outside the DDP module, so each rank trains its own. Fix: "
                f"{_fix(PROTO_REPLICAS_DIVERGED)}."
            ))
        if self.collapse_checked > 0:
            if 2 * v["col_hits"] > self.collapse_checked:
                self.collapse_intervals += 1
                if v["col_uniform"] * 2 > self.collapse_checked:
                    what = (f"uniform kind: most samples' assignment is near uniform (mean entropy "
                            f"{v['col_gap_min']:.2g} nats below ln K = {math.log(K):.3g}): the targets "
                            "carry no information and the loss sits at ln K. Fix: sharpen the targets: "
                            "lower the teacher temperature (DINO: 0.04, warm-up from 0.04), a slower "
                            "center momentum (0.9), sharpening in SDPN/MSN; check that the centering does "
                            "not dominate")
                elif v["col_ident"] * 2 > self.collapse_checked:
                    what = ("one-prototype kind: every input of the batch maps to the same assignment (the "
                            "rows of the student probabilities / teacher targets are identical): the "
                            "representation collapsed, or the inputs are all the same. Fix: balance the "
                            "targets (Sinkhorn, centering), keep the me-max regulariser, lower the lr, and "
                            "check that the inputs and augmentations differ")
                else:
                    what = (f"one-prototype kind: the batch-mean student probability uses few prototypes "
                            f"(perplexity {math.exp(v['col_ent_min']):.3g} of {K}). Fix: balance the "
                            "targets (Sinkhorn, centering), keep the me-max regulariser, lower the lr")
                sev = "error" if self.collapse_intervals >= self.collapse_patience else "warning"
                self._say(ctx, PROTO_COLLAPSE, sev, (
                    f"assignment collapse in {int(v['col_hits'])} of {self.collapse_checked} steps up to "
                    f"step {step} ({self.collapse_intervals} log interval(s) in a row), {what}."
                ))
            else:
                self.collapse_intervals = 0
        if extra:
            nmin, nmax = values[len(keys):len(keys) + 2]
            dup = values[len(keys) + 2] if len(extra) == 3 else 0.0
            if dup > self.dup_fraction:
                self._say(ctx, PROTO_DUPLICATES, "warning", (
                    f"{100 * dup:.0f}% of the prototypes have a near-duplicate (cosine > "
                    f"{self.dup_cosine}) at step {step}: they waste capacity. Fix: {_fix(PROTO_DUPLICATES)}."
                ))
            if nmin < self.norm_min or nmax > self.norm_max:
                self._say(ctx, PROTO_NORM_OUT_OF_RANGE, "warning", (
                    f"prototype norms span [{nmin:.3g}, {nmax:.3g}] at step {step}, outside "
                    f"[{self.norm_min:g}, {self.norm_max:g}]. Fix: {_fix(PROTO_NORM_OUT_OF_RANGE)}."
                ))
        # reset the interval accumulators (the consecutive runs carry on)
        self.stuck_longest, self.gnf_longest, self.nonfinite_seen = self.stuck_run, self.gnf_run, False
        d["div"].zero_()
        d["col_hits"].zero_()
        d["col_ident"].zero_()
        d["col_uniform"].zero_()
        d["col_ent_min"].fill_(math.inf)
        d["col_gap_min"].fill_(math.inf)
        self.collapse_checked = 0
        return None

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
            self._dup_todo, self._dup_best, self._last_dup, self._dup_k = idx, [], step, K
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
        self.gnf_run, longest = _longest_run(flags[:n_g], self.gnf_run)
        self.gnf_longest = max(self.gnf_longest, longest)
        self.stuck_run, longest = _longest_run(flags[n_g:n_g + n_s], self.stuck_run)
        self.stuck_longest = max(self.stuck_longest, longest)
        self.nonfinite_seen = self.nonfinite_seen or bool(flags[n_g + n_s])

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
        if rel <= self.collapse_embed_tol:
            self._say(ctx, PROTO_COLLAPSE, "warning", (
                f"the {x.shape[0]} embeddings logged at step {ctx.step} are (near-)identical (each within "
                f"{rel:.2g} of their norm from their mean): every input maps to the same output, the "
                "one-prototype kind of collapse. Fix: balance the targets (Sinkhorn, centering), keep the "
                "me-max regulariser, lower the lr, and check that the inputs and augmentations differ."
            ))
        return None

    def on_save_checkpoint(self, ctx: RunContext) -> Metrics:
        if ctx.checkpoint is None:
            return None
        for f in check_checkpoint(ctx.checkpoint, ctx.prototypes, step=ctx.step):
            self._say(ctx, f.code, f.severity, f.message)
        return None

    def on_load_checkpoint(self, ctx: RunContext) -> Metrics:
        if ctx.checkpoint is None:
            return None
        for f in check_checkpoint(ctx.checkpoint, ctx.prototypes, step=ctx.step, loaded=True,
                                  name=ctx.extra.get("prototypes_name")):
            self._say(ctx, f.code, f.severity, f.message)
        return None

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._obs_gnorm or self._obs_stuck or self._obs_rows:  # read what the steps observed
            obs, n_g, n_s = self._observations((self._obs_gnorm or self._obs_stuck or self._obs_rows)[0].device)
            self._advance(obs.cpu().tolist(), n_g, n_s)
        return {
            "stuck_run": self.stuck_run, "stuck_longest": self.stuck_longest,
            "gnf_run": self.gnf_run, "gnf_longest": self.gnf_longest,
            "nonfinite_seen": self.nonfinite_seen,
            "nograd_steps": self.nograd_steps,
            "lr_zero_steps": self.lr_zero_steps,
            "collapse_intervals": self.collapse_intervals,
            "collapse_checked": self.collapse_checked,
            "reported": sorted([c, s] for c, s in self._reported),
            "device": {k: v.detach().cpu().clone() for k, v in self._dev.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.nograd_steps = int(state.get("nograd_steps", 0))
        self.lr_zero_steps = int(state.get("lr_zero_steps", 0))
        self.collapse_intervals = int(state.get("collapse_intervals", 0))
        self.collapse_checked = int(state.get("collapse_checked", 0))
        self._reported = {(c, s) for c, s in state.get("reported", [])}
        dev = state.get("device", {})
        # the counters; checkpoints of before 2026-11-25 kept them on the device
        self.stuck_run = int(state.get("stuck_run", dev.get("stuck", 0)))
        self.stuck_longest = int(state.get("stuck_longest", dev.get("stuck_max", 0)))
        self.gnf_run = int(state.get("gnf_run", dev.get("gnf", 0)))
        self.gnf_longest = int(state.get("gnf_longest", dev.get("gnf_max", 0)))
        self.nonfinite_seen = bool(state.get("nonfinite_seen", not math.isfinite(float(dev.get("psum", 0.0)))))
        self._dev = {}
        if dev:
            # moved to the prototypes' device on first use (see _devstate)
            for k, (dtype, init) in _DEV.items():
                self._dev[k] = torch.as_tensor(dev.get(k, init), dtype=dtype).clone()
