"""The bug switches of the reference pipeline for the bugs of trainers in use today
(experiments/bugs/, issue 11) give the same codes as the foreign loops of test_foreign_bugs.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.config import load_config
from pipeline.train import train
from test_bugs import BUGS, _findings, _shrunk


@pytest.mark.parametrize("name, code, severity, by_step, fix", [
    ("freeze_by_name", "PROTO_FREEZE_IGNORED", "warning", 20, "prototypes.grad = None"),
    ("teacher_shares_student", "TEACHER_SHARES_STUDENT", "error", 0, "deepcopy"),
    ("no_ema", "TEACHER_NOT_UPDATING", "warning", 20, "EMA update is not applied"),
])
def test_trainer_bug_config_reports_its_code(name, code, severity, by_step, fix, micro):
    cfg = load_config(BUGS / f"{name}.yaml", _shrunk(micro) + ["max_steps=20"])
    res = train(cfg)
    found = [f for f in _findings(cfg.exp_dir) if f["code"] == code and f["severity"] == severity]
    assert found, (code, _findings(cfg.exp_dir))
    assert found[0]["step"] <= by_step
    assert fix in found[0]["message"]
    assert code in res["health"]["health/codes"]
    # nothing else above info: each switch is its one bug
    others = {f["code"] for f in _findings(cfg.exp_dir) if f["severity"] != "info"} - {code}
    assert not others, others


def test_summed_gradient_under_torchrun(micro):
    exe = Path(sys.executable).with_name("torchrun")
    args = _shrunk(micro) + ["batch_size=4", "max_steps=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(exe), "--standalone", "--nproc_per_node=2", "-m", "pipeline", "train",
                          "--config", str(BUGS / "grad_allreduce_sum.yaml"), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    exp_dir = load_config(BUGS / "grad_allreduce_sum.yaml", args).exp_dir
    found = [f for f in _findings(exp_dir) if f["code"] == "PROTO_GRAD_NOT_AVERAGED"]
    assert found and found[0]["severity"] == "warning" and found[0]["step"] <= 20, _findings(exp_dir)
    assert "2x the configured lr" in found[0]["message"]
    assert [f for f in _findings(exp_dir) if f["severity"] != "info" and f["code"] != "PROTO_GRAD_NOT_AVERAGED"] == []
