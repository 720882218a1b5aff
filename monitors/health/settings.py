"""The doctor's settings, and what a group of checks is given: the settings and a way to report.

Every group of checks (:class:`~monitors.health.static_checks.StaticChecks`,
:class:`~monitors.health.interval_checks.IntervalChecks`) is built with a :class:`DoctorSettings`
and a :data:`Report` function, owns its own state, and is driven by the doctor's hooks through its
public methods; none reads the doctor's attributes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

from ..core.events import RunContext
from ..core.options import number_in, positive_int

#: ``report(ctx, code, severity, message)``: the doctor's :meth:`Monitor.report
#: <monitors.core.base.Monitor.report>` (once per code and severity: the hub drops repeats)
Report = Callable[[RunContext, str, str, str], None]


@dataclass(frozen=True)
class DoctorSettings:
    """The options of :class:`~monitors.health.doctor.HealthDoctor` (documented there), checked."""

    patience: int = 20
    update_patience: int = 10
    static_every: int = 50
    sync_every: int = 5
    sync_tol: float = 1e-5
    nonfinite_patience: int = 5
    collapse_min_fraction: float = 0.05
    collapse_row_tol: float = 1e-3
    collapse_patience: int = 3
    collapse_warmup: int = 0
    collapse_every: int = 1
    collapse_uniform_gap: float = 0.01
    collapse_embed_tol: float = 1e-3
    dup_cosine: float = 0.99
    dup_fraction: float = 0.1
    dup_max_rows: int = 4096
    dup_every: int = 50
    dup_max_pairs: int = 1 << 25
    dup_pairs_per_log: int = 1 << 20
    norm_min: float = 1e-4
    norm_max: float = 1e3

    def __post_init__(self) -> None:
        owner = "HealthDoctor"
        #: option -> the smallest value of an integer option, or the (low, high) range of a float one
        limits: dict[str, Any] = {
            "patience": 0, "update_patience": 0, "static_every": 1, "sync_every": 1, "sync_tol": (0.0, math.inf),
            "nonfinite_patience": 0, "collapse_min_fraction": (0.0, 1.0), "collapse_row_tol": (0.0, math.inf),
            "collapse_patience": 1, "collapse_warmup": 0, "collapse_every": 1, "collapse_uniform_gap": (0.0, math.inf),
            "collapse_embed_tol": (0.0, math.inf), "dup_cosine": (-1.0, 1.0), "dup_fraction": (0.0, 1.0),
            "dup_max_rows": 1, "dup_every": 1, "dup_max_pairs": 1, "dup_pairs_per_log": 1,
            "norm_min": (0.0, math.inf), "norm_max": (0.0, math.inf),
        }
        for f in fields(self):
            limit, value = limits[f.name], getattr(self, f.name)
            if isinstance(limit, tuple):
                checked = number_in(owner, f.name, value, limit[0], limit[1])
            else:
                checked = positive_int(owner, f.name, value, limit)
            object.__setattr__(self, f.name, checked)
        if self.norm_max <= self.norm_min:
            raise ValueError(f"{owner}: norm_max ({self.norm_max}) must be larger than norm_min ({self.norm_min})")
