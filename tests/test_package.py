"""The distribution (pyproject.toml): a wheel built from the sources installs into a fresh virtual
environment outside the checkout, offline, and its ``protowatch`` command and ``attach()`` work from
there (issue 25, acceptance 1)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LOOP = textwrap.dedent("""
    import torch, monitors
    from monitors import attach
    print("MONITORS_FILE", monitors.__file__)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    P = torch.nn.Parameter(torch.randn(6, 4))
    opt = torch.optim.SGD([*model.parameters(), P], lr=0.1)
    hub = attach(opt, P, model=model, run=False, log_every=5)
    for _ in range(12):
        z = torch.nn.functional.normalize(model(torch.randn(16, 8)), dim=-1)
        loss = -torch.log_softmax(z @ torch.nn.functional.normalize(P, dim=-1).T / 0.1, dim=-1).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    hub.close()
    print("ERRORS", sorted(f.code for f in hub.findings if f.severity == "error"))
""")


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv (outside the checkout) with the wheel installed: returns its bin/ directory."""
    tmp = tmp_path_factory.mktemp("pkg")
    # build from a copy of the sources, so the build leaves nothing (build/, *.egg-info) in the checkout
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("monitors", "pipeline"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    env = _clean_env()
    run = lambda *a, **k: subprocess.run(*a, capture_output=True, text=True, env=env, timeout=300, **k)  # noqa: E731
    r = run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
             "-w", str(tmp / "dist")], cwd=src)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list((tmp / "dist").glob("protowatch-*.whl"))
    assert len(wheels) == 1, wheels
    # a fresh venv from the base interpreter, no pip of its own; the installed dependencies
    # (torch, wandb, ...) are reused offline through a .pth naming this venv's site-packages
    venv = tmp / "venv"
    base = Path(getattr(sys, "_base_executable", sys.executable))
    r = run([str(base), "-m", "venv", "--without-pip", str(venv)])
    assert r.returncode == 0, r.stdout + r.stderr
    vpy = venv / "bin" / "python"
    v_site = Path(run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (v_site / "_protowatch_shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", str(wheels[0])], cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv / "bin"


def test_wheel_holds_both_packages_and_the_command(installed):
    v_site = next((installed.parent / "lib").glob("python*/site-packages"))
    for sub in ("core/hub.py", "attaching/attached_hub.py", "plugins", "health", "tsne", "formats", "dashboard"):
        assert (v_site / "monitors" / sub).exists(), sub  # every wing of monitors/ is in the wheel
    assert (v_site / "pipeline" / "cli.py").exists()
    assert (v_site / "pipeline" / "sweep").is_dir()  # subpackages are included
    assert (installed / "protowatch").exists()


def test_console_command_help_and_version(installed, tmp_path):
    env = _clean_env()
    r = subprocess.run([str(installed / "protowatch"), "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("train", "evaluate", "sweep", "prepare", "dashboard", "inspect"):
        assert f"\n  {cmd} " in r.stdout, (cmd, r.stdout)
    r = subprocess.run([str(installed / "protowatch"), "--version"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from monitors import __version__
    assert r.stdout.strip() == f"protowatch {__version__}"
    # a pipeline subcommand reaches pipeline.cli (its own parser answers)
    r = subprocess.run([str(installed / "protowatch"), "prepare", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "voxceleb" in r.stdout, r.stdout + r.stderr


def test_attach_loop_runs_from_the_installed_package(installed, tmp_path):
    (tmp_path / "loop.py").write_text(LOOP)
    r = subprocess.run([str(installed / "python"), "loop.py"], cwd=tmp_path, env=_clean_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("MONITORS_FILE"))
    path = Path(line.split(maxsplit=1)[1]).resolve()
    assert path.is_relative_to(installed.parent.resolve()), path  # the venv's copy...
    assert not path.is_relative_to(ROOT), path                    # ...not the checkout's
    assert "ERRORS []" in r.stdout, r.stdout


def test_cli_lists_the_pipeline_subcommands_that_exist():
    """pipeline/console.py names the pipeline's subcommands without importing its command line;
    they must not drift."""
    import argparse

    from pipeline.console import PIPELINE_COMMANDS
    from pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(PIPELINE_COMMANDS) == set(sub.choices)


def test_console_loads_no_trainer_module_for_monitor_commands(tmp_path):
    """``protowatch --help`` (and the monitors' subcommands) import nothing of the pipeline but the
    console itself (the trainer's modules, and with them its extras, only for its subcommands)."""
    code = ("import sys; from pipeline.console import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in sys.modules if m.startswith('pipeline.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "LOADED ['pipeline.console']" in r.stdout, r.stdout + r.stderr


def test_missing_extra_is_one_line(monkeypatch, capsys):
    """A pipeline subcommand whose extra is not installed says which extra to install."""
    from pipeline import console

    def fake_import():
        raise ModuleNotFoundError("No module named 'soundfile'", name="soundfile")

    monkeypatch.setattr(console, "_pipeline_cli", fake_import)
    assert console.main(["train"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'protowatch[pipeline]'" in err and "soundfile" in err and err.count("\n") == 1
