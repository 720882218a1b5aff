"""The one table of every finding code: severity, what it means, the fix, and where it comes from.

Every module that reports a finding imports its code from here (constants such as
``PROTO_NOT_LEAF``, equal to their own name), so a code is typed once. :data:`CODES` maps each
code to a :class:`Code`; the README's findings table is held to it by
``tests/test_readme_tables.py``.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Code", "CODES", "fix_of"]

# -- the health doctor (monitors/health.py) and its checkpoint check (monitors/checkpoint_check.py)
PROTO_NOT_LEAF = "PROTO_NOT_LEAF"
PROTO_NO_GRAD = "PROTO_NO_GRAD"
PROTO_NOT_IN_OPTIMIZER = "PROTO_NOT_IN_OPTIMIZER"
PROTO_LR_ZERO = "PROTO_LR_ZERO"
PROTO_NOT_UPDATING = "PROTO_NOT_UPDATING"
PROTO_NOT_IN_CHECKPOINT = "PROTO_NOT_IN_CHECKPOINT"
PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT = "PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT"
PROTO_REPLICAS_DIVERGED = "PROTO_REPLICAS_DIVERGED"
PROTO_NONFINITE = "PROTO_NONFINITE"
PROTO_COLLAPSE = "PROTO_COLLAPSE"
PROTO_DUPLICATES = "PROTO_DUPLICATES"
PROTO_NORM_OUT_OF_RANGE = "PROTO_NORM_OUT_OF_RANGE"
# -- the hub (monitors/hub.py)
SINK_FAILED = "SINK_FAILED"
MONITOR_FAILED = "MONITOR_FAILED"
# -- the trainer checks (monitors/trainer_checks.py, the `checks` monitor)
PROTO_GRAD_NOT_AVERAGED = "PROTO_GRAD_NOT_AVERAGED"
PROTO_FREEZE_IGNORED = "PROTO_FREEZE_IGNORED"
TEACHER_SHARES_STUDENT = "TEACHER_SHARES_STUDENT"
TEACHER_NOT_UPDATING = "TEACHER_NOT_UPDATING"


class Code(NamedTuple):
    """One row of the table: the default severity, what the finding means, the fix, and the
    thread it comes from (``"protowatch"``: a check of this project's own)."""

    severity: str
    description: str
    fix: str
    source: str


#: code -> :class:`Code` (a tuple: ``CODES[code][2]`` is ``CODES[code].fix``)
CODES: dict[str, Code] = {k: Code(*v) for k, v in {
    PROTO_NOT_LEAF: (
        "error",
        "the prototypes tensor is not a leaf of the autograd graph (nn.Parameter(x).cuda() or "
        ".to(copy=True) returned a copy), so it gets no .grad and the optimizer cannot step it",
        "create the Parameter on the device: nn.Parameter(x.to(device)) instead of "
        "nn.Parameter(x).cuda(), and use that same tensor in the forward pass and the optimizer",
        "protowatch",
    ),
    PROTO_NO_GRAD: (
        "error",
        "the prototypes get no gradient (requires_grad is False, they are not used in the loss, "
        "or the gradient is cancelled) while the rest of the model does; info during an "
        "intended freeze (step < freeze_steps) or for up to `patience` steps",
        "make them trainable (nn.Parameter(x), requires_grad=True), use that same tensor in the "
        "loss, and cancel their gradient only while step < freeze_last_layer steps",
        "protowatch",
    ),
    PROTO_NOT_IN_OPTIMIZER: (
        "error",
        "no param group of the optimizer holds the prototypes, so optimizer.step() skips them",
        "add the prototypes to the optimizer: "
        "optimizer.add_param_group({'params': [prototypes], 'weight_decay': 0.0})",
        "protowatch",
    ),
    PROTO_LR_ZERO: (
        "warning",
        "the prototypes' param group has lr 0 while other groups train, for more than "
        "`patience` steps; info while every group has lr 0 (warm-up) or during a freeze",
        "a loop that rewrites every group's lr overrode the prototype lr: scale per group, "
        "for g in optimizer.param_groups: g['lr'] = lr * g.get('lr_scale', 1.0)",
        "protowatch",
    ),
    PROTO_NOT_UPDATING: (
        "error",
        "the prototypes have a non-zero gradient but their value did not change across "
        "optimizer.step() for more than `update_patience` consecutive steps",
        "make sure the optimizer that steps is the one holding the prototypes "
        "(optimizer.add_param_group({'params': [prototypes], 'weight_decay': 0.0})), that "
        "their group's lr is > 0, and that no code copies old values back into them",
        "protowatch",
    ),
    PROTO_NOT_IN_CHECKPOINT: (
        "error",
        "the checkpoint holds no tensor equal to the prototypes (or a resume did not restore "
        "them), so a resumed run restarts them from random",
        "save them: checkpoint['prototypes'] = prototypes; on resume: "
        "prototypes.data.copy_(checkpoint['prototypes'])",
        "protowatch",
    ),
    PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT: (
        "warning",
        "the prototypes are in the checkpoint but their optimizer state (momentum buffer, Adam "
        "moments) is not, so a resumed run restarts it",
        "save the optimizer too: checkpoint['optimizer'] = optimizer.state_dict()",
        "protowatch",
    ),
    PROTO_REPLICAS_DIVERGED: (
        "error",
        "under torch.distributed the ranks hold different prototypes (their fingerprints "
        "differ by more than `sync_tol`), at the start or after some steps",
        "all-reduce the gradient after backward: dist.all_reduce(prototypes.grad); "
        "prototypes.grad /= world_size (or make them a parameter of the DDP-wrapped module); "
        "at the start: dist.broadcast(prototypes.data, src=0)",
        "protowatch",
    ),
    PROTO_NONFINITE: (
        "error",
        "the prototypes hold NaN/Inf, or their gradient was NaN/Inf for more than "
        "`nonfinite_patience` consecutive steps (isolated non-finite gradients, as in AMP "
        "steps skipped by GradScaler, are info)",
        "lower the lr, clip gradients (torch.nn.utils.clip_grad_norm_), use a GradScaler with "
        "AMP, and check the loss for log(0) or division by a zero norm",
        "protowatch",
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
        "facebookresearch/dino #246, #43; facebookresearch/dinov2 #407; lightly-ai/lightly #736; facebookresearch/swav #120",
    ),
    PROTO_DUPLICATES: (
        "warning",
        "more than `dup_fraction` of the prototypes have a near-duplicate (cosine > "
        "`dup_cosine`)",
        "initialise them randomly (uniform in +-1/sqrt(D)) instead of copies, and keep the "
        "targets balanced (Sinkhorn) or a KoLeo/me-max regulariser",
        "protowatch",
    ),
    PROTO_NORM_OUT_OF_RANGE: (
        "warning",
        "the smallest or largest prototype norm is outside [norm_min, norm_max]",
        "set weight decay 0 for the prototypes, L2-normalise them in the forward pass, and "
        "check the lr",
        "protowatch",
    ),
    SINK_FAILED: (
        "warning",
        "a sink raised (W&B init timeout or CommError, a full disk) and was switched off, or the "
        "W&B sink fell back to an offline run; training and the other sinks (local records) go on",
        "for W&B: upload the offline run later with the printed `wandb sync <run dir>`; check "
        "the network, WANDB_BASE_URL and wandb_init_timeout; otherwise free disk space",
        "protowatch",
    ),
    MONITOR_FAILED: (
        "warning",
        "a monitor raised in one of its hooks and was switched off; training and the other "
        "monitors go on",
        "fix the monitor or remove it from the monitors list",
        "protowatch",
    ),
    PROTO_GRAD_NOT_AVERAGED: (
        "warning",
        "under torch.distributed the prototypes' gradient is the sum of the ranks' local gradients, "
        "not their mean (compared every `grad_avg_every` steps: one all-reduce of (K, D)): SGD "
        "trains them at world_size x the lr; info when the optimizer is invariant to the gradient's "
        "scale (Adam, AdamW, RMSprop, Adagrad, LARS/LARC, LAMB)",
        "average: dist.all_reduce(prototypes.grad); prototypes.grad /= dist.get_world_size(), or "
        "dist.all_reduce(prototypes.grad, op=dist.ReduceOp.AVG)",
        "3D-Speaker's SDPN trainer (AllReduceSum on the prototypes' gradient); facebookresearch/msn #21",
    ),
    PROTO_FREEZE_IGNORED: (
        "warning",
        "a freeze was declared (freeze_steps, freeze_last_layer) but the prototypes changed across "
        "optimizer.step() during it: the gradient-cancelling function matches no parameter name",
        "cancel the prototypes' own gradient while step < freeze_steps: prototypes.grad = None "
        "before optimizer.step(), or match their parameter name; freeze the student, not the teacher",
        "3D-Speaker's freeze_last_layer; lightly-ai/lightly #1586",
    ),
    TEACHER_SHARES_STUDENT: (
        "error",
        "the teacher's parameters share storage with the student's (the teacher is the student's "
        "own tensors, not a copy), so the EMA is a no-op",
        "build the teacher as a copy: teacher = copy.deepcopy(student); teacher.requires_grad_(False)",
        "facebookresearch/dinov2 #407",
    ),
    TEACHER_NOT_UPDATING: (
        "warning",
        "the teacher has not changed for `teacher_patience` steps while the student trained: "
        "the EMA update is not applied (or its momentum is 1)",
        "after optimizer.step() update the teacher every step: t = m * t + (1 - m) * s with m < 1",
        "protowatch",
    ),
}.items()}


def fix_of(code: str) -> str:
    """The fix of ``code`` as the table words it."""
    return CODES[code].fix
