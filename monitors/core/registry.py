"""Names used in configs -> monitor classes. Unknown names and options are errors that list the
valid ones."""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Mapping, Sequence, Union

from .base import Monitor

#: name -> "module:Class" (imported on first use, so a broken optional monitor breaks only itself)
REGISTRY: dict[str, str] = {
    "norms": "monitors.plugins.norms:NormMonitor",
    "gradients": "monitors.plugins.gradients:GradientMonitor",
    "deltas": "monitors.plugins.deltas:DeltaMonitor",
    "usage": "monitors.plugins.usage:UsageMonitor",
    "similarity": "monitors.plugins.similarity:SimilarityMonitor",
    "tsne": "monitors.tsne.monitor:TSNEMonitor",
    "evolution": "monitors.plugins.evolution:EvolutionMonitor",
    "health": "monitors.health.doctor:HealthDoctor",
    "checks": "monitors.health.trainer_checks:TrainerChecks",
}

#: what ``monitors="default"`` means
DEFAULT: tuple[str, ...] = ("norms", "gradients", "deltas", "usage", "similarity", "tsne", "evolution", "health",
                              "checks")

MonitorSpec = Union[str, Sequence[Union[str, Monitor]], Mapping[str, Mapping[str, Any]], None]


def monitor_class(name: str) -> type[Monitor]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown monitor {name!r}{hint}; valid monitors: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _build(name: str, options: Mapping[str, Any]) -> Monitor:
    cls = monitor_class(name)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"monitor {name!r} has no option {key!r}{hint}; valid options: {', '.join(valid)}")
    return cls(**options)


def build_monitors(spec: MonitorSpec = "default", overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[Monitor]:
    """Build monitors from ``"default"``, ``"none"``, a list of names/instances, or a mapping
    ``{name: {option: value}}``. ``overrides`` adds options per name (e.g. from ``attach(**options)``)."""
    overrides = dict(overrides or {})
    if spec is None or spec == "none":
        items: list[tuple[Any, dict]] = []
    elif spec == "default":
        items = [(n, {}) for n in DEFAULT]
    elif isinstance(spec, str):
        items = [(n.strip(), {}) for n in spec.split(",") if n.strip()]
    elif isinstance(spec, Mapping):
        items = [(n, dict(opts or {})) for n, opts in spec.items()]
    else:
        items = [(n, {}) for n in spec]
    out: list[Monitor] = []
    for name, opts in items:
        if isinstance(name, Monitor):
            out.append(name)
            continue
        if name == "default":
            out.extend(_build(n, {**overrides.get(n, {})}) for n in DEFAULT)
            continue
        out.append(_build(name, {**opts, **overrides.get(name, {})}))
    unknown = set(overrides) - set(REGISTRY)
    if unknown:
        raise ValueError(f"options given for unknown monitors {sorted(unknown)}; valid monitors: {', '.join(REGISTRY)}")
    return out
