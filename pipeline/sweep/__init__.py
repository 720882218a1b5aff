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
    ``${args_json}``, ``${args_json_file}``, ``${envvar:NAME}``), with more arguments added to
    its parameters: ``exp_dir=<DIR>/trials/<name>``, ``wandb_group=<sweep name>``,
    ``wandb_name=<name>``, ``threads=<share>``, ``wandb_mode=offline`` and ``progress=false``
    (the last three may be set otherwise by a ``{value: ...}`` parameter). ``<name>`` lists the swept parameters,
    e.g. ``num_proto=64,output_dim=32``, so the same parameters always land in the same directory.
    ``--workers N`` trials run at once, each on its share of the cores (:mod:`.budget`: the
    argument ``threads=`` cores / N less the config's ``num_workers``, and ``OMP_NUM_THREADS``
    to match, unless the file names ``threads`` as a parameter; the log says it before the first
    trial). A trial's stdout/stderr go to ``<trial>/log.txt``; its
    status (finished with the metric read from ``<trial>/records/summary.json``, or failed with its
    exit code and the end of its log) goes to ``<trial>/status.json`` and ``DIR/sweep_state.json``,
    both written atomically. A failed trial never stops the others. Launched again on the same
    ``--out``, the sweep skips the trials that finished with the same parameters and runs the
    failed or missing ones (a failed trial's directory is cleared first). At the end it prints the
    table, writes ``DIR/summary.csv``, ``DIR/summary.md``, ``DIR/heatmap_<metric>.png`` (the metric
    and prototype health: final ``proto/usage/perplexity_student``, ``proto/usage/dead``,
    ``proto/delta/drift``, and ``health/errors``; rows num_proto, columns output_dim, failed trials
    empty) and logs them to a W&B offline run of job type ``sweep-summary`` in the sweep's group.

GPUs and Slurm
    ``--gpus 0,1,2,3|all --gpus-per-trial G`` gives each running trial its own
    ``CUDA_VISIBLE_DEVICES`` slice (:mod:`.devices`); a trial of several processes
    (``G`` > 1, or ``--nproc-per-trial`` on CPU with gloo) runs under torchrun.
    ``--launcher slurm`` submits one job per trial through submitit (:mod:`.slurm`,
    :mod:`.slurm_job`): job ids in the sweep state, a relaunched controller re-attaches, a
    preempted trial is requeued and resumes from its checkpoint.

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

Modules
    ``spec`` (the sweep file: checking it, parameter kinds, the grid), ``budget`` (each trial's
    share of threads and data workers), ``devices`` (GPU slices, torchrun), ``slurm`` and
    ``slurm_job`` (one submitit job per trial), ``proposers`` (grid
    enumeration, Optuna ask/tell), ``trial`` (a trial's name, command and process), ``local``
    (the local launch loop), ``summary`` (table, CSV, Markdown, heatmaps, sweep-summary run),
    ``wandb_agent`` (W&B mode and the per-trial launcher), ``cli`` (``python -m pipeline sweep``).
    The sweep directory's format (state file, status files, summary rows) belongs to
    :mod:`monitors.formats.sweep_state`, the trials' records to :mod:`monitors.formats.records`.
"""
from __future__ import annotations

from monitors.dashboard import heatmap_grid

from .cli import run_sweep_cli
from .local import run_sweep
from .spec import (DEFAULT_COMMAND, METHODS, SWEEP_KEYS, TRIAL_DEFAULTS, TRIAL_OWNED, SweepError, constants,
                   default_out, grid_points, load_sweep, swept_names)
from .summary import write_summary
from .trial import build_command, trial_name
from .wandb_agent import NO_KEY_MESSAGE, registered_config, run_wandb_sweep

__all__ = ["load_sweep", "grid_points", "trial_name", "build_command", "run_sweep", "heatmap_grid",
           "write_summary", "registered_config", "run_sweep_cli", "run_wandb_sweep", "SweepError",
           "swept_names", "constants", "default_out", "SWEEP_KEYS", "METHODS", "DEFAULT_COMMAND",
           "TRIAL_DEFAULTS", "TRIAL_OWNED", "NO_KEY_MESSAGE"]
