"""No pickle code runs when a checkpoint is read: a checkpoint whose pickle creates a file when
loaded is refused by ``inspect``, ``evaluate``, resume and ``hub.check_checkpoint(path)`` with one
line naming the file and ``--trust-pickle``, and ``--trust-pickle`` loads it. The pipeline's own
checkpoints load with plain ``weights_only=True``, and those of the previous version (numpy and
Python RNG states as pickled objects) still resume."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from monitors import attach
from monitors.__main__ import main as monitors_main
from monitors.audit import UnsafeCheckpointError, load_checkpoint
from pipeline.cli import main as pipeline_main
from pipeline.config import load_config
from pipeline.train import train

TINY = ROOT / "experiments/sdpn_tiny.yaml"


class CreatesAFile:
    """Unpickling this creates ``path``: what arbitrary code in a downloaded checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def run(micro):
    """A short pipeline run (checkpoints at steps 0, 2, 4) and its config's overrides."""
    args = micro + ["max_steps=4", "ckpt_every=2", "keep_checkpoints=5", "eval_at_init=false",
                    "monitors=none", "wandb_mode=disabled"]
    cfg = load_config(TINY, args)
    train(cfg)
    return Path(cfg.exp_dir), args


def _plant(exp_dir: Path, marker: Path) -> Path:
    """Make the newest checkpoint (step 6, checkpoint.pt pointing at it) carry the payload."""
    state = torch.load(exp_dir / "checkpoint-4.pt", weights_only=True)
    state["step"] = 6
    state["payload"] = CreatesAFile(marker)
    path = exp_dir / "checkpoint-6.pt"
    torch.save(state, path)
    (exp_dir / "checkpoint.pt").unlink()
    (exp_dir / "checkpoint.pt").hardlink_to(path)
    return path


def test_own_checkpoints_load_with_plain_weights_only(run):
    exp_dir, _ = run
    state = torch.load(exp_dir / "checkpoint.pt", weights_only=True)  # no allowlist needed
    assert state["step"] == 4 and state["rng"]["numpy"]["keys"].dtype == torch.int64


def test_no_pickle_code_runs_in_inspect_evaluate_resume_and_check_checkpoint(run, tmp_path, capsys):
    exp_dir, args = run
    marker = tmp_path / "pwned"
    evil = _plant(exp_dir, marker)

    # inspect
    assert monitors_main(["inspect", str(evil)]) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "--trust-pickle" in err and len(err.strip().splitlines()) == 1
    # evaluate
    assert pipeline_main(["evaluate", "--checkpoint", str(evil)]) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "--trust-pickle" in err
    # resume: refused, not skipped for an older file
    with pytest.raises(UnsafeCheckpointError, match=r"cannot resume: checkpoint .*checkpoint-6\.pt.*--trust-pickle"):
        train(load_config(TINY, args + ["resume=true", "max_steps=8"]))
    # hub.check_checkpoint(path) of attach()
    P = torch.nn.Parameter(torch.randn(16, 16))
    hub = attach(torch.optim.SGD([P], lr=0.1), P, run=False, sinks=[], monitors=["health"], console=False)
    try:
        with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
            hub.check_checkpoint(str(evil))
        assert not marker.exists()  # nothing ran anywhere

        found = hub.check_checkpoint(str(evil), trust_pickle=True)
        assert marker.exists() and [f.code for f in found] == ["PROTO_NOT_IN_CHECKPOINT"]
    finally:
        hub.close()
    marker.unlink()
    assert monitors_main(["inspect", str(evil), "--trust-pickle", "--json"]) == 0 and marker.exists()
    marker.unlink()
    assert pipeline_main(["evaluate", "--checkpoint", str(evil), "--trust-pickle"]) == 0 and marker.exists()
    marker.unlink()
    capsys.readouterr()
    res = train(load_config(TINY, args + ["resume=true", "trust_pickle=true", "max_steps=7"]))
    assert marker.exists() and res["step"] == 7  # resumed from step 6


def test_train_flag_trust_pickle_sets_the_key(run, tmp_path, capsys):
    exp_dir, args = run
    marker = tmp_path / "pwned"
    _plant(exp_dir, marker)
    overrides = [a for a in args if not a.startswith("max_steps")] + ["resume=true", "max_steps=7", "eval_data="]
    assert pipeline_main(["train", "--config", str(TINY), *overrides]) == 2
    assert "trust_pickle=true" in capsys.readouterr().err and not marker.exists()
    assert pipeline_main(["train", "--config", str(TINY), "--trust-pickle", *overrides]) == 0
    assert marker.exists()


def test_a_checkpoint_of_the_previous_version_still_resumes(run):
    exp_dir, args = run
    state = torch.load(exp_dir / "checkpoint-4.pt", weights_only=True)
    np.random.seed(123)
    random.seed(456)
    state["rng"]["numpy"] = np.random.get_state()  # the previous format: pickled numpy and Python states
    state["rng"]["python"] = random.getstate()
    expect_np, expect_py = np.random.random(), random.random()
    torch.save(state, exp_dir / "checkpoint-4.pt")
    with pytest.raises(Exception):  # not plain: plain weights_only refuses it ...
        torch.load(exp_dir / "checkpoint-4.pt", weights_only=True)
    assert isinstance(load_checkpoint(exp_dir / "checkpoint-4.pt")["rng"]["numpy"], tuple)  # ... the allowlist not

    from pipeline import checkpoint as ckpt

    ckpt.set_rng_state(load_checkpoint(exp_dir / "checkpoint-4.pt")["rng"])
    assert np.random.random() == expect_np and random.random() == expect_py
    res = train(load_config(TINY, args + ["resume=true", "max_steps=6"]))
    assert res["step"] == 6
    new = torch.load(exp_dir / "checkpoint-6.pt", weights_only=True)  # written in the new format
    assert isinstance(new["rng"]["numpy"], dict)


def test_rng_state_round_trip():
    from pipeline import checkpoint as ckpt

    np.random.seed(1)
    random.seed(2)
    torch.manual_seed(3)
    np.random.random(), random.gauss(0, 1)  # a cached Gaussian in Python's state
    state = ckpt.rng_state()
    a = (np.random.random(), random.gauss(0, 1), torch.rand(1))
    ckpt.set_rng_state(state)
    assert (np.random.random(), random.gauss(0, 1), torch.rand(1)) == a
