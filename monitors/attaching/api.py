"""Attach the monitors to any PyTorch training loop with one line; the loop itself stays as it is.

    hub = attach(optimizer, prototypes, model=model)     # the one line
    for batch in loader:                                 # unchanged
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
    hub.close()                                          # flush, finish the W&B run

The events of :mod:`monitors.core.events` come from PyTorch's own hooks:

========================== ===========================================================================
event                      derived from
========================== ===========================================================================
on_train_start             ``attach()`` itself, after resolving the prototypes: the static checks of the
                           health doctor (leaf, requires_grad, optimizer membership, lr) report at once.
on_after_backward          ``prototypes.register_post_accumulate_grad_hook``: at the end of the backward
                           pass (queued on the autograd engine, so every gradient is there), once per
                           optimizer step: at the ``accumulate_grad_batches``-th backward (default 1).
                           If it did not fire (no gradient, non-leaf prototypes, fewer backward passes),
                           ``optimizer.step()`` emits it first. Under a ``torch.amp.GradScaler``
                           ``optimizer.step()`` always emits it: the gradients are unscaled only there.
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
the backward. A skipped step (``GradScaler`` on inf) emits nothing, does not count, and what was captured for it is dropped.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .attached_hub import AttachedHub
from .capture import parse_capture
from ..core.distributed import rank_and_world
from ..core.events import RunContext
from ..core.hub import _print_console
from ..core.options import positive_int
from ..core.proto_stats import FULL_EVERY
from ..core.registry import REGISTRY, MonitorSpec, build_monitors
from .resolve import resolve_prototypes, resolve_teacher

__all__ = ["attach", "build_hub", "split_options", "OPTIONS"]

_OWNER = "attach()"

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
    "capture_every": None,         # every n steps (None: 1 with capture="name"; automatic: 5, 20 above 16,384 rows)
    "full_every": FULL_EVERY,      # above 16,384 prototypes: whole-(K, D) statistics every n steps (monitors.core.proto_stats)
    "sinks": (),                   # extra sinks (objects with log_rows/set_summary/alert/close)
    "console": True,               # print findings to stderr (False: silent; or a callable(str))
    "teacher": None,               # the EMA teacher, if any (ctx.teacher)
    "config": None,                # run config: ctx.config and the W&B run config
    "project": "protowatch",       # W&B project of the run opened when run=None
    "run_name": None,              # W&B run name of the run opened when run=None
    "param_groups": None,          # {name: [params]} the gradient monitor reports besides
}


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
    capture = parse_capture(hub_opts["capture"], model)
    if rank is None or world_size is None:
        r, w = rank_and_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    exp_dir = hub_opts["exp_dir"]
    config = dict(hub_opts["config"] or {})
    teacher = resolve_teacher(hub_opts["teacher"], model)
    freeze_steps = positive_int(_OWNER, "freeze_steps", hub_opts["freeze_steps"], minimum=0)
    ctx = RunContext(
        prototypes=tensor, optimizer=optimizer, model=model, teacher=teacher, config=config,
        rank=rank, world_size=world_size, freeze_steps=freeze_steps,
        param_groups=dict(hub_opts["param_groups"] or {}), exp_dir=None if exp_dir is None else str(exp_dir),
        extra={"prototypes_name": name, "integration": "attach"},
    )
    ctx.proto_stats.full_every = positive_int(_OWNER, "full_every", hub_opts["full_every"])
    mons = build_monitors(monitors, overrides=overrides)
    from ..formats.sinks import build_sinks  # imports wandb only when a run is opened

    wdir = hub_opts["dir"] or wandb_dir or exp_dir
    sinks, _ = build_sinks(rank, exp_dir=exp_dir, run=run, extra=hub_opts["sinks"], wandb_options=dict(
        project=hub_opts["project"], dir=None if wdir is None else str(wdir), mode="offline",
        config={**config, "prototypes": name, "num_proto": tensor.shape[0], "proto_dim": tensor.shape[1]},
        name=hub_opts["run_name"]))
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
