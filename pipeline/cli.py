"""Command line: ``python -m pipeline {train,evaluate,sweep,prepare} --help``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .config import ConfigError

DEFAULT_CONFIG = "experiments/sdpn_tiny.yaml"


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, [*args.overrides, *(["trust_pickle=true"] if args.trust_pickle else [])])
    result = train(cfg)
    if result.get("stopped_by", "").startswith("signal"):
        return 130
    print(json.dumps({k: v for k, v in result.items() if k != "findings"}, indent=1, default=str))
    return 3 if result.get("stopped_by", "").startswith("non-finite") else 0  # 3: on_nonfinite=stop


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate_checkpoint import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, data=args.data, device=args.device, trust_pickle=args.trust_pickle)
    print(json.dumps(res, indent=1))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep_cli

    return run_sweep_cli(args)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare_tree, prepare_voxceleb

    fn = prepare_voxceleb if args.layout == "voxceleb" else prepare_tree
    counts = fn(args.root, args.out, trials=args.trials)
    print(f"wrote {args.out}: {counts['utterances']} utterances, {counts['speakers']} speakers, "
          f"{counts['trials']} trials (wav.scp, utt2spk, spk2utt{', trials' if counts['trials'] else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description="Reference SDPN trainer with prototype monitors.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train SDPN", description=(
        "Train SDPN. Any config key can be overridden as key=value (checked against its type); "
        "see pipeline/config.py for every key and why its default is what it is."))
    t.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML run config (default: {DEFAULT_CONFIG})")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_proto=512 max_steps=100")
    t.add_argument("--trust-pickle", action="store_true",
                   help="with resume=true: also resume from a checkpoint that needs arbitrary pickle (code in "
                        "it runs when loaded; only for files from a trusted source). Same as trust_pickle=true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="EER and minDCF of a checkpoint",
                       description="Score the trials of a data directory with the checkpoint's teacher backbone (cosine).")
    e.add_argument("--checkpoint", required=True, help="path to a checkpoint.pt written by train")
    e.add_argument("--data", default=None, help="Kaldi dir with wav.scp, utt2spk, trials (default: the run's eval data)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--trust-pickle", action="store_true",
                   help="load a checkpoint that needs arbitrary pickle (code in it runs when loaded; only for "
                        "files from a trusted source). Without it, checkpoints load with weights_only=True")
    e.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("sweep", help="run a W&B-format sweep on this machine",
                       description="Run a sweep file in W&B's format: locally (offline, N workers) or as a W&B sweep agent (--wandb).")
    s.add_argument("file", help="sweep YAML, e.g. experiments/sweeps/num_proto_x_output_dim.yaml")
    s.add_argument("--workers", type=int, default=None,
                   help="trials run at once, each in its own process (default: 1; with --gpus, the slices that fit; "
                        "with --launcher slurm, every trial is queued at once)")
    s.add_argument("--out", default=None, help="directory of the sweep (one exp_dir per trial inside)")
    s.add_argument("--wandb", action="store_true", help="register the sweep with W&B and run an agent (one per GPU slice)")
    s.add_argument("--count", type=int, default=None, help="at most this many trials (random/bayes)")
    s.add_argument("--launcher", default="local", help="local (this machine, the default) or slurm (one job per trial, "
                                                       "through submitit)")
    s.add_argument("--gpus", default=None, help="GPUs for the trials on this machine: 0,1,2,3 or all")
    s.add_argument("--gpus-per-trial", type=int, default=1,
                   help="GPUs of each trial (its CUDA_VISIBLE_DEVICES slice; > 1 runs it under torchrun; "
                        "0 with --launcher slurm: CPU jobs)")
    s.add_argument("--nproc-per-trial", type=int, default=None,
                   help="processes of each trial under torchrun (default: --gpus-per-trial; on CPU they use gloo)")
    g = s.add_argument_group("Slurm (--launcher slurm)")
    g.add_argument("--partition", default=None, help="Slurm partition of the trials' jobs (required)")
    g.add_argument("--time", default="1:00:00", help="time limit of each job, [D-]HH:MM:SS or minutes; a trial that "
                                                   "reaches it checkpoints and is requeued (default 1:00:00)")
    g.add_argument("--nodes-per-trial", type=int, default=1, help="nodes of each trial (torchrun's rendezvous)")
    g.add_argument("--cpus-per-gpu", type=int, default=None, help="CPU cores per GPU (per trial on CPU: --cpus-per-trial)")
    g.add_argument("--cpus-per-trial", type=int, default=None, help="CPU cores of a trial without GPUs")
    g.add_argument("--mem", default=None, help="memory per node, Slurm's syntax: 64G")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-arg account=abc --slurm-arg qos=high (repeatable)")
    g.add_argument("--poll-seconds", type=float, default=10.0, help="how often the controller looks at the jobs")
    g.add_argument("--cluster", default="slurm",
                   help="submitit's executor: slurm, or local (submitit's local executor stands in for the cluster "
                        "on this machine, through the same code path: tests, a dry run)")
    s.set_defaults(func=_cmd_sweep)

    r = sub.add_parser("prepare", help="Kaldi data dir (wav.scp, utt2spk, trials) from a corpus tree",
                       description="Build wav.scp, utt2spk, spk2utt (and trials from an official trial list) "
                                   "from an audio tree, without opening the audio files.")
    r.add_argument("layout", choices=("voxceleb", "tree"),
                   help="voxceleb: idNNNNN/<video>/NNNNN.wav; tree: speaker/.../*.wav|flac")
    r.add_argument("root", help="corpus root (voxceleb: the folder holding idNNNNN/, or its parent with wav/)")
    r.add_argument("out", help="output Kaldi data dir")
    r.add_argument("--trials", default=None,
                   help="official trial list to convert, e.g. veri_test2.txt (lines 'label path path')")
    r.set_defaults(func=_cmd_prepare)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        # user errors: one line that names the problem and the fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
