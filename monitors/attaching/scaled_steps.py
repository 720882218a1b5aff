"""The GradScaler of a foreign loop, as the attached hub sees it (how a scaler is found and read:
:mod:`monitors.core.grad_scaling`).

Under ``torch.amp.GradScaler`` the backward pass leaves S x the gradients; they are true only at
``optimizer.step()``, which ``GradScaler.step`` calls after unscaling, and does not call at all
when a gradient holds an inf or a NaN (the step is skipped). So with a scaler the hub's gradient
work (``after_backward``) runs at ``optimizer.step()``, and a backward pass that follows an
accumulation boundary without a step means the step was skipped: what was captured for it is
dropped and it is not counted.

:class:`ScalerWatch` is a part the hub owns: it finds the scaler and answers the hub's two
questions (is this backward pass scaled? was the scaler found only at this step?); the hub keeps
its own step state and acts on the answers."""
from __future__ import annotations

from typing import Any, MutableMapping

from ..core.grad_scaling import find_grad_scaler, is_scaling

__all__ = ["ScalerWatch"]


class ScalerWatch:
    """Finds the GradScaler driving a foreign loop and follows it (see the module docstring)."""

    def __init__(self) -> None:
        self.scaler: Any = None     # the GradScaler driving the loop, once found
        self._checked = False       # a step was taken: the backward-time search is over

    def backward_is_scaled(self) -> bool:
        """At the end of a backward pass: True when a GradScaler scales this loop's gradients
        (before the first step, the scaler is looked for among the loop's local variables)."""
        if self.scaler is None and not self._checked:
            self.scaler = find_grad_scaler(locals_too=True)
        return is_scaling(self.scaler)

    def at_step(self, extra: MutableMapping[str, Any]) -> bool:
        """At ``optimizer.step()`` (the gradients are unscaled): at the first step taken, look for
        the scaler among the callers (``GradScaler.step``: exact; a loop without one at its first
        step is taken to have none) and hand it to ``extra["grad_scaler"]`` (the run context's
        extras). True when it was found only now and scales: gradient work done at the backward
        pass saw scaled gradients and must run again."""
        found_now = False
        if self.scaler is None and not self._checked:  # the first step taken decides
            self.scaler = find_grad_scaler(locals_too=False, max_depth=10)
            found_now = is_scaling(self.scaler)
        self._checked = True
        if self.scaler is not None:
            extra["grad_scaler"] = self.scaler
        return found_now
