"""protowatch monitors: watch the prototypes of self-supervised models while they train.

    from monitors import attach, Monitor, MonitorHub, Finding
"""
#: the version of the protowatch distribution: written here only (pyproject.toml reads it)
__version__ = "0.3.0"

from .attaching.api import attach
from .core.base import Monitor
from .core.events import EVENTS, RunContext, StepOutputs
from .core.finding import Finding
from .core.hub import MonitorHub
from .core.registry import REGISTRY, build_monitors


__all__ = ["__version__", "attach", "Monitor", "MonitorHub", "Finding", "RunContext", "StepOutputs", "EVENTS",
           "REGISTRY", "build_monitors"]
