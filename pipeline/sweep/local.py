"""The local sweep: propose trials, run ``--workers`` of them at once as processes, record each
one's status as it ends, re-use the trials an earlier launch finished, and stop the running ones
cleanly on Ctrl-C / SIGTERM."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from monitors.formats.sweep_state import TRIAL_LOG, TRIALS_DIR, SweepStateWriter

from .budget import available_cores, thread_env, trial_budget
from .devices import SlicePool, gpu_slices, parse_gpus, torchrun_command
from .proposers import make_proposer
from .spec import (DEFAULT_COMMAND, TRIAL_DEFAULTS, SweepError, constants, default_out, load_sweep, params_key,
                   swept_names, trial_count)
from .summary import write_summary
from .trial import Trial, TrialProcesses, build_command, run_trial, trial_name

#: seconds the running trials get to checkpoint and exit after Ctrl-C before they are killed
INTERRUPT_GRACE_S = 60


def run_sweep(file: str | os.PathLike, out: Optional[str | os.PathLike] = None, workers: Optional[int] = None,
              count: Optional[int] = None, echo: Callable[[str], None] = print,
              summary_run: Optional[bool] = None, gpus: Optional[str] = None, gpus_per_trial: int = 1,
              nproc_per_trial: Optional[int] = None) -> list[dict[str, Any]]:
    """Run a sweep file locally (see :mod:`pipeline.sweep`); returns the summary rows.

    ``gpus`` (``"0,1,2,3"`` or ``"all"``) is cut into slices of ``gpus_per_trial`` GPUs, one per
    running trial (``workers`` defaults to the number of slices); a trial of several processes
    (``gpus_per_trial`` > 1, or ``nproc_per_trial`` on CPU) runs under torchrun.
    ``summary_run``: log the sweep summary to a W&B offline run (default: unless the trials'
    ``wandb_mode`` is ``disabled``)."""
    cfg = load_sweep(file)
    slices = gpu_slices(parse_gpus(gpus), gpus_per_trial) if gpus is not None else None
    if gpus is None and gpus_per_trial != 1:
        raise SweepError(f"--gpus-per-trial {gpus_per_trial} needs --gpus (e.g. --gpus all); "
                         "on CPU use --nproc-per-trial")
    nproc = trial_procs(gpus_per_trial if slices else 1, nproc_per_trial)
    workers = workers if workers is not None else (len(slices) if slices else 1)
    if not isinstance(workers, int) or workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    if slices and workers > len(slices):
        raise SweepError(f"--workers {workers} is more than the {len(slices)} slice(s) of {gpus_per_trial} GPU(s) "
                         f"that --gpus {gpus} holds: use --workers {len(slices)} or fewer")
    count = trial_count(cfg, count)
    out_dir = Path(out) if out is not None else default_out(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    launch = LocalLaunch(cfg, file, out_dir, workers, count, echo, slices=slices, nproc=nproc)
    if cfg.get("early_terminate"):
        echo(f"note: early_terminate ({cfg['early_terminate'].get('type', '?')}) is used only by W&B agents (--wandb); "
             "locally every trial runs to its end")
    t_start = time.time()
    with _sigterm_raises_interrupt():
        launch.run()
    echo(f"[sweep] {cfg['name']}: {launch.n_run} trial(s) run, {launch.n_reused} re-used, "
         f"in {time.time() - t_start:.0f} s")
    use_wandb = summary_run if summary_run is not None else launch.trial_args.get("wandb_mode") != "disabled"
    return write_summary(out_dir, echo=echo, wandb_run=use_wandb, project=cfg.get("project") or "protowatch")


def trial_procs(gpus_per_trial: int, nproc_per_trial: Optional[int]) -> int:
    """Processes per trial: ``--gpus-per-trial`` on GPUs, else ``--nproc-per-trial`` (CPU, gloo)."""
    if nproc_per_trial is None:
        return gpus_per_trial
    if nproc_per_trial < 1:
        raise SweepError(f"--nproc-per-trial must be >= 1, got {nproc_per_trial}")
    if gpus_per_trial > 1 and nproc_per_trial != gpus_per_trial:
        raise SweepError(f"--nproc-per-trial {nproc_per_trial} with --gpus-per-trial {gpus_per_trial}: a GPU trial "
                         "runs one process per GPU; drop --nproc-per-trial")
    return nproc_per_trial


@contextlib.contextmanager
def _sigterm_raises_interrupt() -> Iterator[None]:
    """SIGTERM is handled as Ctrl-C while the sweep runs (main thread only)."""
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt
        old_handler = signal.signal(signal.SIGTERM, _on_term)
    try:
        yield
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


class LocalLaunch:
    """One launch of a local sweep on ``out_dir``; the main thread is the only one that touches
    the proposer and the sweep state, the pool's threads only wait for trial processes."""

    def __init__(self, cfg: Mapping[str, Any], file: str | os.PathLike, out_dir: Path, workers: int,
                 count: Optional[int], echo: Callable[[str], None], slices: Optional[list[str]] = None,
                 nproc: int = 1) -> None:
        self.cfg, self.out_dir, self.workers, self.echo = cfg, out_dir, workers, echo
        self.slices = SlicePool(slices) if slices else None
        self.nproc = nproc
        self.metric = cfg["metric"]["name"]
        self.swept = swept_names(cfg)
        self.fixed = constants(cfg)
        self.trial_args = {**TRIAL_DEFAULTS, **self.fixed}
        self.command = cfg.get("command", DEFAULT_COMMAND)
        self.proposer = make_proposer(cfg, count)
        self.budget = trial_budget(workers, self.fixed, self.command, procs=nproc,
                                   threads_named="threads" in cfg["parameters"])
        if not self.budget.threads_from_file:  # the sweep's share beats the trial config's `threads`
            self.trial_args["threads"] = self.budget.threads
        self.state = SweepStateWriter(out_dir, {"name": cfg["name"], "file": str(file), "method": cfg["method"],
                                                "metric": cfg["metric"], "swept": self.swept})
        self.procs = TrialProcesses()
        self.running: dict[Future, Trial] = {}
        self.exhausted = False
        self.n_run = self.n_reused = 0

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Keep ``workers`` trials running until the proposer has no more, then wait for the last."""
        self.echo(f"[sweep] {self.cfg['name']}: {self.workers} trial(s) at once on {available_cores()} "
                  f"core(s); {self.budget.describe(self.devices_text())}")
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="trial") as pool:
            try:
                while True:
                    self.fill(pool)
                    if not self.running:
                        break
                    done, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
                    for fut in done:
                        self.record(fut)
            except KeyboardInterrupt:
                self.interrupt()
                raise

    def devices_text(self) -> str:
        """The devices of each trial, for the log."""
        if self.slices is None:
            return "cpu" + (f" ({self.nproc} processes under torchrun, gloo)" if self.nproc > 1 else "")
        return (f"one CUDA_VISIBLE_DEVICES slice each of {' | '.join(self.slices.free)}"
                + (f" ({self.nproc} processes under torchrun)" if self.nproc > 1 else ""))

    def fill(self, pool: ThreadPoolExecutor) -> None:
        """Start proposed trials until ``workers`` run or the proposer is exhausted."""
        while not self.exhausted and len(self.running) < self.workers:
            params = self.proposer.ask()
            if params is None:
                self.exhausted = True
                return
            trial = self.prepare(params)
            if trial is not None:
                self.start(pool, trial)

    def prepare(self, params: dict[str, Any]) -> Optional[Trial]:
        """The trial to run for ``params``, in a clean directory; None when an earlier launch
        finished it with the same parameters (its result is re-used) or it is running now."""
        name = trial_name(params, self.swept)
        prev = self.state.trial(name)
        if prev.get("status") == "finished" and params_key(prev.get("params") or {}) == params_key({**self.fixed, **params}):
            self.proposer.tell(params, prev.get("metric"))
            self.n_reused += 1
            self.echo(f"[sweep] {name}: finished before ({self.metric} = {prev.get('metric')}), skipped")
            return None
        if any(t.name == name for t in self.running.values()):
            self.proposer.tell(params, None)  # a sampler proposed a running point again
            return None
        tdir = self.out_dir / TRIALS_DIR / name
        if prev or tdir.exists():  # a failed, interrupted or stale attempt: start clean
            shutil.rmtree(tdir, ignore_errors=True)
        trial = self.make_trial(params)
        trial.attempts = int(prev.get("attempts", 0)) + 1
        return trial

    def make_trial(self, params: dict[str, Any]) -> Trial:
        """The trial's directory and command line (the sweep's own arguments added)."""
        name = trial_name(params, self.swept)
        tdir = self.out_dir / TRIALS_DIR / name
        args = {**self.trial_args, **params, "exp_dir": str(tdir.resolve()), "wandb_group": str(self.cfg["name"]),
                "wandb_name": name}
        tdir.mkdir(parents=True, exist_ok=True)
        cmd = build_command(self.command, args, self.cfg.get("program"), args_json_file=tdir / "args.json")
        if self.nproc > 1:
            cmd = torchrun_command(cmd, self.nproc)
        threads = args.get("threads") or self.budget.cores  # a swept `threads`: this trial's value
        return Trial(name, {**self.fixed, **params}, tdir, cmd, env=thread_env(threads))

    def start(self, pool: ThreadPoolExecutor, trial: Trial) -> None:
        """Mark the trial running in the sweep state and start its process (on a free GPU slice)."""
        if self.slices is not None:
            trial.slice = self.slices.take()
            trial.env["CUDA_VISIBLE_DEVICES"] = trial.slice
        self.state.update(trial.name, {"params": trial.params, "status": "running", "exit_code": None,
                                       "metric": None, "error": "", "exp_dir": f"{TRIALS_DIR}/{trial.name}",
                                       "command": trial.command, "attempts": trial.attempts,
                                       "started": time.time(), "ended": None, "seconds": None,
                                       "devices": trial.slice or "cpu"}, trial.dir)
        self.echo(f"[sweep] {trial.name}: started{f' on GPU(s) {trial.slice}' if trial.slice else ''} "
                  f"(log: {trial.dir / TRIAL_LOG})")
        self.running[pool.submit(run_trial, trial, self.metric, self.procs)] = trial
        self.n_run += 1

    def record(self, fut: Future) -> None:
        """A trial ended: write its status, tell the proposer its metric, say how it went."""
        trial = self.running.pop(fut)
        self.release(trial)
        rec = fut.result()
        self.state.update(trial.name, rec, trial.dir)
        self.proposer.tell({k: trial.params[k] for k in self.swept}, rec.get("metric"))
        if rec["status"] == "finished":
            self.echo(f"[sweep] {trial.name}: finished in {rec['seconds']:.0f} s, {self.metric} = {rec.get('metric')}")
        else:
            last = (rec.get("error") or "").strip().splitlines()
            self.echo(f"[sweep] {trial.name}: FAILED ({last[0] if last else '?'}): "
                      f"{last[-1] if len(last) > 1 else ''}  -- see {trial.dir / TRIAL_LOG}")

    def release(self, trial: Trial) -> None:
        """The trial ended (however): its GPU slice is free again."""
        if self.slices is not None:
            self.slices.give_back(trial.slice)
            trial.slice = None

    def interrupt(self) -> None:
        """Ctrl-C / SIGTERM: SIGINT to the running trials (they checkpoint first), their status
        recorded as they end; whatever still runs after the grace period is killed."""
        self.echo("[sweep] interrupted: stopping the running trials (they checkpoint first) ...")
        with self.procs.lock:
            self.procs.stopping = True
        self.procs.signal_all(signal.SIGINT)
        deadline = time.time() + INTERRUPT_GRACE_S
        while self.running and time.time() < deadline:
            done, _ = wait(list(self.running), timeout=1.0)
            for fut in done:
                trial = self.running.pop(fut)
                self.release(trial)
                rec = fut.result()
                if rec["status"] == "failed":
                    rec["error"] = "interrupted; " + (rec.get("error") or "")
                self.state.update(trial.name, rec, trial.dir)
        if self.running:
            self.procs.signal_all(signal.SIGKILL)
