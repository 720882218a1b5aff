"""W&B mode (``--wandb``): register the sweep file with W&B, run ``wandb agent`` processes here,
and the per-trial launcher (``python -m pipeline.sweep --trial-root DIR -- COMMAND...``) that the
registered command wraps each W&B run in."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

from monitors.formats.sweep_state import TRIAL_LOG, TRIALS_DIR, write_status

from .devices import gpu_slices, parse_gpus
from .spec import DEFAULT_COMMAND, SWEEP_KEYS, SweepError, default_out, load_sweep
from .summary import write_summary
from .trial import log_tail

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


def run_wandb_sweep(file: str | os.PathLike, out: Optional[str | os.PathLike], workers: Optional[int] = None,
                    count: Optional[int] = None, echo: Callable[[str], None] = print, gpus: Optional[str] = None,
                    gpus_per_trial: int = 1) -> int:
    """Register the sweep with W&B and run ``workers`` agents here (needs `wandb login`); with
    ``gpus``, one agent per slice of ``gpus_per_trial`` GPUs, each seeing only its slice.
    ``workers=0`` only registers it (the agents run elsewhere, e.g. as Slurm jobs)."""
    cfg = load_sweep(file)
    if workers is not None and workers < 0:
        raise SweepError(f"--workers must be >= 0 with --wandb (0: register only), got {workers}")
    slices = gpu_slices(parse_gpus(gpus), gpus_per_trial) if gpus is not None else \
        [None] * (1 if workers is None else workers)
    if gpus is not None and workers is not None:
        slices = slices[:workers]
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
    if not slices:
        echo(f"[sweep] no agent started here (--workers 0); each `wandb agent {path}` runs trials into {out_dir}")
        return 0
    cmd = [exe, "agent", *(["--count", str(count)] if count else []), path]
    agents = [subprocess.Popen(cmd, env=dict(os.environ, **({"CUDA_VISIBLE_DEVICES": s} if s else {})))
              for s in slices]
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


def _agent_params() -> dict[str, Any]:
    """The parameters W&B gave this run (``WANDB_SWEEP_PARAM_PATH``), {} when there are none."""
    ppath = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not (ppath and Path(ppath).is_file()):
        return {}
    try:
        raw = yaml.safe_load(Path(ppath).read_text()) or {}
        return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in raw.items()
                if k not in ("wandb_version", "_wandb")}
    except (OSError, yaml.YAMLError):
        return {}


def trial_launcher(argv: Sequence[str]) -> int:
    """``python -m pipeline.sweep --trial-root DIR -- COMMAND...``: run one W&B-agent trial with its
    own ``exp_dir`` (DIR/trials/<W&B run id>), log and status.json (the command W&B registers)."""
    p = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=trial_launcher.__doc__)
    p.add_argument("--trial-root", required=True, help="the sweep directory; the trial runs in trials/<run id>")
    p.add_argument("--arg-style", choices=("plain", "hyphens", "none"), default="plain",
                   help="how exp_dir is added: exp_dir=X (plain), --exp_dir=X (hyphens), or not at all")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the trial's command")
    args = p.parse_args(argv)
    cmd = list(args.command[1:] if args.command[:1] == ["--"] else args.command)
    if not cmd:
        p.error("no command after --")
    run_id = os.environ.get("WANDB_RUN_ID") or time.strftime("local-%Y%m%d-%H%M%S")
    tdir = Path(args.trial_root) / TRIALS_DIR / run_id
    tdir.mkdir(parents=True, exist_ok=True)
    if args.arg_style != "none":
        cmd.append(f"{'--' if args.arg_style == 'hyphens' else ''}exp_dir={tdir.resolve()}")
    rec: dict[str, Any] = {"name": run_id, "params": _agent_params(), "status": "running",
                           "exp_dir": str(tdir.resolve()), "command": cmd, "started": time.time()}
    write_status(tdir, rec)
    with open(tdir / TRIAL_LOG, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    rec.update(exit_code=rc, ended=time.time(), seconds=round(time.time() - rec["started"], 2),
               status="finished" if rc == 0 else "failed",
               error="" if rc == 0 else f"exit code {rc}; end of {TRIAL_LOG}:\n{log_tail(tdir / TRIAL_LOG)}")
    write_status(tdir, rec)
    sys.stdout.write(log_tail(tdir / TRIAL_LOG, 5) + "\n")
    return rc
