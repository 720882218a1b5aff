"""Resolving what ``attach()`` is pointed at: the prototypes (a tensor, a prototype layer, or a
dotted name in the model) and the EMA teacher (a module, or its attribute path in the model)."""
from __future__ import annotations

import difflib
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = ["resolve_prototypes", "resolve_teacher"]


def _module_weight(module: nn.Module, name: str) -> tuple[torch.Tensor, str]:
    """The trained (K, D) tensor of a prototype layer.

    ``nn.Linear(D, K)`` -> ``.weight``. A weight-normalised layer (DINO's ``last_layer``) computes
    its weight from a magnitude g and a direction v; the direction is what is trained (g is often
    frozen at 1), so the watched tensor is v: ``parametrizations.weight.original1`` for
    ``torch.nn.utils.parametrizations.weight_norm``, ``weight_v`` for the older
    ``torch.nn.utils.weight_norm``, ``parametrizations.weight.original`` for other parametrizations.
    """
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        for attr in ("original1", "original"):
            if hasattr(plist, attr):
                return getattr(plist, attr), f"{name}.parametrizations.weight.{attr}"
    v = getattr(module, "weight_v", None)
    if isinstance(v, torch.Tensor):
        return v, f"{name}.weight_v"
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return w, f"{name}.weight"
    raise TypeError(
        f"prototypes: module {name!r} ({type(module).__name__}) has no weight tensor; pass the "
        "(num_proto, dim) tensor itself or a module whose .weight holds the prototypes (nn.Linear)"
    )


def _candidate_names(model: nn.Module) -> list[str]:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules() if n]
    for mod_name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                names.append(f"{mod_name}.{attr}" if mod_name else attr)
    return sorted(set(names))


def _lookup(model: nn.Module, name: str) -> tuple[Any, str]:
    tries = [name]
    if name.startswith("module.") and not hasattr(model, "module"):
        tries.append(name[len("module."):])
    if hasattr(model, "module") and not name.startswith("module."):
        tries.append("module." + name)  # DDP / DataParallel wrappers
    for n in tries:
        obj: Any = model
        parent: Any = None
        ok = True
        for part in n.split("."):
            parent = obj
            try:
                obj = getattr(obj, part)
            except AttributeError:
                ok = False
                break
        if not ok:
            continue
        # "last_layer.weight" of a weight-normalised layer: watch the trained direction v
        if n.split(".")[-1] == "weight" and isinstance(parent, nn.Module) and not isinstance(obj, nn.Parameter):
            return _module_weight(parent, n.rsplit(".", 1)[0])
        return obj, n
    close = difflib.get_close_matches(name, _candidate_names(model), n=5, cutoff=0.4)
    two_d = [n for n, p in model.named_parameters() if p.dim() == 2][:10]
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"prototypes={name!r} was not found in {type(model).__name__}.{hint} "
        f"2-D parameters of the model: {', '.join(two_d) or 'none'}. Pass a dotted attribute path "
        "(e.g. 'head.prototypes' or 'last_layer'), or the tensor itself."
    )


def resolve_prototypes(prototypes: Union[torch.Tensor, nn.Module, str],
                       model: Optional[nn.Module] = None) -> tuple[torch.Tensor, str]:
    """Return the watched (K, D) tensor and a name for it. See :func:`attach` for what is accepted."""
    if isinstance(prototypes, str):
        if model is None:
            raise ValueError(
                f"prototypes={prototypes!r} is a name, but no model was given to resolve it in: "
                "pass model=<the nn.Module holding it>, or pass the tensor itself"
            )
        obj, name = _lookup(model, prototypes)
    elif isinstance(prototypes, (torch.Tensor, nn.Module)):
        obj, name = prototypes, "prototypes"
        if model is not None and isinstance(prototypes, torch.Tensor):
            name = next((n for n, p in model.named_parameters() if p is prototypes), name)
        elif model is not None:
            name = next((n for n, m in model.named_modules() if m is prototypes and n), name)
    else:
        raise TypeError(
            f"prototypes must be a (num_proto, dim) tensor, an nn.Module holding them (e.g. the "
            f"nn.Linear(dim, num_proto) prototype layer), or a dotted name resolved in model=; "
            f"got {type(prototypes).__name__}"
        )
    if isinstance(obj, nn.Module):
        obj, name = _module_weight(obj, name)
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"prototypes {name!r} resolves to a {type(obj).__name__}, not a tensor; "
                        "point at the (num_proto, dim) tensor or its layer")
    if obj.dim() != 2:
        raise ValueError(f"prototypes must be a (num_proto, dim) tensor, got shape {tuple(obj.shape)} "
                         f"for {name!r}")
    return obj, name


def resolve_teacher(teacher: Any, model: Optional[nn.Module]) -> Optional[nn.Module]:
    """``teacher=``: a module, or a dotted attribute path in ``model`` (the Lightning callback:
    ``teacher="teacher"`` in the LightningModule)."""
    if teacher is None or isinstance(teacher, nn.Module):
        return teacher
    if isinstance(teacher, str):
        if model is None:
            raise ValueError(f"teacher={teacher!r} is a name, but no model was given to resolve it in: "
                             "pass model=, or the teacher module itself")
        obj: Any = model
        for part in teacher.split("."):
            if not hasattr(obj, part):
                close = difflib.get_close_matches(teacher, [n for n, _ in model.named_modules() if n], n=3, cutoff=0.4)
                raise ValueError(f"teacher={teacher!r} was not found in {type(model).__name__}"
                                 + (f"; close names: {', '.join(close)}" if close else "")
                                 + ". Pass the attribute path of the EMA teacher module, or the module itself.")
            obj = getattr(obj, part)
        if isinstance(obj, nn.Module):
            return obj
        raise TypeError(f"teacher={teacher!r} resolves to a {type(obj).__name__}, not an nn.Module")
    raise TypeError(f"teacher must be the EMA teacher nn.Module (or its attribute path in model), got "
                    f"{type(teacher).__name__}")

