"""One trial: its name, its command line (expanded as ``wandb agent`` expands it), and running
it as a process of its own whose status record comes back."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from monitors.formats.records import RECORDS_DIR
from monitors.formats.sweep_state import TRIAL_LOG, trial_metric

from .spec import SweepError, params_key

LOG_TAIL_LINES = 25


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
        digest = hashlib.sha1(params_key({k: params[k] for k in swept}).encode()).hexdigest()[:8]
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


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    """The last ``n`` lines of a trial's log ("" when it cannot be read)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


@dataclass
class Trial:
    name: str
    params: dict[str, Any]
    dir: Path
    command: list[str] = field(default_factory=list)
    attempts: int = 1  # this launch included
    env: dict[str, str] = field(default_factory=dict)  # added to the sweep's environment (threads, devices)
    slice: Optional[str] = None  # its CUDA_VISIBLE_DEVICES while it runs


class TrialProcesses:
    """The trial processes alive now, so that Ctrl-C / SIGTERM reach them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def signal_all(self, sig: int) -> None:
        with self.lock:
            for p in self.procs.values():
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)  # the trial and anything it started (own session)
                    except (ProcessLookupError, PermissionError):
                        pass


def run_trial(t: Trial, metric: str, procs: TrialProcesses) -> dict[str, Any]:
    """Run one trial to its end; returns its status record."""
    t.dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log_path = t.dir / TRIAL_LOG
    env = dict(os.environ, PYTHONUNBUFFERED="1", **t.env)  # the trial's share of threads and devices
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
        rec.update(status="failed", metric=None, error=f"{why}; end of {log_path.name}:\n{log_tail(log_path)}")
    return rec
