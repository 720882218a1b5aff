"""What ``attach()`` captures of the model's forward passes: the module named by ``capture=``, or
the output found automatically in the first training-mode forward pass (:class:`Discovery`), and
the soft assignments to the prototypes derived from what was captured."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["INPUT", "AUTO_CAPTURE_EVERY", "AUTO_CAPTURE_EVERY_LARGE_K", "auto_capture_every", "parse_capture",
           "prototype_layer", "CaptureChoice", "Discovery", "stack_outputs", "soft_assignments", "EvalCapture",
           "labels_list", "detach_value"]


#: steps between the automatic capture's assignments (above ``full_above`` prototypes: LARGE_K)
AUTO_CAPTURE_EVERY = 5
AUTO_CAPTURE_EVERY_LARGE_K = 20


def auto_capture_every(ctx: Any) -> int:
    """The automatic capture's cadence (the (N, D) x (D, K) product reads all of P, as the
    whole-tensor statistics do, so it is rarer where those are)."""
    large = ctx.prototypes.shape[0] > ctx.proto_stats.full_above
    return AUTO_CAPTURE_EVERY_LARGE_K if large else AUTO_CAPTURE_EVERY


def parse_capture(capture: Any, model: Optional[nn.Module]) -> Optional[tuple[nn.Module, str, Any]]:
    """``capture=`` as (module, the name given, key into its output); None: found automatically, or off."""
    if capture is None or capture is False:
        return None
    if not isinstance(capture, str):
        raise TypeError("capture must be a module name in model (e.g. 'head' or 'head:0'), None (found "
                        f"automatically) or False (off), got {type(capture).__name__}")
    if model is None:
        raise ValueError(f"capture={capture!r} names a module of the model: pass model= too")
    mod_name, _, index = capture.partition(":")
    modules = dict(model.named_modules())
    if mod_name not in modules and hasattr(model, "module") and "module." + mod_name in modules:
        mod_name = "module." + mod_name
    if mod_name not in modules:
        close = difflib.get_close_matches(mod_name, [n for n in modules if n], n=5, cutoff=0.4)
        raise ValueError(f"capture={capture!r}: no module {mod_name!r} in {type(model).__name__}"
                         + (f"; close names: {', '.join(close)}" if close else "")
                         + ". Name the module whose output is the projection (the prototypes' space).")
    key: Any = None
    if index:
        key = int(index) if index.lstrip("-").isdigit() else index
    return modules[mod_name], capture, key


#: capture key meaning "the module's input" (the prototype layer's input is the projection)
INPUT = "<input>"


def _tensors_in(output: Any) -> list[tuple[Any, torch.Tensor]]:
    """(key, tensor) of an output: the tensor itself (key None), or the elements of a tuple/list
    (index) or dict (key), one level deep."""
    if isinstance(output, torch.Tensor):
        return [(None, output)]
    if isinstance(output, (tuple, list)):
        return [(i, t) for i, t in enumerate(output) if isinstance(t, torch.Tensor)]
    if isinstance(output, Mapping):
        return [(k, t) for k, t in output.items() if isinstance(t, torch.Tensor)]
    return []


def _weight_of(module: nn.Module, prototypes: torch.Tensor) -> bool:
    """Whether ``module`` multiplies by the prototypes as its weight: ``nn.Linear``-like
    ``.weight``, the old weight norm's ``weight_v``, or a parametrization's original(s)."""
    from torch.nn.utils import parametrize

    if module._parameters.get("weight") is prototypes or module._parameters.get("weight_v") is prototypes:
        return True
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        return any(getattr(plist, a, None) is prototypes for a in ("original", "original0", "original1"))
    return False


def prototype_layer(model: nn.Module, prototypes: torch.Tensor) -> Optional[tuple[str, nn.Module]]:
    """The layer of ``model`` whose weight is the prototypes (an ``nn.Linear``, a
    weight-normalised ``last_layer``): its input is the projection. None for a bare tensor
    (outside the model, or a parameter used in the loss rather than as a layer's weight)."""
    return next(((n, m) for n, m in model.named_modules() if _weight_of(m, prototypes)), None)


@dataclass
class CaptureChoice:
    """What :class:`Discovery` chose: ``module``'s output (or its input: ``key is INPUT``), under
    ``name``, with the ``chunks`` of it already seen in this step; ``module`` is None when nothing
    qualified. ``message`` is the line that tells the user."""

    message: str
    module: Optional[nn.Module] = None
    name: str = ""
    key: Any = None
    chunks: list = field(default_factory=list)


#: a module whose dotted name holds one of these is part of a head (its output may be the projection)
HEAD_WORDS = ("head", "proj", "predictor", "neck")


def _is_head(name: str) -> bool:
    return any(w in part.lower() for part in name.split(".") for w in HEAD_WORDS)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two detached outputs are views of one tensor with the same layout."""
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device
            and a.data_ptr() == b.data_ptr())


class Discovery:
    """Finds, in the first training step, the output of ``model`` (or of one of its modules) that
    lives in the prototypes' space and returns its choice (:class:`CaptureChoice`); the hub
    installs it (see :func:`attach`, ``capture``). When the choice is made inside a forward hook,
    it is handed to ``on_choice``.

    When: as soon as the layer that holds the prototypes has run (it may run after ``model``'s
    forward returned: a head called outside it, as WeSpeaker's ``DINO`` wrapper calls
    ``s_model.projection_head``); else the hub asks at the end of the step's first backward pass,
    else at the first ``optimizer.step()``: every forward pass of the step has run by then.

    Preference: (1) the input of the layer that holds the prototypes (SwAV's ``prototypes``
    ``nn.Linear``, DINO's ``last_layer``): the projections it multiplies; (2) the output with last
    dimension D (projections) that completed last (the outermost module: the model itself when it
    returns them; in a tuple or dict, the last such element); (3) the same with last dimension K
    (scores). When D == K an output counts as projections (cosine to the prototypes). An output
    that is the very tensor a submodule returned (a head's output passed through) is named after
    that submodule. Modules of ``teacher`` are never candidates. A choice that is none of (1), the
    model's own output or a head's output (a name with ``head``, ``proj``, ...) is a fallback: its
    message says so and how to name the right module."""

    def __init__(self, model: nn.Module, prototypes: torch.Tensor,
                 on_choice: Callable[[CaptureChoice], None], teacher: Optional[nn.Module] = None) -> None:
        self.model, self.on_choice = model, on_choice
        K, D = prototypes.shape
        self.K, self.D = K, D
        layer = prototype_layer(model, prototypes)
        self.layer = layer[1] if layer is not None else None
        self.names = {id(m): n for n, m in model.named_modules()}
        self.skip = ({id(m) for m in teacher.modules()} if isinstance(teacher, nn.Module) and teacher is not model
                     else set())
        self.cands: list[tuple[int, int, str, Any, nn.Module, torch.Tensor]] = []  # (prio, order, name, key, mod, t)
        self.order = 0
        self.done = False
        self.handles: list[Any] = []

    def install(self) -> list[Any]:
        """Put a forward hook on every module of the model; returns the handles."""
        self.handles = [m.register_forward_hook(self._hook) for m in self.model.modules() if id(m) not in self.skip]
        return self.handles

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.done or not module.training:
            return
        self.order += 1
        name = self.names.get(id(module), "?")
        if module is self.layer and args and isinstance(args[0], torch.Tensor) and args[0].shape[-1] == self.D:
            self.cands.append((0, self.order, name, INPUT, module, args[0].detach()))
        for key, t in _tensors_in(output):
            if t.dim() >= 2 and t.is_floating_point() and t.shape[-1] in (self.D, self.K):
                prio = 1 if t.shape[-1] == self.D else 2
                self.cands.append((prio, self.order, name, key, module, t.detach()))
        if module is self.layer:  # the projections it multiplies are there: no need to wait
            self.on_choice(self.choose())

    def choose(self) -> CaptureChoice:
        """Pick the capture (when the prototype layer has run, at the end of the first backward
        pass, or at the first optimizer step); call once (:attr:`done` says whether it was)."""
        self.done = True
        for h in self.handles:
            h.remove()
        self.handles = []
        if not self.cands:
            return CaptureChoice("capture: no output of the model has the prototypes' dim D="
                                 f"{self.D} or K={self.K}: usage and PROTO_COLLAPSE need attach(capture='module') "
                                 "or hub.log_outputs(student_probs=...)")
        prio, _, name, key, module, t = min(self.cands, key=lambda c: (c[0], -c[1]))
        if prio > 0:  # the same tensor returned by a submodule first (a head's output passed through)
            same = [c for c in self.cands if c[0] == prio and c[4] is not module and _same_tensor(c[5], t)
                    and (not name or c[2].startswith(name + "."))]
            if same:
                _, _, name, key, module, t = min(same, key=lambda c: len(c[2]))
        chunks = [c[5] for c in self.cands if c[2] == name and c[3] == key and c[4] is module]
        shape = tuple(chunks[-1].shape)
        label = repr(name or type(self.model).__name__) + (f"[{key!r}]" if key is not None else "")
        kind = "projections (cosine to the prototypes)" if prio < 2 else "scores per prototype"
        if prio == 0:
            message = (f"capture: the input of {name!r}, the layer holding the prototypes, shape {shape}, as the "
                       f"{kind}; attach(capture='module') picks another, capture=False turns this off")
        elif module is self.model or _is_head(name):
            message = (f"capture: the output of {label}, shape {shape}, as the {kind}; "
                       "attach(capture='module') picks another, capture=False turns this off")
        else:
            message = (f"capture: FALLBACK to an inner module: no head output of the model has the prototypes' "
                       f"dim (D={self.D}, K={self.K}), so the output of {label}, shape {shape}, is taken as the "
                       f"{kind}; it may be an activation that only happens to be that wide. Name the module whose "
                       f"output is the projection: {self._suggest()} ('name:i' picks element i of a tuple "
                       "output), or capture=False")
        return CaptureChoice(message, module, name, key, chunks)

    def _suggest(self) -> str:
        """How to name the right module in the fallback message: the model's head-like modules."""
        heads = sorted((n for n, m in self.model.named_modules() if n and _is_head(n) and id(m) not in self.skip),
                       key=lambda n: (n.count("."), len(n)))
        if heads:
            return f"attach(..., capture={heads[0]!r})" + (f" (or {', '.join(map(repr, heads[1:3]))})" if heads[1:] else "")
        return ("attach(..., capture='<module name>'); the head is not a module of model=: pass a model= "
                "that holds it (e.g. an nn.Module holding backbone and head)")


def stack_outputs(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The captured outputs of a step as one float (N, width) tensor; outputs of varying width:
    the last one alone."""
    try:
        return torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).float()
    except RuntimeError:
        return chunks[-1].reshape(-1, chunks[-1].shape[-1]).float()


def soft_assignments(x: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> Optional[torch.Tensor]:
    """(N, K) softmax assignments of (N, D) projections (cosine to the prototypes, as SDPN / SwAV /
    DINO score them) or of (N, K) scores, at ``temperature``; None for another width."""
    K, D = prototypes.shape
    if x.shape[-1] == D:
        p = prototypes.detach()
        p = p if p.dtype == torch.float32 else p.float()
        # x_n . p_k / ||p_k||: the cosines without a normalised (K, D) copy of the prototypes
        scores = nn.functional.normalize(x, dim=-1) @ p.T
        scores.div_(torch.linalg.vector_norm(p, dim=-1).clamp_min(1e-12))
    elif x.shape[-1] == K:
        scores = x
    else:
        return None
    return torch.softmax(scores / temperature, dim=-1)


class EvalCapture:
    """What ``with hub.capture() as cap`` yields: collects the labels of the eval batches."""

    def __init__(self, labels: Optional[Sequence[Any]] = None) -> None:
        self.labels: list[Any] = [] if labels is None else labels_list(labels)

    def add_labels(self, labels: Union[Sequence[Any], torch.Tensor]) -> None:
        """Append the labels of one eval batch (a tensor, an array or a sequence)."""
        self.labels.extend(labels_list(labels))


def labels_list(labels: Any) -> list[Any]:
    """Labels of a tensor, an array or a sequence as a Python list."""
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().tolist()
    if hasattr(labels, "tolist"):
        return list(labels.tolist())
    return list(labels)


def detach_value(v: Any) -> Any:
    """``v`` detached: a tensor, or the tensors of a dict (one level deep or more); anything else as is."""
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, Mapping):
        return {k: detach_value(x) for k, x in v.items()}
    return v
