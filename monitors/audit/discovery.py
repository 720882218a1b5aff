"""Where the prototypes are in a checkpoint of any trainer, found by name and shape.

A checkpoint is flattened to ``{path: tensor}`` (container keys joined by ``/``, state-dict keys
kept as they are: ``student/module.head.last_layer.weight_v``). The prototypes are, in order of
preference: a tensor named ``prototypes`` (3D-Speaker's SDPN, this project), SwAV's
``prototypes.weight``, a DINO head's ``last_layer`` (``weight``; weight-normalised as
``weight_v``/``weight_g`` or ``parametrizations.weight.original1``/``original0``, combined into
the effective weight), any other 2-D tensor whose name mentions ``proto``, or the tensor
``--key`` names. A path with a teacher's name (``teacher``, ``t_model``, ``ema``, ...) is a
teacher copy, paired with the student's by the rest of its name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from ..formats.checkpoints import tensor_paths

__all__ = ["Located", "flatten", "locate", "effective_weight", "model_tensors", "optimizer_state_for",
           "two_dim_tensors", "is_teacher_path"]

#: top-level keys that hold no model weights (optimizer, schedules, losses' centers, RNG, monitors)
_NOT_MODEL = re.compile(r"optim|sched|scaler|loss|rng|monitor|callback|loops|hparams", re.I)
#: buffers that move in train mode whether or not anything trains
_STATS_TAILS = ("running_mean", "running_var", "num_batches_tracked")
_TEACHER_TOKENS = {"teacher", "t_model", "teacher_model", "ema", "model_ema", "ema_model", "momentum_encoder",
                   "target_encoder", "target_net", "teacher_head", "teacher_backbone"}
_STUDENT_TOKENS = {"student", "s_model", "student_model", "online", "student_head", "student_backbone",
                   "module", "model", "state_dict"}
_WEIGHT_NORM = (("weight_v", "weight_g"), ("parametrizations.weight.original1", "parametrizations.weight.original0"))


def _tokens(path: str) -> list[str]:
    return [t for t in re.split(r"[/.]", path.lower()) if t]


def is_teacher_path(path: str) -> bool:
    """Does ``path`` name a teacher (EMA) copy?"""
    return any(t in _TEACHER_TOKENS or t.startswith("teacher") for t in _tokens(path))


def _canonical(path: str) -> str:
    """The path without its role words, to pair a student tensor with its teacher copy."""
    return ".".join(t for t in _tokens(path) if t not in _TEACHER_TOKENS and t not in _STUDENT_TOKENS
                    and not t.startswith("teacher") and not t.startswith("student"))


def flatten(checkpoint: Any) -> dict[str, torch.Tensor]:
    """``{path: tensor}`` of every tensor in a checkpoint (:func:`monitors.formats.checkpoints.tensor_paths`),
    detached: a whole pickled module (``--trust-pickle``) gives its parameters' values."""
    return {path: t.detach() for path, t in tensor_paths(checkpoint)}


def _is_model_path(path: str) -> bool:
    """Not under an optimizer, schedule, RNG or monitor entry, nor a loss module's state (DINO's center)."""
    return not _NOT_MODEL.search(path.split("/", 1)[0]) and not any("loss" in t for t in _tokens(path))


def _is_stats(path: str) -> bool:
    return path.endswith(_STATS_TAILS)


@dataclass
class Located:
    """Where the prototypes are: the student's path (None: not found), the teacher copy's, how they
    were recognised, and (when not found) the 2-D tensors seen, for ``--key``."""

    student: Optional[str] = None
    teacher: Optional[str] = None
    how: str = ""
    candidates: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def parts(self, path: Optional[str]) -> set[str]:
        """The saved tensors that make up the prototypes at ``path`` (two when weight-normalised)."""
        if path is None:
            return set()
        for v, g in _WEIGHT_NORM:
            if path.endswith(v):
                return {path, path[: -len(v)] + g}
        return {path}


