"""protowatch monitors: watch the prototypes of self-supervised models while they train.

    from monitors import attach, Monitor, MonitorHub, Finding
"""
from .base import Monitor
from .events import EVENTS, RunContext, StepOutputs
from .finding import Finding
from .hub import MonitorHub
from .registry import REGISTRY, build_monitors
# bound after the submodule of the same name is loaded: ``monitors.attach`` stays the function
from .attach import attach  # noqa: E402


__all__ = ["attach", "Monitor", "MonitorHub", "Finding", "RunContext", "StepOutputs", "EVENTS",
           "REGISTRY", "build_monitors"]
