"""Attach the monitors to any PyTorch training loop with one line; the loop itself stays as it is.

    hub = attach(optimizer, prototypes, model=model)     # the one line
    for batch in loader:                                 # unchanged
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
    hub.close()                                          # flush, finish the W&B run

The events of :mod:`monitors.events` come from PyTorch's own hooks:

========================== ===========================================================================
event                      derived from
========================== ===========================================================================
on_train_start             ``attach()`` itself, after resolving the prototypes: the static checks of the
                           health doctor (leaf, requires_grad, optimizer membership, lr) report at once.
on_after_backward          ``prototypes.register_post_accumulate_grad_hook``: at the end of the backward
                           pass (queued on the autograd engine, so every gradient is there), once per
                           optimizer step: at the ``accumulate_grad_batches``-th backward (default 1).
                           If it did not fire (no gradient, non-leaf prototypes, fewer backward passes),
                           ``optimizer.step()`` emits it first.
on_before_optimizer_step   ``optimizer.register_step_pre_hook``: after the loop's own clipping.
on_after_optimizer_step    ``optimizer.register_step_post_hook``, then ``on_step_end`` with the
on_step_end                :class:`StepOutputs` that could be captured; then ``ctx.step += 1``.
on_embeddings              ``hub.log_embeddings(...)`` or the end of a ``with hub.capture(...):`` block.
on_save_checkpoint         ``hub.check_checkpoint(checkpoint)``.
on_train_end               ``hub.close()``.
========================== ===========================================================================

Step outputs in a foreign loop: ``schedules`` holds ``lr`` and ``wd`` of the prototypes' param
group (logged as ``train/lr``, ``train/wd``). With ``capture="module"`` (a module of ``model``
whose output is the projection, (N, D), or per-prototype scores, (N, K); ``"module:i"`` picks
``output[i]``), its training-mode outputs of the step become ``projections`` and
``student_probs = softmax(cos(z, prototypes) / assign_temperature)`` (scores: ``softmax(s / T)``),
which the usage monitor and the collapse check read; in a ``with hub.capture():`` block its
outputs become the embeddings of ``on_embeddings``. Anything else (loss, teacher targets,
labels) can be handed over with ``hub.log_outputs(...)`` before ``optimizer.step()``.

Limits of a foreign loop: the loss is not visible unless handed over; an optimizer whose ``step(closure)`` runs the backward inside ``step()`` (LBFGS, Lightning's
automatic optimization: use the Lightning callback there) sees ``on_before_optimizer_step`` before
the backward. A skipped step (``GradScaler`` on inf) emits nothing and does not count.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .events import RunContext, StepOutputs
from .finding import Finding
from .hub import MonitorHub, _print_console
from .registry import REGISTRY, MonitorSpec, build_monitors
from .shared import assignment_rows

#: warning raised by :meth:`AttachedHub.check_checkpoint` when the prototypes are in a checkpoint
#: but their optimizer state (momentum buffers, Adam moments) is not
PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT = "PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT"

#: ``attach(**options)`` besides the per-monitor dicts ``<monitor>=dict(...)``, with their defaults
OPTIONS: dict[str, Any] = {
    "log_every": 10,               # optimizer steps between two writes to the sinks
    "stop_on_error": False,        # set hub.should_stop on an error finding (the loop checks it)
    "exp_dir": None,               # local records in exp_dir/records; W&B run dir under exp_dir
    "dir": None,                   # W&B directory (default: exp_dir, else the current directory)
    "freeze_steps": 0,             # steps during which frozen prototypes are intended (lr-0 warm-up)
    "capture": None,               # "module.name" / "module.name:i" in model; None: found automatically; False: off
    "accumulate_grad_batches": 1,  # backward passes per optimizer step
    "assign_temperature": 0.1,     # softmax temperature of the assignments derived from `capture`
    "capture_every": None,         # derive them every n steps (None: 1 with capture="name", 5 when found automatically)
    "full_every": 4,               # above 16,384 prototypes: whole-(K, D) statistics every n steps (monitors.shared)
    "sinks": (),                   # extra sinks (objects with log_rows/set_summary/alert/close)
    "console": True,               # print findings to stderr (False: silent; or a callable(str))
    "teacher": None,               # the EMA teacher, if any (ctx.teacher)
    "config": None,                # run config: ctx.config and the W&B run config
    "project": "protowatch",       # W&B project of the run opened when run=None
    "run_name": None,              # W&B run name of the run opened when run=None
    "param_groups": None,          # {name: [params]} the gradient monitor reports besides
}

_STEP_FIELDS = set(StepOutputs.__dataclass_fields__)


# -- resolving the prototypes ---------------------------------------------------------------------
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


def _parse_capture(capture: Any, model: Optional[nn.Module]) -> Optional[tuple[nn.Module, str, Any]]:
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


# -- automatic capture ----------------------------------------------------------------------------
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


class _Discovery:
    """Finds, in the first training-mode forward pass of ``model``, the output that lives in the
    prototypes' space, then hands the choice to the hub (see :func:`attach`, ``capture``).

    Preference: (1) the input of the layer that holds the prototypes (SwAV's ``prototypes``
    ``nn.Linear``, DINO's ``last_layer``): the projections it multiplies; (2) the output with last
    dimension D (projections) that completed last (the outermost module: the model itself when it
    returns them; in a tuple or dict, the last such element); (3) the same with last dimension K
    (scores). When D == K an output counts as projections (cosine to the prototypes)."""

    def __init__(self, hub: "AttachedHub", model: nn.Module) -> None:
        self.hub, self.model = hub, model
        K, D = hub.ctx.prototypes.shape
        self.K, self.D = K, D
        layer = prototype_layer(model, hub.ctx.prototypes)
        self.layer = layer[1] if layer is not None else None
        self.names = {id(m): n for n, m in model.named_modules()}
        self.cands: list[tuple[int, int, str, Any, nn.Module, torch.Tensor]] = []  # (prio, order, name, key, mod, t)
        self.order = 0
        self.done = False
        self.handles: list[Any] = []

    def install(self) -> list[Any]:
        self.handles = [m.register_forward_hook(self._hook) for m in self.model.modules()]
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
        if module is self.model:
            self.choose()

    def choose(self) -> None:
        """Pick the capture (at the model's first forward, or at the first optimizer step)."""
        if self.done:
            return
        self.done = True
        for h in self.handles:
            h.remove()
        self.handles = []
        hub = self.hub
        if not self.cands:
            hub._say_capture("capture: no output of the model has the prototypes' dim D="
                             f"{self.D} or K={self.K}: usage and PROTO_COLLAPSE need attach(capture='module') "
                             "or hub.log_outputs(student_probs=...)")
            return
        prio, _, name, key, module, _ = min(self.cands, key=lambda c: (c[0], -c[1]))
        chunks = [c[5] for c in self.cands if c[2] == name and c[3] == key and c[4] is module]
        hub._set_capture(module, name, key, chunks if hub.ctx.step % hub.capture_every == 0 else [])
        shape = tuple(chunks[-1].shape)
        what = {0: f"the input of {name!r}, the layer holding the prototypes",
                1: f"the output of {name or type(self.model).__name__!r}" + (f"[{key!r}]" if key is not None else ""),
                2: f"the output of {name or type(self.model).__name__!r}" + (f"[{key!r}]" if key is not None else "")}[prio]
        kind = "projections (cosine to the prototypes)" if prio < 2 else "scores per prototype"
        hub._say_capture(f"capture: {what}, shape {shape}, as the {kind}; attach(capture='module') picks "
                         "another, capture=False turns this off")


# -- the hub ------------------------------------------------------------------------------------
class AttachedHub(MonitorHub):
    """A :class:`MonitorHub` that drives its own events from hooks on a foreign loop.

    Adds to the hub: :meth:`detach`, :meth:`log_embeddings`, :meth:`capture`,
    :meth:`log_outputs`, :meth:`check_checkpoint`, and ``step`` in :meth:`state_dict`.
    Integrations without PyTorch hooks (the Lightning callback) call :meth:`notify_backward`,
    :meth:`notify_before_step` and :meth:`notify_after_step` themselves.
    """

    def __init__(self, ctx: RunContext, monitors: Sequence[Any] = (), sinks: Sequence[Any] = (), *,
                 log_every: int = 10, stop_on_error: bool = False,
                 console: Optional[Callable[[str], None]] = _print_console,
                 capture: Optional[tuple[nn.Module, str, Any]] = None,
                 accumulate_grad_batches: int = 1, assign_temperature: float = 0.1,
                 install_hooks: bool = True, auto_capture: bool = False,
                 capture_every: Optional[int] = None) -> None:
        super().__init__(monitors, sinks, log_every=log_every, stop_on_error=stop_on_error, console=console)
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be an integer >= 1, got {accumulate_grad_batches!r}")
        if not assign_temperature > 0:
            raise ValueError(f"assign_temperature must be > 0, got {assign_temperature!r}")
        if capture_every is None:
            capture_every = 5 if auto_capture and capture is None else 1
        if isinstance(capture_every, bool) or not isinstance(capture_every, int) or capture_every < 1:
            raise ValueError(f"capture_every must be an integer >= 1, got {capture_every!r}")
        self.capture_every = capture_every
        self.ctx = ctx
        self.accumulate_grad_batches = accumulate_grad_batches
        self.assign_temperature = float(assign_temperature)
        self._capture = capture
        self._handles: list[Any] = []
        self._n_backward = 0              # backward passes since the last optimizer step
        self._backward_emitted = False    # on_after_backward emitted for the current step
        self._step_chunks: list[torch.Tensor] = []   # captured training-mode outputs of this step
        self._eval_chunks: Optional[list[torch.Tensor]] = None  # inside `with hub.capture()`
        self._explicit: dict[str, Any] = {}          # hub.log_outputs(...) for this step
        self._assign: Optional[torch.Tensor] = None  # (N, K) derived at the pre-step hook
        self._group_index: Optional[int] = None
        self._started = False
        self._discovery: Optional[_Discovery] = (
            _Discovery(self, ctx.model) if auto_capture and capture is None and isinstance(ctx.model, nn.Module) else None)
        self._install_hooks(optimizer_hooks=install_hooks)

    def _say_capture(self, line: str) -> None:
        if self.console is not None and self.ctx.is_main_process:
            self.console(line)

    def _set_capture(self, module: nn.Module, name: str, key: Any, chunks: list[torch.Tensor]) -> None:
        """Capture ``module``'s output (or input: ``key == INPUT``) from now on; ``chunks`` are its
        outputs already seen in this step."""
        self._capture = (module, name if key is None else f"{name}:{key}", key)
        self._handles.append(module.register_forward_hook(self._on_forward))
        if self._eval_chunks is None:
            self._step_chunks.extend(chunks[:64])

    # -- hooks ------------------------------------------------------------------------------
    def _install_hooks(self, optimizer_hooks: bool = True) -> None:
        ctx = self.ctx
        p = ctx.prototypes
        if optimizer_hooks:
            if p.is_leaf and p.requires_grad:  # otherwise the pre-step hook emits on_after_backward
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
            if ctx.optimizer is not None:
                self._handles.append(ctx.optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.notify_before_step()))
                self._handles.append(ctx.optimizer.register_step_post_hook(lambda opt, args, kwargs: self.notify_after_step()))
        if self._capture is not None:
            self._handles.append(self._capture[0].register_forward_hook(self._on_forward))
        elif self._discovery is not None and not self._discovery.done:
            self._handles.extend(self._discovery.install())

    def _on_grad(self, param: torch.Tensor) -> None:
        # runs inside backward: the other gradients are not accumulated yet, so wait for the end
        queue = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "queue_callback", None)
        if queue is not None:
            queue(self.notify_backward)
        else:  # pragma: no cover - older engines
            self.notify_backward()

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        key = self._capture[2] if self._capture is not None else None
        out = output
        if key == INPUT:  # the prototype layer's input: the projections
            out = args[0] if args else None
        elif key is not None:  # "name:i" / "name:key" picks from a tuple, list or dict output
            try:
                out = output[key] if isinstance(output, (tuple, list, Mapping)) else None
            except (IndexError, KeyError):
                out = None
        if not isinstance(out, torch.Tensor):
            return
        out = out.detach()
        if self._eval_chunks is not None:
            self._eval_chunks.append(out)
        elif module.training and len(self._step_chunks) < 64 and self.ctx.step % self.capture_every == 0:
            self._step_chunks.append(out)

    # -- driving the events ------------------------------------------------------------------
    def start(self) -> None:
        """Emit ``on_train_start`` (once): the static checks report now."""
        if not self._started:
            self._started = True
            self.emit("on_train_start", self.ctx)

    def notify_backward(self) -> None:
        """A backward pass finished: emit ``on_after_backward`` at the accumulation boundary."""
        self._n_backward += 1
        if not self._backward_emitted and self._n_backward >= self.accumulate_grad_batches:
            self._backward_emitted = True
            self.emit("on_after_backward", self.ctx)

    def notify_before_step(self) -> None:
        """Right before ``optimizer.step()``: parameters still old, gradients final."""
        if not self._backward_emitted:
            self._backward_emitted = True
            self.emit("on_after_backward", self.ctx)
        if self._discovery is not None and not self._discovery.done:
            self._discovery.choose()  # the model itself was never called: choose from what ran
        self._assign = self._derive_assignments()
        self.emit("on_before_optimizer_step", self.ctx)

    def notify_after_step(self, outputs: Optional[Mapping[str, Any]] = None) -> None:
        """Right after ``optimizer.step()``: emit ``on_after_optimizer_step`` and ``on_step_end``
        with the step outputs (``outputs`` as a dict of StepOutputs fields, plus what was captured
        and given to :meth:`log_outputs`), then advance ``ctx.step``."""
        ctx = self.ctx
        self.emit("on_after_optimizer_step", ctx)
        out = ctx.outputs = self._step_outputs(outputs)
        self.log(_train_values(out), step=ctx.step)
        self.emit("on_step_end", ctx)
        ctx.step += 1
        self._n_backward = 0
        self._backward_emitted = False
        self._step_chunks = []
        self._explicit = {}
        self._assign = None

    # -- step outputs -----------------------------------------------------------------------
    def log_outputs(self, **fields: Any) -> None:
        """Hand step outputs to the monitors (optional): any :class:`StepOutputs` field, e.g.
        ``hub.log_outputs(loss=loss, student_probs=p, teacher_targets=t, labels=y)``. Tensors are
        detached; they go into the ``StepOutputs`` of the current step: call before
        ``optimizer.step()`` (its post-hook ends the step)."""
        bad = set(fields) - _STEP_FIELDS
        if bad:
            raise ValueError(f"log_outputs: unknown fields {sorted(bad)}; valid: {', '.join(sorted(_STEP_FIELDS))}")
        for k, v in fields.items():
            self._explicit[k] = _detach(v)

    def _derive_assignments(self) -> Optional[torch.Tensor]:
        """(N, K) soft assignments of the captured outputs to the (current) prototypes, on the device."""
        if not self._step_chunks or "student_probs" in self._explicit:
            return None
        try:
            x = torch.cat([c.reshape(-1, c.shape[-1]) for c in self._step_chunks]).float()
        except RuntimeError:  # outputs of varying width: keep the last
            x = self._step_chunks[-1].reshape(-1, self._step_chunks[-1].shape[-1]).float()
        K, D = self.ctx.prototypes.shape
        if x.shape[-1] == D:
            self._explicit.setdefault("projections", x)
        rows = assignment_rows(K)
        if x.shape[0] > rows:  # large K: the first rows only (a batch's rows are random samples)
            x = x[:rows]
            self.log({"proto/usage/sampled": float(rows)}, step=self.ctx.step)
        if x.shape[-1] == D:  # projections: cosine to the prototypes, as SDPN / SwAV / DINO score them
            p = self.ctx.prototypes.detach()
            p = p if p.dtype == torch.float32 else p.float()
            # x_n . p_k / ||p_k||: the cosines without a normalised (K, D) copy of the prototypes
            scores = nn.functional.normalize(x, dim=-1) @ p.T
            scores.div_(torch.linalg.vector_norm(p, dim=-1).clamp_min(1e-12))
        elif x.shape[-1] == K:  # scores (logits) per prototype
            scores = x
        else:
            return None
        return torch.softmax(scores / self.assign_temperature, dim=-1)

    def _schedules(self) -> dict[str, float]:
        opt = self.ctx.optimizer
        if opt is None:
            return {}
        groups = opt.param_groups
        i = self._group_index
        if i is None or i >= len(groups) or not any(p is self.ctx.prototypes for p in groups[i]["params"]):
            i = next((j for j, g in enumerate(groups) if any(p is self.ctx.prototypes for p in g["params"])), None)
            self._group_index = i
        if i is None:
            return {}
        g = groups[i]
        out = {}
        for key, name in (("lr", "lr"), ("weight_decay", "wd")):
            if isinstance(g.get(key), (int, float)):
                out[name] = float(g[key])
        return out

    def _step_outputs(self, outputs: Optional[Mapping[str, Any]]) -> StepOutputs:
        fields: dict[str, Any] = {}
        if self._assign is None and self._step_chunks:  # captured after the pre-step hook
            self._assign = self._derive_assignments()
        if self._assign is not None:
            fields["student_probs"] = self._assign
        fields.update(self._explicit)
        if outputs:
            fields.update({k: _detach(v) for k, v in outputs.items() if k in _STEP_FIELDS})
        fields["schedules"] = {**self._schedules(), **dict(fields.get("schedules") or {})}
        return StepOutputs(**fields)

    # -- embeddings -------------------------------------------------------------------------
    def log_embeddings(self, embeddings: torch.Tensor, labels: Optional[Sequence[Any]] = None,
                       step: Optional[int] = None) -> None:
        """Emit ``on_embeddings`` with (N, D) embeddings in the prototypes' space (the head
        output) and their N labels (t-SNE of prototypes vs embeddings)."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("log_embeddings: embeddings must be an (N, dim) tensor, got "
                             f"{tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__}")
        D = self.ctx.prototypes.shape[1]
        if embeddings.shape[1] != D:
            raise ValueError(f"log_embeddings: embeddings have dim {embeddings.shape[1]} but the prototypes "
                             f"have dim {D}; pass the head outputs (the prototypes' space), not the backbone's")
        if labels is not None and len(labels) != embeddings.shape[0]:
            raise ValueError(f"log_embeddings: {embeddings.shape[0]} embeddings but {len(labels)} labels")
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().tolist()
        ctx = self.ctx
        saved = ctx.step
        if step is not None:
            ctx.step = int(step)
        ctx.embeddings, ctx.labels = embeddings.detach(), (list(labels) if labels is not None else None)
        try:
            self.emit("on_embeddings", ctx)
        finally:
            ctx.embeddings, ctx.labels, ctx.step = None, None, saved

    @contextlib.contextmanager
    def capture(self, labels: Optional[Sequence[Any]] = None) -> Iterator["_Capture"]:
        """Collect the outputs of the ``capture=`` module during an eval loop, then emit
        ``on_embeddings`` at the end of the block::

            with hub.capture() as cap:
                for x, y in val_loader:
                    model(x); cap.add_labels(y)

        Labels may instead be given at once: ``hub.capture(labels=all_labels)``.
        """
        if self._capture is None:
            raise ValueError("hub.capture() needs attach(..., capture='<module name>'): the module whose "
                             "output is the projection (found automatically at the first training step when "
                             "model= is given); or call hub.log_embeddings(embeddings, labels)")
        cap = _Capture(labels)
        self._eval_chunks = []
        try:
            yield cap
            chunks = self._eval_chunks
        finally:
            self._eval_chunks = None
        if chunks:
            emb = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks])
            lab = cap.labels if cap.labels else None
            if lab is not None and len(lab) != emb.shape[0]:
                raise ValueError(f"hub.capture: {emb.shape[0]} outputs were captured but {len(lab)} labels given")
            self.log_embeddings(emb, lab)

    # -- checkpoints ------------------------------------------------------------------------
    def check_checkpoint(self, checkpoint: Union[Mapping[str, Any], str, os.PathLike],
                         resumed: bool = False) -> list[Finding]:
        """Check that a checkpoint (a dict, or a path loaded on the CPU) holds the current
        prototypes (``PROTO_NOT_IN_CHECKPOINT``, error) and their optimizer state
        (``PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT``, warning). Emits ``on_save_checkpoint``.
        ``resumed=True``: the run was just resumed from it: emits ``on_load_checkpoint``, and a
        prototype tensor there that differs from the live one is reported as "not restored"
        (warning) rather than missing. Returns the findings about this checkpoint (also when
        already reported earlier)."""
        from .health import check_checkpoint, find_prototypes_in_checkpoint, prototype_optimizer_state_in_checkpoint

        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, Mapping):
            raise TypeError(f"check_checkpoint expects a dict or a path, got {type(checkpoint).__name__}")
        ctx = self.ctx
        n_before = len(self.findings)
        if not self._closed:  # after close() the answer is still given, nothing is written
            ctx.checkpoint = checkpoint  # type: ignore[assignment]
            try:
                self.emit("on_load_checkpoint" if resumed else "on_save_checkpoint", ctx)
            finally:
                ctx.checkpoint = None
        found = list(self.findings[n_before:])
        # the doctor's own check again: its finding is reported once per run, the answer is per call
        mine: list[Finding] = list(check_checkpoint(checkpoint, ctx.prototypes, step=ctx.step, loaded=resumed,
                                                    name=ctx.extra.get("prototypes_name")))
        keys = [] if mine else find_prototypes_in_checkpoint(checkpoint, ctx.prototypes)
        if keys and ctx.optimizer is not None and _in_optimizer(ctx.prototypes, ctx.optimizer) \
                and not prototype_optimizer_state_in_checkpoint(checkpoint, ctx.prototypes, ctx.optimizer):
            mine.append(Finding(PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT, "warning", ctx.step,
                                f"the prototypes are in the checkpoint (at {', '.join(keys[:3])}) but their "
                                "optimizer state is not: a resumed run restarts their momentum / Adam moments. "
                                "Save the optimizer too: checkpoint['optimizer'] = optimizer.state_dict()."))
        for f in mine:
            if not self._closed:
                self.report(f)
            if all(g.code != f.code for g in found):
                found.append(f)
        return found

    # -- state and end ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["step"] = int(self.ctx.step)
        state["epoch"] = int(self.ctx.epoch)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.ctx.step = int(state.get("step", self.ctx.step))
        self.ctx.epoch = int(state.get("epoch", self.ctx.epoch))

    def detach(self) -> None:
        """Remove every hook: after this, the loop emits nothing."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._discovery is not None:
            self._discovery.handles = []

    def reattach(self) -> None:
        """Install the hooks again after :meth:`detach` (e.g. to watch only part of a run)."""
        if self._closed:
            raise RuntimeError("this hub is closed: call attach() again for a new one")
        if not self._handles:
            self._install_hooks()

    def close(self) -> None:
        """Detach, emit ``on_train_end``, flush, finish background work, close the sinks."""
        if self._closed:
            return
        self.detach()
        self.emit("on_train_end", self.ctx)
        super().close()