def two_dim_tensors(flat: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of the model's floating-point 2-D tensors, largest first."""
    out = [(p, tuple(t.shape)) for p, t in flat.items()
           if t.dim() == 2 and t.is_floating_point() and _is_model_path(p)]
    return sorted(out, key=lambda x: -x[1][0] * x[1][1])


def _rank(path: str) -> Optional[int]:
    """How strongly the name says "prototypes" (0 strongest), None when it does not."""
    low = path.lower()
    tail = re.split(r"[/]", low)[-1]
    if tail == "prototypes" or tail.endswith(".prototypes"):
        return 0
    if tail.endswith("prototypes.weight"):
        return 1
    if re.search(r"last_layer\.(weight_v|parametrizations\.weight\.original1|weight)$", tail):
        return 2
    if "proto" in tail:
        return 3
    return None


def _key_matches(path: str, key: str) -> bool:
    return path == key or path.endswith("/" + key) or path.endswith("." + key)


def locate(flat: Mapping[str, torch.Tensor], key: Optional[str] = None) -> Located:
    """Find the prototypes (and a teacher copy) in a flattened checkpoint."""
    found: list[tuple[int, str]] = []
    for path, t in flat.items():
        if t.dim() != 2 or not t.is_floating_point() or not _is_model_path(path):
            continue
        if key is not None:
            if _key_matches(path, key) or _key_matches(_canonical(path), _canonical(key)):
                found.append((0 if _key_matches(path, key) else 1, path))
            continue
        r = _rank(path)
        if r is not None:
            found.append((r, path))
    students = sorted((is_teacher_path(p), r, p) for r, p in found if not is_teacher_path(p) or (key is not None and r == 0))
    if not students:
        return Located(candidates=two_dim_tensors(flat))
    if key is not None:
        best = [p for t, r, p in students if (t, r) == students[0][:2]]
        if len(best) > 1:
            raise ValueError(f"--key {key!r} matches {len(best)} tensors ({', '.join(best[:6])}"
                             f"{', ...' if len(best) > 6 else ''}): name one of them in full")
    student = students[0][2]
    shape = flat[student].shape
    canon = _canonical(student)
    teachers = sorted((r, p) for r, p in found if p != student and is_teacher_path(p) and flat[p].shape == shape)
    paired = [p for _, p in teachers if _canonical(p) == canon]
    teacher = paired[0] if paired else (teachers[0][1] if teachers else None)
    how = "--key" if key is not None else ("weight-normalised " if any(student.endswith(v) for v, _ in _WEIGHT_NORM)
                                           else "") + "by name"
    return Located(student=student, teacher=teacher, how=how)


def effective_weight(flat: Mapping[str, torch.Tensor], path: str) -> torch.Tensor:
    """The (K, D) prototypes at ``path`` as float32; a weight-normalised pair combined into the
    weight the layer uses (g * v / ||v|| per row)."""
    t = flat[path]
    for v_name, g_name in _WEIGHT_NORM:
        g_path = path[: -len(v_name)] + g_name
        if path.endswith(v_name) and g_path in flat:
            v = t.float()
            g = flat[g_path].float().reshape(-1, 1)
            if g.shape[0] == v.shape[0]:
                return v * (g / v.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return t.float()


def model_tensors(flat: Mapping[str, torch.Tensor], located: Located, teacher: bool) -> dict[str, torch.Tensor]:
    """The floating-point model tensors of the student (``teacher=False``: without the prototypes)
    or of the teacher (with its prototypes), running statistics left out."""
    skip = located.parts(located.student)
    out = {}
    for p, t in flat.items():
        if not t.is_floating_point() or not _is_model_path(p) or _is_stats(p) or p in skip:
            continue
        if is_teacher_path(p) == teacher:
            out[p] = t
    return out


def optimizer_state_for(flat: Mapping[str, torch.Tensor], shape: tuple[int, ...],
                        rest: Mapping[str, torch.Tensor]) -> Optional[bool]:
    """Does a saved optimizer hold state (momentum, Adam moments) of the prototypes' shape? None
    when it cannot be told: no optimizer state saved, none with tensors, or another trained tensor
    of the same shape."""
    entries: dict[str, list[tuple[int, ...]]] = {}
    for p, t in flat.items():
        m = re.match(r"^(.*?/state/\d+)/[^/]+$", p)
        if m and not _is_model_path(p) and t.dim() >= 1:
            entries.setdefault(m.group(1), []).append(tuple(t.shape))
    if not entries:
        return None
    if any(tuple(t.shape) == tuple(shape) for t in rest.values()):
        return None
    return any(tuple(shape) in shapes for shapes in entries.values())
