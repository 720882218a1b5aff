"""One trial as one submitit job (``--launcher slurm``): what the job asks for
(:class:`SlurmOptions`, from the command line), the executor that submits it (Slurm's, or
submitit's local executor standing in for it), and the job's callable (:class:`SubmititTrial`),
which runs the trial's command on the node and, when Slurm signals a preemption or the time
limit, stops it with SIGTERM (the pipeline writes a checkpoint) and has submitit requeue it
with ``resume=true``. The controller that submits and watches the jobs is :mod:`.slurm`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from monitors.formats.sweep_state import STATUS_FILE, TRIAL_LOG, write_status

from .budget import thread_env
from .devices import torchrun_command
from .spec import SweepError
from .trial import log_tail

try:  # optional: only --launcher slurm needs it, and says so when it is missing
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - exercised by a test that hides submitit
    submitit = None

    class Checkpointable:  # type: ignore[no-redef]
        """Stands in for submitit.helpers.Checkpointable when submitit is not installed."""

#: seconds the trial gets to write its checkpoint after SIGTERM, before the job is requeued anyway
CHECKPOINT_GRACE_S = 120
#: seconds before the time limit at which Slurm signals the job (USR2) so that it can checkpoint
SIGNAL_DELAY_S = 180
RDZV_PORT = 29500
SUBMITIT_DIR = "submitit"
CLUSTERS = ("slurm", "local")
NOT_INSTALLED = ("--launcher slurm needs submitit: pip install submitit==1.5.4 (or the [sweeps] extra); "
                 "nothing was started")


def parse_time(text: str) -> int:
    """Slurm's time syntax (``MM``, ``HH:MM:SS``, ``D-HH:MM[:SS]``) in whole minutes (>= 1)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SweepError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS (Slurm's syntax)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if b is None:  # MM, or D-HH
        minutes = (days or 0) * 1440 + (a * 60 if days is not None else a)
    elif c is None:  # MM:SS, or D-HH:MM
        minutes = (days * 1440 + a * 60 + b) if days is not None else a + (1 if b else 0)
    else:
        minutes = (days or 0) * 1440 + a * 60 + b + (1 if c else 0)
    if minutes < 1:
        raise SweepError(f"--time {text!r}: a job needs at least one minute")
    return minutes


@dataclass
class SlurmOptions:
    """What each trial's job asks for."""
    partition: str
    timeout_min: int = 60
    gpus_per_trial: int = 1
    nodes_per_trial: int = 1
    nproc_per_trial: int = 1
    cpus_per_gpu: Optional[int] = None
    cpus_per_trial: Optional[int] = None
    mem: Optional[str] = None
    extra: dict[str, str] = field(default_factory=dict)
    cluster: str = "slurm"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SlurmOptions":
        """From ``python -m pipeline sweep`` arguments; misuse is a one-line SweepError."""
        if not args.partition:
            raise SweepError("--launcher slurm needs --partition NAME (see `sinfo -s` for this cluster's partitions)")
        if args.cluster not in CLUSTERS:
            raise SweepError(f"unknown --cluster {args.cluster!r}: use slurm, or local (submitit's local executor)")
        if args.gpus is not None:
            raise SweepError("--gpus picks GPUs of this machine (--launcher local); with --launcher slurm, ask for "
                             "--gpus-per-trial and Slurm picks them")
        extra: dict[str, str] = {}
        for kv in args.slurm_arg or []:
            key, sep, value = kv.partition("=")
            if not sep or not key.strip():
                raise SweepError(f"--slurm-arg {kv!r}: expected KEY=VALUE, e.g. --slurm-arg account=abc")
            extra[key.strip().lstrip("-").replace("-", "_")] = value
        for name in ("gpus_per_trial", "nodes_per_trial"):
            if getattr(args, name) < (0 if name == "gpus_per_trial" else 1):
                raise SweepError(f"--{name.replace('_', '-')} must be >= {0 if name == 'gpus_per_trial' else 1}, "
                                 f"got {getattr(args, name)}")
        gpus = args.gpus_per_trial
        nproc = gpus if gpus >= 1 else (args.nproc_per_trial or 1)
        if args.nproc_per_trial is not None and gpus >= 1 and args.nproc_per_trial != gpus:
            raise SweepError(f"--nproc-per-trial {args.nproc_per_trial} with --gpus-per-trial {gpus}: a GPU trial "
                             "runs one process per GPU; drop --nproc-per-trial (or use --gpus-per-trial 0 on CPU)")
        if args.cluster == "local" and args.nodes_per_trial > 1:
            raise SweepError("--cluster local runs on this one machine: --nodes-per-trial must be 1")
        return cls(partition=args.partition, timeout_min=parse_time(args.time), gpus_per_trial=gpus,
                   nodes_per_trial=args.nodes_per_trial, nproc_per_trial=nproc, cpus_per_gpu=args.cpus_per_gpu,
                   cpus_per_trial=args.cpus_per_trial, mem=args.mem, extra=extra, cluster=args.cluster)

    def cpus(self) -> Optional[int]:
        """CPU cores of the job's one task per node."""
        if self.gpus_per_trial and self.cpus_per_gpu:
            return self.cpus_per_gpu * self.gpus_per_trial
        return self.cpus_per_trial