class _Capture:
    """What ``with hub.capture() as cap`` yields: collects the labels of the eval batches."""

    def __init__(self, labels: Optional[Sequence[Any]] = None) -> None:
        self.labels: list[Any] = [] if labels is None else _as_list(labels)

    def add_labels(self, labels: Union[Sequence[Any], torch.Tensor]) -> None:
        self.labels.extend(_as_list(labels))


def _as_list(labels: Any) -> list[Any]:
    """Labels of a tensor, an array or a sequence as a Python list."""
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().tolist()
    if hasattr(labels, "tolist"):
        return list(labels.tolist())
    return list(labels)


def _train_values(out: StepOutputs) -> dict[str, Any]:
    """``train/loss``, ``train/<term>``, ``train/lr``, ``train/wd``: what the loop made visible
    (0-dim tensors stay on the device until the log interval)."""
    values: dict[str, Any] = {}
    if isinstance(out.loss, torch.Tensor) and out.loss.numel() == 1:
        values["train/loss"] = out.loss.reshape(())
    for k, v in {**dict(out.terms or {}), **dict(out.schedules or {})}.items():
        if (isinstance(v, torch.Tensor) and v.numel() == 1) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            values[f"train/{k}"] = v.reshape(()) if isinstance(v, torch.Tensor) else float(v)
    return values


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, Mapping):
        return {k: _detach(x) for k, x in v.items()}
    return v


