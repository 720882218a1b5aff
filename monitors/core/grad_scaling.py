"""``torch.amp.GradScaler`` in a foreign loop, as :class:`monitors.attaching.attached_hub.AttachedHub` sees it.

Under a GradScaler the backward pass produces gradients multiplied by the scale S (2**16 at the
start): ``scaler.scale(loss).backward()``. The gradients become the true ones only when
``scaler.unscale_(optimizer)`` divides them, which ``scaler.step(optimizer)`` does itself if the
loop did not, right before it calls ``optimizer.step()``; when a gradient holds an inf or a NaN,
``scaler.step`` does not call ``optimizer.step()`` at all (the step is skipped) and
``scaler.update()`` lowers S. So:

- the prototypes' post-accumulate hook (the end of the backward) sees S x the gradient;
- the optimizer's step pre-hook sees the true, unscaled gradient (and only on steps that are
  taken: a skipped step fires neither step hook).

The hub therefore runs its gradient work (``on_after_backward``) at ``optimizer.step()`` time when
a scaler drives the loop, and the local gradient that ``PROTO_GRAD_NOT_AVERAGED`` copies in the
post-accumulate hook is divided by the scale the backward used (``ctx.extra["grad_scaler"]``).

The scaler is found without the loop naming it: on the call stack of ``optimizer.step()``
(``GradScaler.step`` is a caller: exact), and, before the first step, among the local variables
of the frames that called ``backward()`` (``scaler.scale(loss).backward()`` with ``scaler`` or
``self.scaler`` a local: the trainers of 3D-Speaker, WeSpeaker and DINO all hold it so).
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch

try:  # torch >= 2.3: one class for every device (torch.cuda.amp.GradScaler subclasses it)
    from torch.amp.grad_scaler import GradScaler as _GradScaler
except ImportError:  # pragma: no cover - older torch
    from torch.cuda.amp import GradScaler as _GradScaler  # type: ignore[no-redef]

__all__ = ["find_grad_scaler", "scale_tensor", "is_scaling"]

#: frames walked up from a hook (the loop's frame is 3-6 frames above the step pre-hook)
MAX_DEPTH = 12


def is_scaling(scaler: Any) -> bool:
    """Whether ``scaler`` is an enabled GradScaler (a disabled one leaves the gradients as they are)."""
    return isinstance(scaler, _GradScaler) and scaler.is_enabled()


def _scaler_in(value: Any) -> Optional[Any]:
    if isinstance(value, _GradScaler):
        return value
    d = getattr(value, "__dict__", None)  # a trainer object holding it: self.scaler, self.fp16_scaler
    if isinstance(d, dict) and not isinstance(value, (torch.nn.Module, torch.optim.Optimizer)):
        for v in d.values():
            if isinstance(v, _GradScaler):
                return v
    return None


def find_grad_scaler(locals_too: bool, skip: int = 1, max_depth: int = MAX_DEPTH) -> Optional[Any]:
    """The GradScaler on the current call stack: the ``self`` of a GradScaler method (exact: the
    caller of ``optimizer.step()``); with ``locals_too``, also one held in a local variable (or an
    attribute of one) of a calling frame. None when there is none."""
    try:
        frame = sys._getframe(skip)
    except ValueError:  # pragma: no cover
        return None
    depth = 0
    while frame is not None and depth < max_depth:
        code = frame.f_code
        if code.co_varnames[:1] == ("self",) and code.co_argcount:
            s = frame.f_locals.get("self")
            if isinstance(s, _GradScaler):
                return s
        if locals_too and "torch" not in code.co_filename.replace("\\", "/").split("/")[-3:-1]:
            for v in frame.f_locals.values():
                found = _scaler_in(v)
                if found is not None:
                    return found
        frame = frame.f_back
        depth += 1
    return None


def scale_tensor(scaler: Any) -> Optional[torch.Tensor]:
    """The scale the current backward used, as the scaler's own (1,) tensor on its device (no host
    read); None for no scaler, a disabled one, or one that has not scaled anything yet."""
    if not is_scaling(scaler):
        return None
    s = getattr(scaler, "_scale", None)
    return s if isinstance(s, torch.Tensor) else None
