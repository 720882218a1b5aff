"""The GradScaler's part of driving a step in a foreign loop: a mixin of
:class:`~monitors.attaching.attached_hub.AttachedHub` (how a scaler is found and read:
:mod:`monitors.core.grad_scaling`).

Under ``torch.amp.GradScaler`` the backward pass leaves S x the gradients; they are true only at
``optimizer.step()``, which ``GradScaler.step`` calls after unscaling, and does not call at all
when a gradient holds an inf or a NaN (the step is skipped). So with a scaler the hub's gradient
work (``after_backward``) runs at ``optimizer.step()``, and a backward pass that follows an
accumulation boundary without a step means the step was skipped: what was captured for it is
dropped and it is not counted."""
from __future__ import annotations

from typing import Any, Optional

from ..core.grad_scaling import find_grad_scaler, is_scaling

__all__ = ["ScaledSteps"]


class ScaledSteps:
    """Mixin: the hub's GradScaler bookkeeping (uses its ``_n_backward``, ``_backward_emitted``,
    ``_step_chunks``, ``_explicit``, ``_assign``, ``accumulate_grad_batches`` and ``ctx``)."""

    _scaler: Any = None               # the GradScaler driving the loop, once found
    _scaler_checked = False           # a step was taken: the backward-time search is over
    _boundary: Optional[tuple[int, dict[str, Any]]] = None  # (chunks, outputs) at the last boundary
    skipped_steps = 0                 # steps the scaler skipped on inf/NaN: not counted, not logged

    def _scaled_backward(self) -> bool:
        """At the end of a backward pass: True when a GradScaler scales this loop's gradients (the
        gradient work then waits for ``optimizer.step()``; the accumulation count is kept here)."""
        if self._scaler is None and not self._scaler_checked:
            self._scaler = find_grad_scaler(locals_too=True)
        if not is_scaling(self._scaler):
            return False
        if self._n_backward >= self.accumulate_grad_batches:  # the last boundary had no step: skipped
            self._forget_skipped_step()
        self._n_backward += 1
        if self._n_backward >= self.accumulate_grad_batches:
            self._boundary = (len(self._step_chunks), dict(self._explicit))
        return True

    def _forget_skipped_step(self) -> None:
        """The scaler skipped the last step (no ``optimizer.step()``): drop what was captured for
        it; it is neither counted nor logged."""
        n, explicit = self._boundary or (0, {})
        del self._step_chunks[:n]
        self._explicit = {k: v for k, v in self._explicit.items() if explicit.get(k) is not v}
        self._n_backward = 0
        self._backward_emitted = False
        self._assign = None
        self._boundary = None
        self.skipped_steps += 1

    def _scaler_at_step(self) -> bool:
        """At ``optimizer.step()`` (the gradients are unscaled): at the first step taken, look for
        the scaler among the callers (``GradScaler.step``: exact; a loop without one at its first
        step is taken to have none) and hand it to ``ctx.extra["grad_scaler"]``. True when
        ``after_backward`` already ran on this step's scaled gradients and must run again."""
        rerun = False
        if self._scaler is None and not self._scaler_checked:  # the first step taken decides
            found = find_grad_scaler(locals_too=False, max_depth=10)
            if found is not None:
                self._scaler = found
                rerun = self._backward_emitted and is_scaling(found)
        self._scaler_checked = True
        self._boundary = None
        if self._scaler is not None:
            self.ctx.extra["grad_scaler"] = self._scaler
        return rerun
