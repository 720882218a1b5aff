"""Sweeps in W&B's own sweep-config format, run on this machine (offline) or as a W&B sweep.

    python -m pipeline sweep experiments/sweeps/num_proto_x_output_dim.yaml --workers 2 --out runs/np_od
    python -m pipeline sweep experiments/sweeps/num_proto_x_output_dim.yaml --wandb   # needs `wandb login`

The sweep file is a W&B sweep configuration (``program``/``command``, ``method``, ``metric``,
``parameters``, ``early_terminate``, ``run_cap``, ``name``, ``project``...), so the same file
registers unchanged with ``wandb sweep FILE``. Fixed settings of every trial are parameters with a
single ``value:`` (W&B rejects unknown top-level keys, so there is no separate overrides key).

Local mode (the default; no account, no network)
    Each trial is a separate process built from the file's ``command`` exactly as ``wandb agent``
    builds it (W&B's own ``create_sweep_command``/``create_sweep_command_args``: ``${env}``,
    ``${interpreter}`` (this Python), ``${program}``, ``${args}``, ``${args_no_hyphens}``,
    ``${args_json}``, ``${args_json_file}``, ``${envvar:NAME}``), with four more arguments added to
    its parameters: ``exp_dir=<DIR>/trials/<name>``, ``wandb_group=<sweep name>``,
    ``wandb_name=<name>``, ``wandb_mode=offline`` and ``progress=false`` (the last two may be set
    otherwise by a ``{value: ...}`` parameter). ``<name>`` lists the swept parameters,
    e.g. ``num_proto=64,output_dim=32``, so the same parameters always land in the same directory.
    ``--workers N`` trials run at once (each process gets ``OMP_NUM_THREADS`` = cores / N unless
    it is set; the pipeline's own ``threads`` key wins). A trial's stdout/stderr go to ``<trial>/log.txt``; its
    status (finished with the metric read from ``<trial>/records/summary.json``, or failed with its
    exit code and the end of its log) goes to ``<trial>/status.json`` and ``DIR/sweep_state.json``,
    both written atomically. A failed trial never stops the others. Launched again on the same
    ``--out``, the sweep skips the trials that finished with the same parameters and runs the
    failed or missing ones (a failed trial's directory is cleared first). At the end it prints the
    table, writes ``DIR/summary.csv``, ``DIR/summary.md``, ``DIR/heatmap_<metric>.png`` (the metric
    and prototype health: final ``proto/usage/perplexity_student``, ``proto/usage/dead``,
    ``proto/delta/drift``, and ``health/errors``; rows num_proto, columns output_dim, failed trials
    empty) and logs them to a W&B offline run of job type ``sweep-summary`` in the sweep's group.

Search methods
    ``grid`` enumerates every combination in W&B's order (parameter names sorted, the last one
    varying fastest; ``int_uniform`` and ``q_uniform`` expanded as W&B expands them): this is
    an enumeration, not a search, and needs no library. ``random`` and ``bayes`` use Optuna
    (``RandomSampler`` and ``TPESampler``, seed 0) through its ask/tell interface and need
    ``--count`` (or ``run_cap`` in the file). Why Optuna and not W&B's own engine (the ``sweeps``
    package): ``sweeps`` 0.3.0 pins ``numpy<2`` (installing it would downgrade the numpy that torch
    and matplotlib here are built against) and pulls jsonschema/jsonref; Optuna is maintained,
    installs cleanly next to torch 2.13 and numpy 2, and its samplers are the well-tested
    equivalents (``bayes`` is TPE here, a Gaussian process on W&B's servers). A relaunch replays
    the same seeded sampler and re-uses finished trials whose parameters come out again, so a
    random sweep resumes exactly; a bayes sweep resumes exactly with one worker.
    ``early_terminate`` (hyperband) is honoured only by W&B agents (``--wandb``); the local engine
    runs every trial to the end.

W&B mode (``--wandb``)
    Registers the file with ``wandb.sweep`` (project: the file's ``project``, else ``protowatch``)
    and starts ``--workers`` ``wandb agent`` processes; more machines join with
    ``wandb agent ENTITY/PROJECT/SWEEP_ID``. The registered ``command`` wraps the file's command in
    ``python -m pipeline.sweep --trial-root DIR --`` so that each W&B run gets its own ``exp_dir``
    (``DIR/trials/<W&B run id>``) and ``status.json``; trials log online to the sweep's runs.
    Needs an account: without an API key it stops at once and says to run ``wandb login``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

from monitors.records import RECORDS_DIR, atomic_write_json
from monitors.sweep_state import SweepStateWriter, trial_metric
from monitors.dashboard import (heatmap_axes, heatmap_grid, heatmap_metrics,
                                read_sweep_state, render_heatmap, sweep_rows)

from .config import read_yaml_mapping

__all__ = ["load_sweep", "grid_points", "trial_name", "build_command", "run_sweep", "summarize_sweep",
           "heatmap_grid", "write_summary", "registered_config", "run_sweep_cli"]

#: top-level keys of a W&B sweep configuration (W&B rejects others)
SWEEP_KEYS = ("program", "method", "parameters", "metric", "early_terminate", "name", "description",
              "project", "entity", "command", "run_cap", "job", "image_uri", "apiVersion", "kind",
              "controller", "metrics", "scheduler")
METHODS = ("grid", "random", "bayes")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's default
DEFAULT_METRIC = {"name": "eval/eer", "goal": "minimize"}
#: arguments the sweep gives every trial; a ``{value: ...}`` parameter may replace the defaults
TRIAL_DEFAULTS = {"wandb_mode": "offline", "progress": False}
#: arguments the sweep owns (one directory and one W&B name per trial, one group per sweep)
TRIAL_OWNED = ("exp_dir", "wandb_group", "wandb_name")
LOG_TAIL_LINES = 25


class SweepError(ValueError):
    """A problem with the sweep file or the way the sweep was asked for, with the fix."""


# ----------------------------------------------------------------------------------------------
# the sweep file
# ----------------------------------------------------------------------------------------------
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
        _param_kind(name, spec, method)
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


def _param_kind(name: str, spec: Any, method: str) -> str:
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
    return sorted(k for k, s in cfg["parameters"].items() if _param_kind(k, s, cfg["method"]) != "constant")


def constants(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: s["value"] for k, s in cfg["parameters"].items() if _param_kind(k, s, cfg["method"]) == "constant"}


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
    values = [_grid_values(n, cfg["parameters"][n], _param_kind(n, cfg["parameters"][n], "grid")) for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


# ----------------------------------------------------------------------------------------------
# proposing trials: grid enumeration, or Optuna samplers through ask/tell
# ----------------------------------------------------------------------------------------------
class _Grid:
    def __init__(self, cfg: Mapping[str, Any], count: Optional[int]) -> None:
        self.points = grid_points(cfg)[: count if count else None]
        self._i = 0

    def ask(self) -> Optional[dict[str, Any]]:
        if self._i >= len(self.points):
            return None
        self._i += 1
        return self.points[self._i - 1]

    def tell(self, params: Mapping[str, Any], value: Optional[float]) -> None:
        pass


class _Optuna:
    """Random (``RandomSampler``) or Bayesian (``TPESampler``) search with Optuna's ask/tell."""

    def __init__(self, cfg: Mapping[str, Any], count: int, seed: int = 0) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        self.names = swept_names(cfg)
        self.dists: dict[str, Any] = {}
        self.choices: dict[str, list[Any]] = {}
        for n in self.names:
            spec = cfg["parameters"][n]
            kind = _param_kind(n, spec, cfg["method"])
            if kind == "categorical":  # by index: values may be lists or dicts, which Optuna cannot hold
                self.choices[n] = list(spec["values"])
                self.dists[n] = CategoricalDistribution(list(range(len(spec["values"]))))
            elif kind == "int_uniform":
                self.dists[n] = IntDistribution(int(spec["min"]), int(spec["max"]))
            elif kind == "uniform":
                self.dists[n] = FloatDistribution(float(spec["min"]), float(spec["max"]))
            elif kind == "log_uniform_values":
                self.dists[n] = FloatDistribution(float(spec["min"]), float(spec["max"]), log=True)
            elif kind == "log_uniform":  # W&B: min and max are natural-log exponents
                self.dists[n] = FloatDistribution(math.exp(spec["min"]), math.exp(spec["max"]), log=True)
            elif kind == "q_uniform":
                self.dists[n] = FloatDistribution(float(spec["min"]), float(spec["max"]), step=float(spec["q"]))
        sampler = (optuna.samplers.RandomSampler(seed=seed) if cfg["method"] == "random"
                   else optuna.samplers.TPESampler(seed=seed))
        direction = "minimize" if cfg["metric"]["goal"] == "minimize" else "maximize"
        self.study = optuna.create_study(direction=direction, sampler=sampler)
        self.count = count
        self._asked = 0
        self._open: dict[str, Any] = {}  # json of params -> optuna trial

    def ask(self) -> Optional[dict[str, Any]]:
        if self._asked >= self.count:
            return None
        self._asked += 1
        trial = self.study.ask(self.dists)
        params = {n: (self.choices[n][trial.params[n]] if n in self.choices else trial.params[n]) for n in self.names}
        self._open.setdefault(_key(params), []).append(trial)
        return params

    def tell(self, params: Mapping[str, Any], value: Optional[float]) -> None:
        import optuna

        trials = self._open.get(_key(params))
        if not trials:
            return
        trial = trials.pop(0)
        if value is None or not math.isfinite(value):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, value)


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------
# one trial
# ----------------------------------------------------------------------------------------------
def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def trial_name(params: Mapping[str, Any], swept: Sequence[str]) -> str:
    """``num_proto=64,output_dim=32``: the swept parameters in order. A short hash is appended
    when the plain name would lose information (rounded floats, characters a path cannot hold)
    or be too long, so that different parameters never share a directory."""
    if not swept:
        return "trial"
    plain = ",".join(f"{k}={_fmt_value(params[k])}" for k in swept)
    safe = "".join(c if (c.isalnum() or c in "_.,=+-") else "_" for c in plain)
    lossy = any(isinstance(params[k], float) and float(f"{params[k]:.6g}") != params[k] for k in swept)
    if safe != plain or lossy or len(safe) > 120:
        digest = hashlib.sha1(_key({k: params[k] for k in swept}).encode()).hexdigest()[:8]
        safe = f"{safe[:100]},h={digest}"
    return safe


