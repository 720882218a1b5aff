"""The checkpoint check of the health doctor: are the prototypes (and their optimizer state) in it?

One implementation for every loop: the doctor's ``on_save_checkpoint`` / ``on_load_checkpoint``
(the pipeline, the Lightning callback) and ``hub.check_checkpoint`` of ``attach()`` call
:func:`check_checkpoint`, so the same checkpoint gives the same findings through each.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..core.codes import PROTO_NOT_IN_CHECKPOINT, PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT
from ..core.finding import Finding
from ..formats.checkpoints import tensor_paths
from .optimizer_lookup import locate, same_storage

__all__ = ["find_prototypes_in_checkpoint", "prototype_optimizer_state_in_checkpoint", "check_checkpoint"]


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
            if same_storage(t, p):
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
    return [path for path, t in tensor_paths(checkpoint) if match(t)]


def _proto_like_paths(checkpoint: Any, prototypes: torch.Tensor, name: Optional[str] = None) -> list[str]:
    """Paths of tensors with the prototypes' shape whose key mentions "proto" or ends with the
    watched tensor's own name (``head.last_layer.weight_v``, ``...parametrizations.weight.original1``)."""
    tails = {name, name.removeprefix("module.")} if name and name != "prototypes" else set()

    def named(path: str) -> bool:
        return "proto" in path.lower() or any(path.endswith(t) for t in tails if t)

    return [path for path, t in tensor_paths(checkpoint) if t.shape == prototypes.shape and named(path)]


def prototype_optimizer_state_in_checkpoint(checkpoint: Any, prototypes: torch.Tensor, optimizer: Any) -> bool:
    """True when ``checkpoint`` holds an optimizer state_dict (a mapping with ``state`` and
    ``param_groups``) whose param groups list the prototypes' position in ``optimizer`` and
    whose state for that position holds a tensor of the prototypes' shape (momentum_buffer,
    exp_avg, ...). When the live optimizer keeps no tensor state for the prototypes (plain
    SGD), being listed in the saved param groups is enough. False when the prototypes are not
    in ``optimizer``."""
    where = locate(optimizer, prototypes) if optimizer is not None else None
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
                     name: Optional[str] = None, optimizer: Any = None) -> list[Finding]:
    """Findings about a checkpoint dict: [] when it holds the prototypes (and, with ``optimizer``,
    their optimizer state). ``loaded=True`` words the message for a checkpoint that was just
    resumed from (the prototypes must then equal the saved ones): a tensor of their shape saved
    under a prototype name (``*proto*``, or the watched tensor's ``name``) that differs from them
    was "not restored". With the live ``optimizer`` holding the prototypes, a checkpoint that holds
    them but not their optimizer state gives PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT (warning)."""
    keys = find_prototypes_in_checkpoint(checkpoint, prototypes)
    if keys:
        return _optimizer_state_findings(checkpoint, prototypes, optimizer, keys, step)
    return [_missing(checkpoint, prototypes, step, loaded, name)]


def _optimizer_state_findings(checkpoint: Any, prototypes: torch.Tensor, optimizer: Any, keys: list[str],
                              step: int) -> list[Finding]:
    """PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT when the prototypes (at ``keys``) are saved, the
    optimizer holds them, and their optimizer state is not saved."""
    if optimizer is None or locate(optimizer, prototypes) is None \
            or prototype_optimizer_state_in_checkpoint(checkpoint, prototypes, optimizer):
        return []
    return [Finding(PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT, "warning", step, (
        f"the prototypes are in the checkpoint (at {', '.join(keys[:3])}) but their "
        "optimizer state is not: a resumed run restarts their momentum / Adam moments. "
        "Save the optimizer too: checkpoint['optimizer'] = optimizer.state_dict()."
    ))]


def _missing(checkpoint: Any, prototypes: torch.Tensor, step: int, loaded: bool, name: Optional[str]) -> Finding:
    """PROTO_NOT_IN_CHECKPOINT, worded for a save, a resume without them, or a resume that did not restore them."""
    candidates = _proto_like_paths(checkpoint, prototypes, name)
    if loaded and candidates:
        return Finding(PROTO_NOT_IN_CHECKPOINT, "warning", step, (
            f"the checkpoint holds prototypes at {candidates[0]!r} but the current prototypes "
            "differ from them after the resume: they were not restored. Restore them: "
            f"prototypes.data.copy_(checkpoint{''.join(f'[{k!r}]' for k in candidates[0].split('/'))})."
        ))
    if loaded:
        return Finding(PROTO_NOT_IN_CHECKPOINT, "error", step, (
            "resumed from a checkpoint without prototypes: they restart from random while the "
            "rest of the model is trained. Save them when writing checkpoints: "
            "checkpoint['prototypes'] = prototypes, and restore them on resume: "
            "prototypes.data.copy_(checkpoint['prototypes'])."
        ))
    return Finding(PROTO_NOT_IN_CHECKPOINT, "error", step, (
        f"the checkpoint does not contain the prototypes {tuple(prototypes.shape)}: a resumed run "
        "would restart them from random. Save them: checkpoint['prototypes'] = prototypes (or "
        "make them an nn.Parameter of a module whose state_dict is saved), and restore them on "
        "resume: prototypes.data.copy_(checkpoint['prototypes'])."
    ))