def _in_optimizer(p: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    return any(q is p for g in optimizer.param_groups for q in g["params"])


# -- building ---------------------------------------------------------------------------------
def split_options(options: Mapping[str, Any], extra_valid: Sequence[str] = ()) -> tuple[dict, dict]:
    """Split ``**options`` into hub options and per-monitor dicts; an unknown key is an error."""
    hub_opts = dict(OPTIONS)
    overrides: dict[str, dict] = {}
    for key, value in options.items():
        if key in REGISTRY:
            if not isinstance(value, Mapping):
                raise TypeError(f"option {key}= configures the {key!r} monitor: pass a dict of its options, "
                                f"e.g. {key}={{'every_n_steps': 50}}; got {type(value).__name__}")
            overrides[key] = dict(value)
        elif key in OPTIONS or key in extra_valid:
            hub_opts[key] = value
        else:
            valid = sorted(set(OPTIONS) | set(extra_valid)) + [f"{n}=dict(...)" for n in REGISTRY]
            close = difflib.get_close_matches(key, list(OPTIONS) + list(REGISTRY), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown option {key!r}{hint}; valid options: {', '.join(valid)}")
    return hub_opts, overrides


def _resolve_teacher(teacher: Any, model: Optional[nn.Module]) -> Optional[nn.Module]:
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


def _dist_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_hub(optimizer: Optional[torch.optim.Optimizer], prototypes: Any, *, model: Optional[nn.Module] = None,
              run: Any = None, monitors: MonitorSpec = "default", rank: Optional[int] = None,
              world_size: Optional[int] = None, install_hooks: bool = True,
              wandb_dir: Optional[str] = None, options: Optional[Mapping[str, Any]] = None) -> AttachedHub:
    """Shared by :func:`attach` and the Lightning callback: resolve, build monitors and sinks,
    return an :class:`AttachedHub` (``on_train_start`` not emitted yet)."""
    hub_opts, overrides = split_options(options or {})
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (or None), got {type(model).__name__}")
    tensor, name = resolve_prototypes(prototypes, model)
    capture = _parse_capture(hub_opts["capture"], model)
    if rank is None or world_size is None:
        r, w = _dist_rank()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    exp_dir = hub_opts["exp_dir"]
    config = dict(hub_opts["config"] or {})
    teacher = _resolve_teacher(hub_opts["teacher"], model)
    freeze_steps = hub_opts["freeze_steps"]
    if isinstance(freeze_steps, bool) or not isinstance(freeze_steps, int) or freeze_steps < 0:
        raise ValueError(f"freeze_steps must be an integer >= 0 (the steps of an intended freeze of the "
                         f"prototypes, e.g. freeze_last_layer epochs x steps per epoch), got {freeze_steps!r}")
    ctx = RunContext(
        prototypes=tensor, optimizer=optimizer, model=model, teacher=teacher, config=config,
        rank=rank, world_size=world_size, freeze_steps=freeze_steps,
        param_groups=dict(hub_opts["param_groups"] or {}), exp_dir=None if exp_dir is None else str(exp_dir),
        extra={"prototypes_name": name, "integration": "attach"},
    )
    full_every = hub_opts["full_every"]
    if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1:
        raise ValueError(f"full_every must be an integer >= 1 (1: the whole-tensor statistics every step "
                         f"at any K), got {full_every!r}")
    ctx.shared.full_every = full_every
    mons = build_monitors(monitors, overrides=overrides)
    sinks: list[Any] = []
    if rank == 0:  # only rank 0 writes: other ranks open no run and no files
        if run is not False:
            from .sinks import WandbSink

            wdir = hub_opts["dir"] or wandb_dir or exp_dir
            sinks.append(WandbSink(run) if run is not None else WandbSink(
                project=hub_opts["project"], dir=None if wdir is None else str(wdir), mode="offline",
                config={**config, "prototypes": name, "num_proto": tensor.shape[0], "proto_dim": tensor.shape[1]},
                name=hub_opts["run_name"]))
        if exp_dir is not None:
            from .sinks import LocalSink

            sinks.append(LocalSink(os.path.join(str(exp_dir), "records")))
        sinks.extend(hub_opts["sinks"] or ())
    console = hub_opts["console"]
    if console is True:
        console = _print_console
    elif console is False or console is None:
        console = None
    return AttachedHub(ctx, mons, sinks, log_every=hub_opts["log_every"], stop_on_error=hub_opts["stop_on_error"],
                       console=console, capture=capture, accumulate_grad_batches=hub_opts["accumulate_grad_batches"],
                       assign_temperature=hub_opts["assign_temperature"], install_hooks=install_hooks,
                       auto_capture=hub_opts["capture"] is None, capture_every=hub_opts["capture_every"])


def attach(optimizer: torch.optim.Optimizer, prototypes: Union[torch.Tensor, nn.Module, str],
           model: Optional[nn.Module] = None, run: Any = None, monitors: MonitorSpec = "default",
           **options: Any) -> AttachedHub:
    """Watch ``prototypes`` in an existing training loop; returns the hub (call ``hub.close()`` at the end).

    Args:
        optimizer: the optimizer that should train the prototypes (its step hooks drive the events).
        prototypes: a (num_proto, dim) tensor (SDPN's free ``P``); a prototype layer module
            (SwAV's ``nn.Linear(dim, K)`` -> ``.weight``; DINO's weight-normalised ``last_layer`` ->
            its direction ``weight_v`` / ``parametrizations.weight.original1``); or a dotted name
            resolved in ``model`` (``"head.prototypes"``, ``"module.last_layer.weight"``).
        model: the (student) model; needed for dotted names and ``capture``.
        run: None opens an offline W&B run (under ``dir``/``exp_dir``, else ``./wandb``); a wandb
            Run is used as is and not finished by ``close()``; False: no W&B.
        monitors: ``"default"``, a list of names or Monitor instances, or ``{name: options}``.
        **options: see :data:`OPTIONS`, plus ``<monitor>=dict(...)`` per monitor, e.g.
            ``tsne={"every_n_steps": 50}``.

    Under ``torch.distributed`` attach on every rank: ``ctx.rank``/``world_size`` come from the
    process group, and only rank 0 opens a run and writes (other ranks build no sink at all); the
    monitors run on every rank, so collectives (the replica check) line up.

    With ``stop_on_error=True`` an error finding sets ``hub.should_stop``: the loop may check it
    to checkpoint and stop cleanly. ``hub.state_dict()`` / ``hub.load_state_dict()`` (monitor
    state, findings, the step counter) belong in the loop's own checkpoint for a resume.
    """
    if optimizer is None:
        raise TypeError("attach() needs the optimizer that trains the prototypes: its step hooks drive the events")
    hub = build_hub(optimizer, prototypes, model=model, run=run, monitors=monitors, options=options)
    hub.start()  # on_train_start at attach time: the static checks report now
    return hub
