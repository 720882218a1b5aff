"""protowatch monitors: watch the prototypes of self-supervised models while they train.

    from monitors import attach, Monitor, MonitorHub, Finding
"""
from .attaching import attach
from .base import Monitor
from .events import EVENTS, RunContext, StepOutputs
from .finding import Finding
from .hub import MonitorHub
from .registry import REGISTRY, build_monitors


__all__ = ["attach", "Monitor", "MonitorHub", "Finding", "RunContext", "StepOutputs", "EVENTS",
           "REGISTRY", "build_monitors"]
