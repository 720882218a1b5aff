"""Each reproduction of an original SDPN bug (experiments/bugs/) is diagnosed as an error within
20 steps or at its first checkpoint, with a message that names the fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.config import load_config
from pipeline.train import train

BUGS = ROOT / "experiments/bugs"


def _shrunk(micro: list[str]) -> list[str]:
    # the micro sizes, but each bug config keeps its own length and checkpoint cadence
    keep = ("epochs=", "ckpt_every=", "monitors=")
    return [o for o in micro if not o.startswith(keep)] + ["epochs=20", "monitors=default", "eval_data="]


def _findings(exp_dir: str) -> list[dict]:
    path = Path(exp_dir) / "records" / "findings.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("name, code, by_step, fix", [
    ("proto_not_in_optimizer", "PROTO_NOT_IN_OPTIMIZER", 0, "add_param_group"),
    ("proto_not_in_optimizer", "PROTO_NOT_UPDATING", 20, "add_param_group"),
    ("non_leaf_prototypes", "PROTO_NOT_LEAF", 0, "nn.Parameter(x.to(device))"),
    ("proto_not_in_checkpoint", "PROTO_NOT_IN_CHECKPOINT", 10, "checkpoint['prototypes']"),
])
def test_bug_config_reports_its_code(name, code, by_step, fix, micro):
    cfg = load_config(BUGS / f"{name}.yaml", _shrunk(micro))
    res = train(cfg)
    assert res["step"] == cfg.max_steps                       # ran its default length
    errors = [f for f in _findings(cfg.exp_dir) if f["code"] == code and f["severity"] == "error"]
    assert errors, (code, _findings(cfg.exp_dir))
    assert errors[0]["step"] <= by_step
    assert fix in errors[0]["message"]
    assert code in res["health"]["health/codes"]


def test_ddp_without_grad_allreduce_diverges(micro):
    exe = Path(sys.executable).with_name("torchrun")
    args = _shrunk(micro) + ["batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(exe), "--standalone", "--nproc_per_node=2", "-m", "pipeline", "train",
                          "--config", str(BUGS / "ddp_no_grad_allreduce.yaml"), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    exp_dir = load_config(BUGS / "ddp_no_grad_allreduce.yaml", args).exp_dir
    errors = [f for f in _findings(exp_dir) if f["code"] == "PROTO_REPLICAS_DIVERGED"]
    assert errors and errors[0]["severity"] == "error" and errors[0]["step"] <= 20, _findings(exp_dir)
    assert "all_reduce" in errors[0]["message"]
    summary = json.loads((Path(exp_dir) / "records/summary.json").read_text())
    assert summary["dist/proto_max_abs_diff"] > 0


def test_healthy_run_has_no_warning_or_error(micro):
    cfg = load_config(ROOT / "experiments/sdpn_tiny.yaml", _shrunk(micro) + ["max_steps=30"])
    res = train(cfg)
    bad = [f for f in _findings(cfg.exp_dir) if f["severity"] != "info"]
    assert res["step"] == 30 and bad == []
