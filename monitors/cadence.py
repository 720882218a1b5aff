"""The one "every n steps" rule of the monitors.

A monitor's per-step hooks run at the hub's cadence (``Monitor.every_n_steps``: steps that are
multiples of n). Work a hook does less often than that (a histogram, a render, a duplicate
check) uses :class:`Every`: due at the first step it is asked about, then once at least
``n`` steps have passed since the last time it fired. Steps a hook skips therefore never delay
the next firing by more than one hook call, and a resume that restores :meth:`state_dict`
continues the same schedule.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .options import positive_int

__all__ = ["Every"]


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
