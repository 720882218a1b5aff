"""Faults real runs meet, end to end: non-finite training, an unreachable W&B server, bad
resumes, a busy exp_dir, and SIGKILLs at random points (a fast subset of
scripts/fault_inject.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, Recorder, history_keys, wandb_records
from pipeline import checkpoint as ckpt
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.train import train

TINY = ROOT / "experiments/sdpn_tiny.yaml"
LIGHT = ["monitors=[norms,deltas,health]", "eval_at_init=false"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def _step_files(exp_dir: Path) -> dict[int, dict]:
    return {s: ckpt.load(p) for s, p in ckpt.CheckpointManager(exp_dir).step_files()}


# -- non-finite training -------------------------------------------------------------------------
def test_nan_run_of_the_issue_stops_writes_nothing_nonfinite_and_resumes(micro, capsys):
    """lr=1e30 clip_grad=0 max_steps=60 ckpt_every=20: it diverges before its first periodic
    checkpoint; the run stops at that log interval, exit code 3, and resumes from step 0."""
    nan = micro + LIGHT + ["lr=1e30", "clip_grad=0", "max_steps=60", "ckpt_every=20"]
    assert main(["train", "--config", str(TINY), *nan]) == 3
    err = capsys.readouterr().err
    exp_dir = Path(load_config(TINY, nan).exp_dir)
    files = _step_files(exp_dir)
    assert list(files) == [0] and all(not ckpt.nonfinite_tensors(s) for s in files.values())
    stop = [line for line in err.splitlines() if line.startswith("stopped at step")]
    assert len(stop) == 1 and "on_nonfinite=stop" in stop[0] and "checkpoint-0.pt (step 0)" in stop[0]
    assert "resume from it with: python -m pipeline train" in stop[0] and stop[0].endswith("resume=true")
    stopped_at = int(stop[0].split()[3].rstrip(";"))
    assert stopped_at < 20 and stopped_at % 2 == 0  # at a log interval (log_every=2), long before step 60
    rows = [json.loads(line) for line in (exp_dir / "records/metrics.jsonl").read_text().splitlines()]
    losses = {r["trainer/step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert max(losses) == stopped_at - 1 and losses[stopped_at - 1] == "nan"  # seen at this interval

    rec = Recorder()  # the fix: a sane lr, resumed from the finite checkpoint
    res = train(load_config(TINY, micro + LIGHT + ["max_steps=4", "resume=true"]), extra_monitors=[rec])
    assert rec.events[1] == ("on_train_start", 0) and torch.equal(rec.start_prototypes, files[0]["prototypes"])
    assert res["step"] == 4 and res["wandb_run_id"] == files[0]["wandb_run_id"]


def test_nan_after_good_checkpoints_keeps_them_and_resume_takes_the_newest(micro):
    good = micro + LIGHT + ["max_steps=6", "ckpt_every=3"]
    train(load_config(TINY, good))
    exp_dir = Path(load_config(TINY, good).exp_dir)
    before = _step_files(exp_dir)
    assert sorted(before) == [3, 6]

    res = train(load_config(TINY, micro + LIGHT + ["lr=1e30", "clip_grad=0", "max_steps=60", "ckpt_every=1",
                                                    "resume=true"]))
    assert res["stopped_by"].startswith("non-finite") and res["last_good_step"] >= 6
    after = _step_files(exp_dir)
    assert max(after) == res["last_good_step"] < res["step"]
    assert all(not ckpt.nonfinite_tensors(s) for s in after.values())
    assert 6 in after and torch.equal(after[6]["prototypes"], before[6]["prototypes"])
    assert os.path.samefile(exp_dir / "checkpoint.pt", exp_dir / f"checkpoint-{max(after)}.pt")

    rec = Recorder()
    train(load_config(TINY, micro + LIGHT + [f"max_steps={max(after) + 2}", "resume=true"]), extra_monitors=[rec])
    assert rec.events[1] == ("on_train_start", max(after))
    assert torch.equal(rec.start_prototypes, after[max(after)]["prototypes"])


# -- W&B outages -----------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: nothing listens there


def test_unreachable_wandb_server_run_completes_offline(micro, tmp_path):
    args = micro + LIGHT + ["max_steps=6", "wandb_mode=online", "wandb_init_timeout=3", "wandb_watch=gradients"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="online", WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}",
               HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(TINY), *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    exp_dir = Path(load_config(TINY, args).exp_dir)
    rows = [json.loads(line) for line in (exp_dir / "records/metrics.jsonl").read_text().splitlines()]
    assert sorted({r["trainer/step"] for r in rows if "train/loss" in r}) == list(range(6))  # every step
    findings = [json.loads(line) for line in (exp_dir / "records/findings.jsonl").read_text().splitlines()]
    (sf,) = [f for f in findings if f["code"] == "SINK_FAILED"]
    assert sf["severity"] == "warning" and "CommError" in sf["message"] and "wandb sync" in sf["message"]
    assert "raised in watch" in sf["message"]  # wandb_watch opens the run first: isolated too
    summary = json.loads((exp_dir / "records/summary.json").read_text())
    assert "SINK_FAILED" in summary["health/codes"] and summary["health/warnings"] == 1
    (run_dir,) = (exp_dir / "wandb").glob("offline-run-*")
    assert f"upload it later with: wandb sync {run_dir}" in out.stderr
    res = json.loads(out.stdout)
    assert res["wandb_run_dir"] == str(run_dir) and run_dir.name.endswith(res["wandb_run_id"])
    assert "train/loss" in history_keys(wandb_records(run_dir))  # the offline run has the history
    assert torch.load(exp_dir / "checkpoint.pt", weights_only=True)["wandb_run_id"] == res["wandb_run_id"]


def test_online_mode_without_credentials_is_a_one_line_error_before_training(micro, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    args = micro + ["max_steps=2", "wandb_mode=online"]
    assert main(["train", "--config", str(TINY), *args]) == 2
    line = _one_line_error(capsys)
    assert "wandb_mode=online but no W&B API key" in line and "wandb login" in line and "wandb_mode=offline" in line
    assert not (Path(load_config(TINY, args).exp_dir) / "records").exists()  # nothing started


# -- bad resumes, a busy exp_dir -----------------------------------------------------------------
def test_resume_with_changed_shapes_is_a_one_line_error(micro, capsys):
    train(load_config(TINY, micro + LIGHT + ["max_steps=2"]))
    capsys.readouterr()
    assert main(["train", "--config", str(TINY), *micro, *LIGHT, "max_steps=4", "resume=true",
                 "num_proto=32", "hidden_dim=64"]) == 2
    line = _one_line_error(capsys)
    assert "cannot resume from" in line and "checkpoint-2.pt" in line
    assert "num_proto: checkpoint 16, now 32" in line and "hidden_dim: checkpoint 32, now 64" in line


def test_resume_skips_a_truncated_newest_checkpoint(micro, capsys):
    args = micro + LIGHT + ["max_steps=4", "ckpt_every=2"]
    train(load_config(TINY, args))
    exp_dir = Path(load_config(TINY, args).exp_dir)
    newest = exp_dir / "checkpoint-4.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a disk fault after the write
    capsys.readouterr()
    rec = Recorder()
    train(load_config(TINY, args + ["max_steps=5", "resume=true"]), extra_monitors=[rec])
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "checkpoint-4.pt" in err and "resumed from" in err
    assert rec.events[1] == ("on_train_start", 2)


def test_second_run_on_a_live_exp_dir_is_a_one_line_error(micro, capsys):
    exp_dir = Path(load_config(TINY, micro).exp_dir)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.checkpoint import ExpDirLock; "
        "ExpDirLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)"),
        str(ROOT), str(exp_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", "--config", str(TINY), *micro, "max_steps=1"]) == 2
        line = _one_line_error(capsys)
        assert f"exp_dir {exp_dir} is in use by a running training (pid {holder.pid})" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    res = train(load_config(TINY, micro + LIGHT + ["max_steps=1", "resume=true"]))  # the lock died with it
    assert res["step"] == 1


# -- kills at any point ----------------------------------------------------------------------------
def test_fault_injection_fast_subset(data_cache, tmp_path):
    spec = importlib.util.spec_from_file_location("fault_inject", ROOT / "scripts/fault_inject.py")
    fi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fi)
    lines: list[str] = []
    # after the first pointer move, halfway through a write, at a random time in training
    res = fi.run_campaign(kills=3, seed=1, work=tmp_path, steps=24, points=["after-pointer", "mid-write", "time-train"],
                          max_delay=6.0, data_cache=data_cache, log=lines.append)
    detail = "\n".join(lines)
    assert res["kills_tried"] >= 2, detail          # the time kill may come after the run ended
    assert res["kills_survived"] == res["kills_tried"], detail
    assert res["resumes"] >= 2 and res["prototypes_intact"] == res["resumes"], detail
    assert res["final_complete"], detail
