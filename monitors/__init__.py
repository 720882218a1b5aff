"""protowatch monitors: watch the prototypes of self-supervised models while they train.

    from monitors import attach, Monitor, MonitorHub, Finding
"""
from .base import Monitor
from .events import EVENTS, RunContext, StepOutputs
from .finding import Finding
from .hub import MonitorHub
from .registry import REGISTRY, build_monitors


def attach(*args, **kwargs):
    """Attach the monitors to an existing training loop with one line (see monitors.attach)."""
    from .attach import attach as _attach

    return _attach(*args, **kwargs)


__all__ = ["attach", "Monitor", "MonitorHub", "Finding", "RunContext", "StepOutputs", "EVENTS",
           "REGISTRY", "build_monitors"]
