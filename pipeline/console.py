"""The ``protowatch`` console command (pyproject.toml ``[project.scripts]``): one entry point for the
subcommands of ``python -m pipeline`` and ``python -m monitors``.

    protowatch train --config experiments/sdpn_tiny.yaml      -> pipeline.cli.main
    protowatch dashboard runs/sdpn_tiny                        -> monitors.__main__.main

It lives at the top of the house, in ``pipeline/`` (which may import ``monitors``; ``monitors``
never imports ``pipeline``), and imports nothing but the standard library and ``monitors`` until
a subcommand is chosen: the pipeline's command line (and its extras) only for a pipeline
subcommand, so ``protowatch dashboard`` and ``protowatch inspect`` need only the core, and a
missing extra (``pip install 'protowatch[pipeline]'``) is reported in one line instead of a
traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

from monitors import __version__

# the subcommands of pipeline/cli.py (tests/test_package.py checks this list against its parser);
# written here so that --help lists them without importing the pipeline or its extras
PIPELINE_COMMANDS: Dict[str, str] = {
    "train": "train SDPN (the reference trainer)",
    "evaluate": "EER and minDCF of a checkpoint",
    "sweep": "run a W&B-format sweep on this machine",
    "prepare": "Kaldi data dir (wav.scp, utt2spk, trials) from a corpus tree",
}
# the module each optional dependency comes with, and the extra that installs it
EXTRA_OF_MODULE: Dict[str, str] = {"tqdm": "pipeline", "soundfile": "pipeline", "optuna": "sweeps", "submitit": "sweeps",
                                   "lightning": "lightning", "pytorch_lightning": "lightning"}


def monitors_commands() -> Dict[str, str]:
    """The subcommands of ``python -m monitors`` with their help, read from its own parser."""
    from monitors.__main__ import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: helps.get(name, "") for name in action.choices}
    return {}


def build_parser() -> argparse.ArgumentParser:
    lines: List[str] = ["subcommands (each has its own --help):"]
    for group, cmds in (("python -m pipeline", PIPELINE_COMMANDS), ("python -m monitors", monitors_commands())):
        for name, text in cmds.items():
            lines.append(f"  {name:<10} {text}  [{group}]")
    p = argparse.ArgumentParser(
        prog="protowatch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="protowatch: watch the prototypes of self-supervised models while they train.",
        epilog="\n".join(lines) + "\n\nThe pipeline subcommands need the extra: pip install 'protowatch[pipeline]'.")
    p.add_argument("--version", action="version", version=f"protowatch {__version__}")
    p.add_argument("command", nargs="?", metavar="SUBCOMMAND",
                   help="one of: " + ", ".join([*PIPELINE_COMMANDS, *monitors_commands()]))
    return p


def _pipeline_cli() -> Any:
    """The pipeline's command line: the trainer's imports (and its extras) happen only now."""
    from . import cli

    return cli


def _missing_extra(exc: ModuleNotFoundError) -> Optional[str]:
    top = (exc.name or "").split(".")[0]
    return EXTRA_OF_MODULE.get(top)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        parser = build_parser()
        args = parser.parse_args(argv)  # --help and --version exit here
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
    command, rest = argv[0], argv[1:]
    if command in PIPELINE_COMMANDS:
        try:
            return _pipeline_cli().main([command, *rest])
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            extra = _missing_extra(exc)
            if extra is None:
                raise
            print(f"error: 'protowatch {command}' needs the module '{top}': "
                  f"pip install 'protowatch[{extra}]'", file=sys.stderr)
            return 2
    if command in monitors_commands():
        from monitors.__main__ import main as monitors_main

        return monitors_main([command, *rest])
    print(f"error: unknown subcommand {command!r}; choose one of "
          f"{', '.join([*PIPELINE_COMMANDS, *monitors_commands()])} (protowatch --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
