"""``--launcher slurm``: each trial is one Slurm job, submitted through submitit (no sbatch
templating here), and this process is a controller that can die and come back.

The controller proposes trials as the local sweep does, submits each as a job whose callable is
:class:`SubmititTrial`, records the job id in the sweep state, polls the jobs, and writes the
summary and heatmaps when every trial has ended. Launched again on the same ``--out``, it skips
the finished trials and re-attaches to the jobs still queued or running (their ids are in the
state) instead of submitting them twice.

A job runs the trial's command (under torchrun when it has several processes or nodes; several
nodes meet through torchrun's c10d rendezvous on the job's first node). Before a preemption or
the time limit, Slurm signals the job (submitit asks for ``USR2`` ``--signal`` seconds ahead);
submitit then calls :meth:`SubmititTrial.checkpoint`, which stops the trial with SIGTERM (the
pipeline writes a checkpoint and exits), and requeues the job with ``resume=true`` added: the
trial goes on from its checkpoint, not from step 0, under the same job id.

``--cluster local`` gives the same executor calls to submitit's local executor (jobs are
processes of this machine): the tests use it, and it is a dry run of a Slurm sweep.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from monitors.formats.records import RECORDS_DIR
from monitors.formats.sweep_state import STATUS_FILE, TRIAL_LOG, TRIALS_DIR, SweepStateWriter, trial_metric, write_status

from . import slurm_job
from .devices import torchrun_command
from .proposers import make_proposer
from .slurm_job import NOT_INSTALLED, SUBMITIT_DIR, SlurmOptions, SubmititTrial, make_executor
from .spec import (DEFAULT_COMMAND, TRIAL_DEFAULTS, SweepError, constants, default_out, load_sweep, params_key,
                   swept_names, trial_count)
from .summary import write_summary
from .trial import build_command, trial_name

#: seconds between two looks at the jobs
POLL_S = 10.0

# ----------------------------------------------------------------------------------------------
# the controller
# ----------------------------------------------------------------------------------------------
def job_alive(job: Any) -> bool:
    """Whether a job is queued or running. A job re-attached through the local executor has no
    process handle: its id is its controller's pid."""
    if getattr(job, "_process", "n/a") is None:
        try:
            os.kill(int(job.job_id), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
        try:  # a zombie is dead
            return Path(f"/proc/{int(job.job_id)}/stat").read_text().split()[2] != "Z"
        except OSError:
            return True
    return not job.done()


def run_slurm_sweep(file: str | os.PathLike, out: Optional[str | os.PathLike], opts: SlurmOptions,
                    workers: Optional[int] = None, count: Optional[int] = None,
                    echo: Callable[[str], None] = print, poll_s: float = POLL_S,
                    summary_run: Optional[bool] = None) -> list[dict[str, Any]]:
    """Run a sweep file as one job per trial; returns the summary rows when all have ended.
    ``workers``: at most this many jobs queued or running (default: no limit)."""
    if slurm_job.submitit is None:
        raise SweepError(NOT_INSTALLED)
    if opts.cluster == "slurm" and not shutil.which("srun"):
        raise SweepError("--launcher slurm: no Slurm here (srun is not on PATH): run the sweep on a login node of the "
                         "cluster, or add --cluster local for a dry run on this machine; nothing was started")
    cfg = load_sweep(file)
    if workers is not None and workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    count = trial_count(cfg, count)
    out_dir = Path(out) if out is not None else default_out(cfg)
    if opts.nproc_per_trial > 1 or opts.nodes_per_trial > 1:  # checked now: nothing may start otherwise
        torchrun_command(build_command(cfg.get("command", DEFAULT_COMMAND), {}, cfg.get("program")), 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(out_dir.resolve() / SUBMITIT_DIR, opts)
    launch = SlurmLaunch(cfg, file, out_dir, opts, executor, workers, count, echo, poll_s)
    t0 = time.time()
    try:
        launch.run()
    except KeyboardInterrupt:
        echo("[sweep] controller stopped; the jobs keep running: launch the same command again to re-attach")
        raise
    echo(f"[sweep] {cfg['name']}: {launch.n_submitted} job(s) submitted, {launch.n_attached} re-attached, "
         f"{launch.n_reused} re-used, in {time.time() - t0:.0f} s")
    use_wandb = summary_run if summary_run is not None else launch.trial_args.get("wandb_mode") != "disabled"
    return write_summary(out_dir, echo=echo, wandb_run=use_wandb, project=cfg.get("project") or "protowatch")


@dataclass
class _Flight:
    name: str
    params: dict[str, Any]
    dir: Path
    job: Any


class SlurmLaunch:
    """One launch of the controller on ``out_dir``."""

    def __init__(self, cfg: Mapping[str, Any], file: str | os.PathLike, out_dir: Path, opts: SlurmOptions,
                 executor: Any, workers: Optional[int], count: Optional[int], echo: Callable[[str], None],
                 poll_s: float) -> None:
        self.cfg, self.out_dir, self.opts, self.executor = cfg, out_dir, opts, executor
        self.workers, self.echo, self.poll_s = workers, echo, poll_s
        self.metric = cfg["metric"]["name"]
        self.swept = swept_names(cfg)
        self.fixed = constants(cfg)
        self.trial_args = {**TRIAL_DEFAULTS, **self.fixed}
        self.threads = int(self.fixed.get("threads") or max(1, (opts.cpus() or 1) // max(1, opts.nproc_per_trial)))
        if "threads" not in cfg["parameters"]:
            self.trial_args["threads"] = self.threads
        self.proposer = make_proposer(cfg, count)
        self.state = SweepStateWriter(out_dir, {"name": cfg["name"], "file": str(file), "method": cfg["method"],
                                                "metric": cfg["metric"], "swept": self.swept,
                                                "launcher": f"slurm ({opts.cluster})"})
        self.flights: list[_Flight] = []
        self.exhausted = False
        self.n_submitted = self.n_attached = self.n_reused = 0

    def run(self) -> None:
        o = self.opts
        self.echo(f"[sweep] {self.cfg['name']}: one {'Slurm' if o.cluster == 'slurm' else 'local submitit'} job per "
                  f"trial: partition {o.partition}, {o.timeout_min} min, {o.nodes_per_trial} node(s) x "
                  f"{o.gpus_per_trial} GPU(s), {o.nproc_per_trial} process(es) per node, cpus {o.cpus() or 'default'}, "
                  f"threads={self.trial_args.get('threads', 'from the file')} per process; jobs in "
                  f"{self.out_dir / SUBMITIT_DIR}")
        while True:
            self.fill()
            if not self.flights:
                break
            self.poll()
            if self.flights:
                time.sleep(self.poll_s)

    def fill(self) -> None:
        while not self.exhausted and (self.workers is None or len(self.flights) < self.workers):
            params = self.proposer.ask()
            if params is None:
                self.exhausted = True
                return
            self.prepare(params)

    def prepare(self, params: dict[str, Any]) -> None:
        """Re-use a finished trial, re-attach to its live job, or submit a job for it."""
        name = trial_name(params, self.swept)
        prev = self.state.trial(name)
        same = params_key(prev.get("params") or {}) == params_key({**self.fixed, **params})
        tdir = self.out_dir / TRIALS_DIR / name
        if any(f.name == name for f in self.flights):
            self.proposer.tell(params, None)
            return
        if same and prev.get("status") == "finished":
            self.proposer.tell(params, prev.get("metric"))
            self.n_reused += 1
            self.echo(f"[sweep] {name}: finished before ({self.metric} = {prev.get('metric')}), skipped")
            return
        if same and prev.get("job_id") and prev.get("status") in ("pending", "running"):
            job = self.reattach(str(prev["job_id"]))
            if job_alive(job):
                self.flights.append(_Flight(name, {**self.fixed, **params}, tdir, job))
                self.n_attached += 1
                self.echo(f"[sweep] {name}: re-attached to job {job.job_id}")
                return
            status = _read_status(tdir)
            if status.get("status") == "finished":  # it ended while no controller watched
                self.flights.append(_Flight(name, {**self.fixed, **params}, tdir, job))
                self.n_attached += 1
                return
        if prev or tdir.exists():  # a failed, lost or stale attempt: start clean
            shutil.rmtree(tdir, ignore_errors=True)
        self.submit(name, params, tdir, int(prev.get("attempts", 0)))

    def reattach(self, job_id: str) -> Any:
        """The executor's job object for ``job_id`` (submitted by an earlier controller)."""
        return self.executor._executor.job_class(self.executor.folder, job_id)

    def submit(self, name: str, params: dict[str, Any], tdir: Path, attempts: int) -> None:
        tdir.mkdir(parents=True, exist_ok=True)
        args = {**self.trial_args, **params, "exp_dir": str(tdir.resolve()), "wandb_group": str(self.cfg["name"]),
                "wandb_name": name}
        command = self.cfg.get("command", DEFAULT_COMMAND)
        cmd = build_command(command, args, self.cfg.get("program"), args_json_file=tdir / "args.json")
        resume_cmd = build_command(command, {**args, "resume": True}, self.cfg.get("program"),
                                   args_json_file=tdir / "args.json")
        threads = int(args.get("threads") or self.threads)
        call = SubmititTrial(name, {**self.fixed, **params}, str(tdir.resolve()), cmd, resume_cmd,
                             self.opts.nproc_per_trial, self.opts.nodes_per_trial, threads)
        rec = {"params": {**self.fixed, **params}, "status": "pending", "exit_code": None, "metric": None,
               "error": "", "exp_dir": f"{TRIALS_DIR}/{name}", "command": cmd, "attempts": attempts,
               "started": None, "ended": None, "seconds": None}
        write_status(tdir, {"name": name, **rec})
        self.executor.update_parameters(name=f"{self.cfg['name']}/{name}")
        job = self.executor.submit(call)
        self.state.update(name, {**rec, "job_id": str(job.job_id), "submitted": time.time()})
        self.flights.append(_Flight(name, {**self.fixed, **params}, tdir, job))
        self.n_submitted += 1
        self.echo(f"[sweep] {name}: submitted as job {job.job_id} (log: {tdir / TRIAL_LOG})")

    def poll(self) -> None:
        """Merge each job's status.json into the state; record the trials whose job ended."""
        for f in list(self.flights):
            status = _read_status(f.dir)
            alive = job_alive(f.job)
            if alive:  # pending or running (an ended trial is recorded once its job has ended too)
                keep = ("status", "attempts", "started", "host", "resumed", "error")
                upd = {k: status[k] for k in keep if k in status and status[k] != self.state.trial(f.name).get(k)
                       and status.get("status") in ("pending", "running")}
                if upd:
                    self.state.update(f.name, upd)
                    if "status" in upd or "attempts" in upd:
                        self.echo(f"[sweep] {f.name}: {status.get('status')} (job {f.job.job_id}, "
                                  f"attempt {status.get('attempts', 1)})")
                continue
            self.flights.remove(f)
            self.end(f, status)

    def end(self, f: _Flight, status: Mapping[str, Any]) -> None:
        rec = {k: status.get(k) for k in ("exit_code", "started", "ended", "seconds", "attempts", "resumed", "host")
               if k in status}
        if status.get("status") == "finished":
            value = trial_metric(f.dir / RECORDS_DIR, self.metric)
            rec.update(status="finished", metric=value,
                       error="" if value is not None else f"the trial exited 0 but logged no {self.metric}")
        else:
            err = status.get("error") if status.get("status") == "failed" else \
                f"job {f.job.job_id} ended without finishing the trial (cancelled, or killed by Slurm); " \
                f"see {self.out_dir / SUBMITIT_DIR / str(f.job.job_id)}"
            rec.update(status="failed", metric=None, error=err or "failed")
        self.state.update(f.name, rec)
        write_status(f.dir, {**_read_status(f.dir), **rec})
        self.proposer.tell({k: f.params[k] for k in self.swept}, rec.get("metric"))
        if rec["status"] == "finished":
            self.echo(f"[sweep] {f.name}: finished (job {f.job.job_id}), {self.metric} = {rec.get('metric')}")
        else:
            self.echo(f"[sweep] {f.name}: FAILED (job {f.job.job_id}): "
                      f"{(rec.get('error') or '').strip().splitlines()[0]} -- see {f.dir / TRIAL_LOG}")


def _read_status(tdir: Path) -> dict[str, Any]:
    try:
        return json.loads((tdir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
