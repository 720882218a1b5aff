"""The sweep file: reading and checking a W&B sweep configuration, the kinds of its parameters,
and the grid it spans (in W&B's order)."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Mapping

from monitors.formats.sweep_state import DEFAULT_METRIC

from ..config import read_yaml_mapping

#: top-level keys of a W&B sweep configuration (W&B rejects others)
SWEEP_KEYS = ("program", "method", "parameters", "metric", "early_terminate", "name", "description",
              "project", "entity", "command", "run_cap", "job", "image_uri", "apiVersion", "kind",
              "controller", "metrics", "scheduler")
METHODS = ("grid", "random", "bayes")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's default
#: arguments the sweep gives every trial; a ``{value: ...}`` parameter may replace the defaults
TRIAL_DEFAULTS = {"wandb_mode": "offline", "progress": False}
#: arguments the sweep owns (one directory and one W&B name per trial, one group per sweep)
TRIAL_OWNED = ("exp_dir", "wandb_group", "wandb_name")


class SweepError(ValueError):
    """A problem with the sweep file or the way the sweep was asked for, with the fix."""


def trial_count(cfg: Mapping[str, Any], count: Any) -> Any:
    """How many trials a sweep runs: ``--count``, else the file's ``run_cap``; None (every point)
    for a grid. A random or bayes sweep needs one."""
    if count is not None and count < 1:
        raise SweepError(f"--count must be >= 1, got {count}")
    count = count or cfg.get("run_cap")
    if cfg["method"] in ("random", "bayes") and not count:
        raise SweepError(f"a {cfg['method']} sweep needs a number of trials: pass --count N (or set run_cap in the file)")
    return count


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a W&B sweep file; returns the configuration as a dict."""
    p = Path(path)
    cfg = read_yaml_mapping(p, "sweep file", "e.g. experiments/sweeps/num_proto_x_output_dim.yaml",
                            "method, parameters, ...", error=SweepError)
    unknown = sorted(set(cfg) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"sweep file {p}: unknown top-level key(s) {unknown}; W&B accepts {', '.join(SWEEP_KEYS)}. "
                         "Put fixed settings of every trial into parameters as `key: {value: X}`")
    method = cfg.get("method")
    if method not in METHODS:
        raise SweepError(f"sweep file {p}: method must be one of {', '.join(METHODS)}, got {method!r}")
    params = cfg.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"sweep file {p}: `parameters` must map names to specs, e.g. num_proto: {{values: [64, 256]}}")
    for name, spec in params.items():
        param_kind(name, spec, method)
    metric = cfg.get("metric") or DEFAULT_METRIC
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise SweepError(f"sweep file {p}: metric must be {{name: eval/eer, goal: minimize}}, got {metric!r}")
    if metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise SweepError(f"sweep file {p}: metric goal must be minimize or maximize, got {metric.get('goal')!r}")
    cfg["metric"] = {"name": metric["name"], "goal": metric.get("goal", "minimize")}
    command = cfg.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not all(isinstance(c, (str, int, float)) for c in command):
        raise SweepError(f"sweep file {p}: command must be a list of strings, e.g. "
                         "[${{env}}, ${{interpreter}}, -m, pipeline, train, ${{args_no_hyphens}}]")
    if any("${program}" in str(c) for c in command) and not cfg.get("program"):
        raise SweepError(f"sweep file {p}: the command uses ${{program}} but `program` is not set")
    for k in TRIAL_OWNED:
        if k in params:
            raise SweepError(f"sweep file {p}: parameter {k!r} is set by the sweep for each trial; remove it")
    cfg.setdefault("name", p.stem)
    return cfg


def param_kind(name: str, spec: Any, method: str) -> str:
    """The W&B distribution of a parameter spec (checked against what the local engine runs)."""
    if not isinstance(spec, dict):
        raise SweepError(f"parameter {name!r}: expected a mapping such as {{values: [1, 2]}} or {{value: 1}}, got {spec!r}")
    if "parameters" in spec:
        raise SweepError(f"parameter {name!r}: nested parameters are not supported by the local engine; use --wandb")
    if "value" in spec:
        return "constant"
    dist = spec.get("distribution")
    if "values" in spec and dist in (None, "categorical"):
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise SweepError(f"parameter {name!r}: values must be a non-empty list")
        if "probabilities" in spec:
            raise SweepError(f"parameter {name!r}: categorical probabilities are not supported by the local engine "
                             "(Optuna samples categories uniformly); drop them or use --wandb")
        return "categorical"
    if "min" in spec and "max" in spec:
        if dist is None:
            both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
            dist = "int_uniform" if both_int else "uniform"
        if spec["min"] > spec["max"]:
            raise SweepError(f"parameter {name!r}: min {spec['min']} > max {spec['max']}")
        if dist == "q_uniform" and not spec.get("q"):
            raise SweepError(f"parameter {name!r}: q_uniform needs q")
        if method == "grid" and dist not in ("int_uniform", "q_uniform"):
            raise SweepError(f"parameter {name!r}: grid search needs values, a constant, int_uniform or q_uniform "
                             f"(as in W&B), got {dist}")
        if dist in ("int_uniform", "uniform", "log_uniform_values", "log_uniform", "q_uniform"):
            return dist
        raise SweepError(f"parameter {name!r}: distribution {dist!r} is not supported by the local engine "
                         "(int_uniform, uniform, log_uniform_values, log_uniform, q_uniform are); use --wandb")
    raise SweepError(f"parameter {name!r}: give `value`, `values`, or `min` and `max` (W&B's format), got {spec!r}")


def swept_names(cfg: Mapping[str, Any]) -> list[str]:
    """The parameters that vary, sorted by name (W&B's order)."""
    return sorted(k for k, s in cfg["parameters"].items() if param_kind(k, s, cfg["method"]) != "constant")


def constants(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The fixed settings of every trial: the parameters with a single ``value:``."""
    return {k: s["value"] for k, s in cfg["parameters"].items() if param_kind(k, s, cfg["method"]) == "constant"}


def _grid_values(name: str, spec: Mapping[str, Any], kind: str) -> list[Any]:
    if kind == "categorical":
        return list(spec["values"])
    if kind == "int_uniform":
        return list(range(int(spec["min"]), int(spec["max"]) + 1))
    import numpy as np  # q_uniform as W&B expands it for a grid

    return np.arange(spec["min"], spec["max"], spec["q"]).tolist()


def grid_points(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the swept parameters, in W&B's grid order (names sorted, the last
    one varying fastest)."""
    names = swept_names(cfg)
    values = [_grid_values(n, cfg["parameters"][n], param_kind(n, cfg["parameters"][n], "grid")) for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def params_key(params: Mapping[str, Any]) -> str:
    """The canonical JSON of a parameter set: equal parameters, equal keys."""
    return json.dumps(params, sort_keys=True, default=str)


def default_out(cfg: Mapping[str, Any]) -> Path:
    """The sweep directory when ``--out`` is not given: runs/sweeps/<name>."""
    return Path("runs") / "sweeps" / str(cfg["name"])