def build_command(command: Sequence[Any], args: Mapping[str, Any], program: Optional[str] = None,
                  args_json_file: Optional[str | os.PathLike] = None) -> list[str]:
    """The argument list of one trial, expanded exactly as ``wandb agent`` expands the sweep's
    ``command`` (W&B's own helpers), with ``${interpreter}`` this Python."""
    from wandb.sdk.launch.sweeps import utils as wsu

    sweep_vars: dict[str, Any] = wsu.create_sweep_command_args({"args": {k: {"value": v} for k, v in args.items()}})
    sweep_vars["interpreter"] = [sys.executable]
    sweep_vars["program"] = [program] if program else []
    sweep_vars["env"] = ["/usr/bin/env"] if os.name != "nt" and Path("/usr/bin/env").exists() else []
    template = wsu.create_sweep_command([str(c) for c in command])
    if "${args_json_file}" in template:
        if args_json_file is None:
            raise SweepError("the command uses ${args_json_file}, but no file was given for it")
        Path(args_json_file).write_text(sweep_vars["args_json"][0])
        sweep_vars["args_json_file"] = [str(args_json_file)]
    out: list[str] = []
    for c in template:
        if c.startswith("${") and c.endswith("}"):
            if c[2:-1] not in sweep_vars:
                raise SweepError(f"unknown macro {c} in the sweep command; W&B knows ${{env}}, ${{interpreter}}, "
                                 "${program}, ${args}, ${args_no_hyphens}, ${args_json}, ${args_json_file}, ...")
            out += [str(x) for x in (sweep_vars[c[2:-1]] or [])]
        else:
            out.append(c)
    return out


