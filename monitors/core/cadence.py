"""The "every n steps" rules of the monitors, two of them and each written once.

- :func:`on_multiple`: the step is a multiple of n (counted from ``start``). The same steps on
  every rank and after any resume, with no state: the rule of the hub's cadence
  (``Monitor.every_n_steps``), of the log interval, and of every check that meets the other ranks
  in a collective.
- :class:`Every`: work a hook does less often than its own cadence (a histogram, a render, a
  duplicate check): due at the first step it is asked about, then once at least ``n`` steps have
  passed since the last time it fired. Steps a hook skips therefore never delay the next firing
  by more than one hook call, and a resume that restores :meth:`Every.state_dict` continues the
  same schedule.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .options import positive_int

__all__ = ["Every", "on_multiple"]


def on_multiple(step: int, n: int, start: int = 0) -> bool:
    """Whether ``step`` is ``start``, ``start + n``, ``start + 2n``, ... (never before ``start``)."""
    return step >= start and (step - start) % n == 0


class Every:
    """Due at the first step asked, then every ``n`` or more steps after the last firing."""

    def __init__(self, n: int, owner: str = "cadence", name: str = "every") -> None:
        self.n = positive_int(owner, name, n)
        self.last: Optional[int] = None   # step of the last firing

    def due(self, step: int) -> bool:
        """Whether ``step`` is due, without firing."""
        return self.last is None or step - self.last >= self.n

    def fire(self, step: int) -> bool:
        """True (and remember ``step``) when ``step`` is due; else False."""
        if not self.due(step):
            return False
        self.last = int(step)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        last = state.get("last")
        self.last = None if last is None else int(last)