def make_executor(folder: Path, opts: SlurmOptions) -> Any:
    """submitit's executor for the trials' jobs: Slurm's, or the local one standing in for it."""
    if submitit is None:
        raise SweepError(NOT_INSTALLED)
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=opts.cluster)
    params: dict[str, Any] = dict(timeout_min=opts.timeout_min, nodes=opts.nodes_per_trial, tasks_per_node=1,
                                  stderr_to_stdout=True, slurm_partition=opts.partition,
                                  slurm_signal_delay_s=SIGNAL_DELAY_S)
    if opts.gpus_per_trial:
        params["gpus_per_node"] = opts.gpus_per_trial
    if opts.cpus():
        params["cpus_per_task"] = opts.cpus()
    if opts.mem:
        params["slurm_mem"] = opts.mem
    if opts.extra:
        params["slurm_additional_parameters"] = dict(opts.extra)
    ex.update_parameters(**params)
    return ex


# ----------------------------------------------------------------------------------------------
# on the node: the job's callable
# ----------------------------------------------------------------------------------------------
class SubmititTrial(Checkpointable):
    """The callable of one trial's job (checkpointable: submitit requeues it on preemption or
    timeout, and the requeued call resumes the trial from its checkpoint)."""

    def __init__(self, name: str, params: Mapping[str, Any], trial_dir: str, command: list[str],
                 resume_command: list[str], nproc: int, nodes: int, threads: int, resume: bool = False) -> None:
        self.name, self.params, self.trial_dir = name, dict(params), trial_dir
        self.command, self.resume_command = command, resume_command
        self.nproc, self.nodes, self.threads, self.resume = nproc, nodes, threads, resume
        self._proc: Optional[subprocess.Popen] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None}

    def _command(self, env: Any) -> list[str]:
        cmd = self.resume_command if self.resume else self.command
        if self.nodes > 1:  # torchrun's rendezvous on the job's first node, keyed by the job id
            rdzv = [f"--nnodes={self.nodes}", "--rdzv_backend=c10d", f"--rdzv_id={env.job_id}",
                    f"--rdzv_endpoint={env.hostnames[0]}:{RDZV_PORT}"]
            return torchrun_command(cmd, self.nproc, rdzv)
        return torchrun_command(cmd, self.nproc) if self.nproc > 1 else list(cmd)

    def _status(self, rec: Mapping[str, Any]) -> None:
        path = Path(self.trial_dir)
        old: dict[str, Any] = {}
        try:
            old = json.loads((path / STATUS_FILE).read_text())
        except (OSError, ValueError):
            pass
        write_status(path, {**old, "name": self.name, "params": self.params, **rec})

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        main = env.global_rank == 0
        tdir = Path(self.trial_dir)
        tdir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        attempts = 1
        if main:
            try:
                attempts = int(json.loads((tdir / STATUS_FILE).read_text()).get("attempts") or 0) + 1
            except (OSError, ValueError):
                pass
            self._status({"status": "running", "job_id": str(env.job_id), "host": socket.gethostname(),
                          "pid": os.getpid(), "attempts": attempts, "resumed": self.resume, "started": started,
                          "ended": None, "exit_code": None})
        cmd = self._command(env)
        with open(tdir / TRIAL_LOG, "a") as log:
            log.write(f"$ {' '.join(cmd)}   # job {env.job_id}, attempt {attempts}\n")
            log.flush()
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=dict(os.environ, PYTHONUNBUFFERED="1", **thread_env(self.threads)),
                                          start_new_session=True)
            rc = self._proc.wait()
        ended = time.time()
        rec: dict[str, Any] = {"exit_code": rc, "ended": ended, "seconds": round(ended - started, 2)}
        if rc == 0:
            rec.update(status="finished", error="")
        else:
            why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            rec.update(status="failed", error=f"{why}; end of {TRIAL_LOG}:\n{log_tail(tdir / TRIAL_LOG)}")
        if main:
            self._status(rec)
        return rec

    def checkpoint(self) -> Any:
        """Preempted or out of time: stop the trial (SIGTERM: it writes a checkpoint), then
        requeue this callable with ``resume=true``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=CHECKPOINT_GRACE_S)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self._status({"status": "pending", "error": "requeued after a preemption or the time limit; resumes "
                      "from its checkpoint", "ended": None})
        nxt = SubmititTrial(self.name, self.params, self.trial_dir, self.command, self.resume_command, self.nproc,
                            self.nodes, self.threads, resume=True)
        return submitit.helpers.DelayedSubmission(nxt)