def _log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


@dataclass
class _Trial:
    name: str
    params: dict[str, Any]
    dir: Path
    command: list[str] = field(default_factory=list)


class _Procs:
    """The trial processes alive now, so that Ctrl-C / SIGTERM reach them."""

    def __init__(self, workers: int = 1) -> None:
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = False
        self.threads = max(1, (os.cpu_count() or 1) // workers)  # OMP threads per trial

    def signal_all(self, sig: int) -> None:
        with self.lock:
            for p in self.procs.values():
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)  # the trial and anything it started (own session)
                    except (ProcessLookupError, PermissionError):
                        pass


def _run_trial(t: _Trial, metric: str, procs: _Procs) -> dict[str, Any]:
    """Run one trial to its end; returns its status record."""
    t.dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log_path = t.dir / "log.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(procs.threads))  # N trials share the cores
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(t.command) + "\n")
        log.flush()
        with procs.lock:
            if procs.stopping:
                return {"status": "failed", "exit_code": None, "error": "not started: the sweep was interrupted",
                        "started": started, "ended": time.time(), "seconds": 0.0}
            try:
                proc = subprocess.Popen(t.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)
            except OSError as exc:
                return {"status": "failed", "exit_code": None, "error": f"could not start {t.command[0]!r}: {exc}",
                        "started": started, "ended": time.time(), "seconds": 0.0}
            procs.procs[t.name] = proc
        rc = proc.wait()
        with procs.lock:
            procs.procs.pop(t.name, None)
    ended = time.time()
    rec: dict[str, Any] = {"exit_code": rc, "started": started, "ended": ended, "seconds": round(ended - started, 2)}
    if rc == 0:
        value = trial_metric(t.dir / RECORDS_DIR, metric)
        rec.update(status="finished", metric=value,
                   error="" if value is not None else f"the trial exited 0 but logged no {metric}")
    else:
        why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        rec.update(status="failed", metric=None, error=f"{why}; end of {log_path.name}:\n{_log_tail(log_path)}")
    return rec


