"""Checks of monitor and ``attach()`` options: one ValueError wording for every option.

Each check returns the value (converted where it says so) or raises a ValueError that names the
owner (a monitor's class or ``attach()``), the option, what it must be, and the value given.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

__all__ = ["positive_int", "number_in", "one_of", "optional_positive_int"]


def positive_int(owner: str, name: str, value: object, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (bools refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def optional_positive_int(owner: str, name: str, value: object, minimum: int = 1) -> Optional[int]:
    """None, or an integer >= ``minimum``."""
    return None if value is None else positive_int(owner, name, value, minimum)


def number_in(owner: str, name: str, value: object, low: float = -math.inf, high: float = math.inf) -> float:
    """A real number in [low, high] (bools refused), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{owner}: {name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def one_of(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
