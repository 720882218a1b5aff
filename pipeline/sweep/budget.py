"""The share of the machine each trial of a local sweep gets: torch threads, data workers and
devices, decided once by the sweep and stated in its log before the first trial starts.

Why the sweep decides and not the trial's config: a config written for one run on the whole
machine (``experiments/sdpn_tiny.yaml`` sets ``threads: 2``) oversubscribes the cores when N
trials run at once (two trials x 2 threads on 2 cores ran 13x slower than one trial alone). So
each trial gets ``threads`` = its share of the cores, passed as the ``threads=`` argument (it
beats the config's key) and as ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, unless the sweep file
names ``threads`` as a parameter (then the file is obeyed and only the environment follows it).

What counts against the share: the trial's DataLoader workers (``num_workers``, each a process
with a busy core of its own) come out of it, and a trial of P processes (``torchrun``) splits it
among them. The t-SNE worker does not count: it is one process niced to 19 (the kernel runs it
on cycles the trials leave idle) and single-threaded, computing a frame every few hundred steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ..config import config_file_values


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class TrialBudget:
    """What each trial gets: ``threads`` torch threads per process, ``data_workers`` DataLoader
    workers (from the trial's config), ``procs`` processes, ``cores`` its share of the cores."""
    cores: int
    threads: Optional[int]  # None: the sweep file sweeps it
    data_workers: int
    procs: int = 1
    threads_from_file: bool = False

    def describe(self, devices: str = "cpu") -> str:
        """One line for the sweep's log."""
        src = "set by the sweep file" if self.threads_from_file else "the trial's share"
        shown = "swept" if self.threads is None else self.threads
        line = (f"each trial gets {self.cores} core(s): threads={shown} per process ({src}), "
                f"num_workers={self.data_workers} data worker(s), {self.procs} process(es), devices: {devices}")
        used = self.procs * ((self.threads or 1) + self.data_workers)
        if used > self.cores:
            line += (f"; WARNING: {used} busy threads on {self.cores} core(s) oversubscribe them: "
                     "lower --workers, threads or num_workers")
        return line


def config_value(command: Sequence[Any], params: Mapping[str, Any], key: str, default: Any) -> Any:
    """The value of ``key`` a trial will train with: its sweep parameter, else the one in the
    ``--config FILE`` of its command, else ``default``."""
    if key in params:
        return params[key]
    cmd = [str(c) for c in command]
    for i, c in enumerate(cmd):
        path = cmd[i + 1] if c == "--config" and i + 1 < len(cmd) else (c[9:] if c.startswith("--config=") else None)
        if path:
            try:  # the config as the trial reads it (a `base` file included)
                return config_file_values(path).get(key, default)
            except (OSError, ValueError):  # not a pipeline config: the trial reports it itself
                return default
    return default


def trial_budget(workers: int, params: Mapping[str, Any], command: Sequence[Any], procs: int = 1,
                 cores: Optional[int] = None, threads_named: bool = False) -> TrialBudget:
    """The budget of each of ``workers`` trials run at once, of ``procs`` processes each.

    ``params``: the sweep file's fixed parameters; ``threads_named``: the file names ``threads``
    as a parameter (fixed or swept), which is then obeyed."""
    cores = cores or available_cores()
    share = max(1, cores // workers)
    data_workers = int(config_value(command, params, "num_workers", 0) or 0)
    if threads_named or "threads" in params:
        fixed = params.get("threads")
        return TrialBudget(share, None if fixed is None else int(fixed), data_workers, procs, threads_from_file=True)
    per_proc = max(1, share // procs)
    threads = max(1, per_proc - data_workers)
    return TrialBudget(share, threads, data_workers, procs)


def thread_env(threads: int) -> dict[str, str]:
    """The environment that caps a process's BLAS/OpenMP pools at ``threads``."""
    n = str(max(1, int(threads)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}