# ----------------------------------------------------------------------------------------------
# the local sweep
# ----------------------------------------------------------------------------------------------
def default_out(cfg: Mapping[str, Any]) -> Path:
    return Path("runs") / "sweeps" / str(cfg["name"])


def run_sweep(file: str | os.PathLike, out: Optional[str | os.PathLike] = None, workers: int = 1,
              count: Optional[int] = None, echo: Callable[[str], None] = print,
              summary_run: Optional[bool] = None) -> list[dict[str, Any]]:
    """Run a sweep file locally (see the module docstring); returns the summary rows.

    ``summary_run``: log the sweep summary to a W&B offline run (default: unless the trials'
    ``wandb_mode`` is ``disabled``)."""
    cfg = load_sweep(file)
    if not isinstance(workers, int) or workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    if count is not None and count < 1:
        raise SweepError(f"--count must be >= 1, got {count}")
    method = cfg["method"]
    count = count or cfg.get("run_cap")
    if method in ("random", "bayes") and not count:
        raise SweepError(f"a {method} sweep needs a number of trials: pass --count N (or set run_cap in the file)")
    out_dir = Path(out) if out is not None else default_out(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = cfg["metric"]["name"]
    swept = swept_names(cfg)
    fixed = constants(cfg)
    trial_args = {**TRIAL_DEFAULTS, **fixed}
    proposer: Any = _Grid(cfg, count) if method == "grid" else _Optuna(cfg, int(count))
    state = SweepStateWriter(out_dir, {"name": cfg["name"], "file": str(file), "method": cfg["method"],
                                        "metric": cfg["metric"], "swept": swept_names(cfg)})
    command = cfg.get("command", DEFAULT_COMMAND)
    if cfg.get("early_terminate"):
        echo(f"note: early_terminate ({cfg['early_terminate'].get('type', '?')}) is used only by W&B agents (--wandb); "
             "locally every trial runs to its end")
    procs = _Procs(workers)
    n_run = n_reused = 0
    t_start = time.time()

    def make_trial(params: dict[str, Any]) -> _Trial:
        name = trial_name(params, swept)
        tdir = out_dir / "trials" / name
        args = {**trial_args, **params, "exp_dir": str(tdir.resolve()), "wandb_group": str(cfg["name"]),
                "wandb_name": name}
        tdir.mkdir(parents=True, exist_ok=True)
        cmd = build_command(command, args, cfg.get("program"), args_json_file=tdir / "args.json")
        return _Trial(name, {**fixed, **params}, tdir, cmd)

    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt
        old_handler = signal.signal(signal.SIGTERM, _on_term)
    running: dict[Future, _Trial] = {}
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trial") as pool:
            try:
                exhausted = False
                while True:
                    while not exhausted and len(running) < workers:
                        params = proposer.ask()
                        if params is None:
                            exhausted = True
                            break
                        name = trial_name(params, swept)
                        prev = state.trial(name)
                        full = {**fixed, **params}
                        if prev.get("status") == "finished" and _key(prev.get("params") or {}) == _key(full):
                            proposer.tell(params, prev.get("metric"))
                            n_reused += 1
                            echo(f"[sweep] {name}: finished before ({metric} = {prev.get('metric')}), skipped")
                            continue
                        if any(t.name == name for t in running.values()):
                            proposer.tell(params, None)  # a sampler proposed a running point again
                            continue
                        tdir = out_dir / "trials" / name
                        if prev or tdir.exists():  # a failed, interrupted or stale attempt: start clean
                            shutil.rmtree(tdir, ignore_errors=True)
                        trial = make_trial(params)
                        attempts = int(prev.get("attempts", 0)) + 1
                        state.update(name, {"params": trial.params, "status": "running", "exit_code": None,
                                            "metric": None, "error": "", "exp_dir": f"trials/{name}",
                                            "command": trial.command, "attempts": attempts,
                                            "started": time.time(), "ended": None, "seconds": None}, trial.dir)
                        echo(f"[sweep] {name}: started (log: {trial.dir / 'log.txt'})")
                        running[pool.submit(_run_trial, trial, metric, procs)] = trial
                        n_run += 1
                    if not running:
                        break
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for fut in done:
                        trial = running.pop(fut)
                        rec = fut.result()
                        state.update(trial.name, rec, trial.dir)
                        proposer.tell({k: trial.params[k] for k in swept}, rec.get("metric"))
                        if rec["status"] == "finished":
                            echo(f"[sweep] {trial.name}: finished in {rec['seconds']:.0f} s, {metric} = {rec.get('metric')}")
                        else:
                            last = (rec.get("error") or "").strip().splitlines()
                            echo(f"[sweep] {trial.name}: FAILED ({last[0] if last else '?'}): "
                                 f"{last[-1] if len(last) > 1 else ''}  -- see {trial.dir / 'log.txt'}")
            except KeyboardInterrupt:
                echo("[sweep] interrupted: stopping the running trials (they checkpoint first) ...")
                with procs.lock:
                    procs.stopping = True
                procs.signal_all(signal.SIGINT)
                deadline = time.time() + 60
                while running and time.time() < deadline:
                    done, _ = wait(list(running), timeout=1.0)
                    for fut in done:
                        trial = running.pop(fut)
                        rec = fut.result()
                        if rec["status"] == "failed":
                            rec["error"] = "interrupted; " + (rec.get("error") or "")
                        state.update(trial.name, rec, trial.dir)
                if running:
                    procs.signal_all(signal.SIGKILL)
                raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    echo(f"[sweep] {cfg['name']}: {n_run} trial(s) run, {n_reused} re-used, in {time.time() - t_start:.0f} s")
    use_wandb = summary_run if summary_run is not None else trial_args.get("wandb_mode") != "disabled"
    return write_summary(out_dir, echo=echo, wandb_run=use_wandb, project=cfg.get("project") or "protowatch")


# ----------------------------------------------------------------------------------------------
# the summary: table, CSV, Markdown, heatmaps, W&B sweep-summary run
# ----------------------------------------------------------------------------------------------
def summarize_sweep(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One plain dict per trial (no pandas): trial, status, the swept parameters, the sweep
    metric, eval values, final prototype health, health counts, seconds and error."""
    return sweep_rows(out_dir)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _safe(metric: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in metric)


def write_summary(out_dir: str | os.PathLike, echo: Callable[[str], None] = print, wandb_run: bool = True,
                  project: str = "protowatch") -> list[dict[str, Any]]:
    """Print the table, write ``summary.csv``, ``summary.md`` and ``heatmap_<metric>.png`` into
    ``out_dir``, and (``wandb_run``) log them to a W&B offline run of job type sweep-summary."""
    out_dir = Path(out_dir)
    state = read_sweep_state(out_dir)
    rows = summarize_sweep(out_dir)
    metric = (state.get("metric") or DEFAULT_METRIC)["name"]
    goal = (state.get("metric") or DEFAULT_METRIC).get("goal", "minimize")
    if not rows:
        echo("[sweep] no trials")
        return rows
    columns = [c for c in rows[0] if c != "error"] + ["error"]
    shown = [{c: (r.get(c) if c != "error" else (str(r.get("error") or "").strip().splitlines() or [""])[-1][:120])
              for c in columns} for r in rows]

    # printed table and Markdown
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in shown)) for c in columns if c != "error"}
    lines = ["  ".join(c.ljust(widths[c]) for c in widths), "  ".join("-" * widths[c] for c in widths)]
    lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in widths) for r in shown]
    echo("\n".join(lines))
    md = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    md += ["| " + " | ".join(_cell(r[c]).replace("|", "\\|") for c in columns) + " |" for r in shown]
    done = [r for r in rows if r["status"] == "finished" and r.get(metric) is not None]
    if done:
        best = (min if goal == "minimize" else max)(done, key=lambda r: r[metric])
        md += ["", f"Best ({goal} {metric}): **{best['trial']}** with {_cell(best[metric])}"]
        echo(f"best ({goal} {metric}): {best['trial']} = {_cell(best[metric])}")
    (out_dir / "summary.md").write_text("\n".join(md) + "\n")
    tmp = out_dir / ".summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    os.replace(tmp, out_dir / "summary.csv")

    # heatmaps: num_proto rows x output_dim columns (else the first two swept parameters)
    heatmaps: dict[str, Path] = {}
    axes = heatmap_axes(state, rows)
    if axes:
        rk, ck = axes
        for m in heatmap_metrics(metric):
            rv, cv, grid = heatmap_grid(rows, m, rk, ck, goal if m == metric else "minimize")
            path = out_dir / f"heatmap_{_safe(m)}.png"
            render_heatmap(rv, cv, grid, m, rk, ck, title=f"{m}{' (sweep metric)' if m == metric else ' (final)'}",
                           path=path)
            heatmaps[m] = path
        echo(f"[sweep] wrote {out_dir / 'summary.csv'}, summary.md and {len(heatmaps)} heatmaps")
    if wandb_run:
        try:
            _log_summary_run(out_dir, state, rows, columns, heatmaps, project)
        except Exception as exc:  # the summary files exist already; W&B is a copy
            echo(f"[sweep] could not log the sweep-summary W&B run: {type(exc).__name__}: {exc}")
    return rows


def _log_summary_run(out_dir: Path, state: Mapping[str, Any], rows: list[dict[str, Any]], columns: list[str],
                     heatmaps: Mapping[str, Path], project: str) -> None:
    import wandb

    name = str(state.get("name") or out_dir.name)
    run = wandb.init(project=project, dir=str(out_dir), group=name, job_type="sweep-summary",
                     name=f"{name}-summary", mode="offline",
                     config={"sweep": name, "method": state.get("method"), "metric": state.get("metric")},
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        data = [[(r.get(c) if not isinstance(r.get(c), float) or math.isfinite(r.get(c)) else None)
                 if c != "error" else (str(r.get("error") or "").strip().splitlines() or [""])[-1][:200]
                 for c in columns] for r in rows]
        payload: dict[str, Any] = {"sweep/trials": wandb.Table(columns=columns, data=data)}
        for m, p in heatmaps.items():
            payload[f"sweep/heatmap/{m}"] = wandb.Image(str(p), caption=m)
        run.log(payload)
        metric = (state.get("metric") or DEFAULT_METRIC)["name"]
        goal = (state.get("metric") or DEFAULT_METRIC).get("goal", "minimize")
        done = [r for r in rows if r["status"] == "finished" and r.get(metric) is not None]
        run.summary["sweep/trials"] = len(rows)
        run.summary["sweep/failed"] = sum(r["status"] == "failed" for r in rows)
        if done:
            best = (min if goal == "minimize" else max)(done, key=lambda r: r[metric])
            run.summary["sweep/best_trial"] = best["trial"]
            run.summary[f"sweep/best/{metric}"] = best[metric]
    finally:
        run.finish()


# ----------------------------------------------------------------------------------------------
# W&B mode
# ----------------------------------------------------------------------------------------------
NO_KEY_MESSAGE = ("a W&B sweep (--wandb) needs a W&B account and network: run `wandb login` first "
                  "(or set WANDB_API_KEY), or drop --wandb for an offline local sweep")


def _wandb_api_key() -> Optional[str]:
    key = os.environ.get("WANDB_API_KEY")
    if key:
        return key
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "identity-token"
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth

        return read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    except Exception:
        return None


def registered_config(cfg: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """The configuration registered with W&B: the file's, with the command wrapped by the
    per-trial launcher (own exp_dir per W&B run) and the sweep's group and online mode as
    ``{value: ...}`` parameters."""
    reg = {k: v for k, v in cfg.items() if k in SWEEP_KEYS}
    params = dict(reg["parameters"])
    params.setdefault("wandb_mode", {"value": "online"})
    params.setdefault("progress", {"value": False})
    params["wandb_group"] = {"value": str(cfg["name"])}
    reg["parameters"] = params
    inner = [str(c) for c in cfg.get("command", DEFAULT_COMMAND)]
    style = "plain" if "${args_no_hyphens}" in inner else ("hyphens" if "${args}" in inner else "none")
    reg["command"] = ["${env}", "${interpreter}", "-m", "pipeline.sweep", "--trial-root", str(out_dir),
                      "--arg-style", style, "--", *inner]
    return reg


def run_wandb_sweep(file: str | os.PathLike, out: Optional[str | os.PathLike], workers: int = 1,
                    count: Optional[int] = None, echo: Callable[[str], None] = print) -> int:
    """Register the sweep with W&B and run ``workers`` agents here (needs `wandb login`)."""
    cfg = load_sweep(file)
    if not _wandb_api_key():
        raise SweepError(NO_KEY_MESSAGE)
    import wandb

    out_dir = Path(out) if out is not None else default_out(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    project = cfg.get("project") or "protowatch"
    sweep_id = wandb.sweep(registered_config(cfg, out_dir), project=project, entity=cfg.get("entity"))
    path = f"{cfg['entity']}/{project}/{sweep_id}" if cfg.get("entity") else f"{project}/{sweep_id}"
    echo(f"[sweep] registered W&B sweep {path}; more machines join with: wandb agent {path}")
    exe = str(Path(sys.executable).with_name("wandb"))
    cmds = [[exe, "agent", *(["--count", str(count)] if count else []), path] for _ in range(workers)]
    agents = [subprocess.Popen(c) for c in cmds]
    try:
        rc = max(a.wait() for a in agents)
    except KeyboardInterrupt:
        for a in agents:
            a.send_signal(signal.SIGINT)
        for a in agents:
            a.wait()
        raise
    write_summary(out_dir, echo=echo, wandb_run=False)
    return rc


def _trial_launcher(argv: Sequence[str]) -> int:
    """``python -m pipeline.sweep --trial-root DIR -- COMMAND...``: run one W&B-agent trial with its
    own ``exp_dir`` (DIR/trials/<W&B run id>), log and status.json (the command W&B registers)."""
    p = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=_trial_launcher.__doc__)
    p.add_argument("--trial-root", required=True, help="the sweep directory; the trial runs in trials/<run id>")
    p.add_argument("--arg-style", choices=("plain", "hyphens", "none"), default="plain",
                   help="how exp_dir is added: exp_dir=X (plain), --exp_dir=X (hyphens), or not at all")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the trial's command")
    args = p.parse_args(argv)
    cmd = list(args.command[1:] if args.command[:1] == ["--"] else args.command)
    if not cmd:
        p.error("no command after --")
    run_id = os.environ.get("WANDB_RUN_ID") or time.strftime("local-%Y%m%d-%H%M%S")
    tdir = Path(args.trial_root) / "trials" / run_id
    tdir.mkdir(parents=True, exist_ok=True)
    if args.arg_style != "none":
        cmd.append(f"{'--' if args.arg_style == 'hyphens' else ''}exp_dir={tdir.resolve()}")
    params: dict[str, Any] = {}
    ppath = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if ppath and Path(ppath).is_file():
        try:
            raw = yaml.safe_load(Path(ppath).read_text()) or {}
            params = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in raw.items()
                      if k not in ("wandb_version", "_wandb")}
        except (OSError, yaml.YAMLError):
            params = {}
    status_path = tdir / "status.json"
    rec: dict[str, Any] = {"name": run_id, "params": params, "status": "running", "exp_dir": str(tdir.resolve()),
                           "command": cmd, "started": time.time()}
    atomic_write_json(status_path, rec)
    with open(tdir / "log.txt", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    rec.update(exit_code=rc, ended=time.time(), seconds=round(time.time() - rec["started"], 2),
               status="finished" if rc == 0 else "failed",
               error="" if rc == 0 else f"exit code {rc}; end of log.txt:\n{_log_tail(tdir / 'log.txt')}")
    atomic_write_json(status_path, rec)
    sys.stdout.write(_log_tail(tdir / "log.txt", 5) + "\n")
    return rc


# ----------------------------------------------------------------------------------------------
# command line (called by pipeline/cli.py)
# ----------------------------------------------------------------------------------------------
def run_sweep_cli(args: argparse.Namespace) -> int:
    """``python -m pipeline sweep FILE [--workers N] [--out DIR] [--wandb] [--count N]``."""
    try:
        if args.wandb:
            return run_wandb_sweep(args.file, args.out, workers=args.workers, count=args.count)
        rows = run_sweep(args.file, args.out, workers=args.workers, count=args.count)
    except KeyboardInterrupt:
        print("sweep interrupted; launch the same command again to run what is missing", file=sys.stderr)
        return 130
    failed = [r for r in rows if r["status"] != "finished"]
    if failed:
        print(f"{len(failed)} of {len(rows)} trial(s) did not finish: see their log.txt; "
              "launch the same command again to re-run only those", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(_trial_launcher(sys.argv[1:]))
