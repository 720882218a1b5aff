"""The reference SDPN pipeline end to end: training through real W&B offline, checkpoints,
SIGKILL/SIGTERM and resume, 2-process torchrun, and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT, history_keys, wandb_records, wandb_summary, Recorder
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.train import train

TINY = ROOT / "experiments/sdpn_tiny.yaml"


def test_training_end_to_end_through_real_wandb(micro):
    rec = Recorder()
    cfg = load_config(TINY, micro + ["max_steps=6", "ckpt_every=4"])
    res = train(cfg, extra_monitors=[rec])
    assert res["step"] == 6
    # the exact event sequence of monitors.core.events.EVENTS
    per_step = ["on_after_backward", "on_before_optimizer_step", "on_after_optimizer_step", "on_step_end"]
    expected = [("on_train_start", 0)]
    for s in range(6):
        expected += [(e, s) for e in per_step]
        if s + 1 == 4:
            expected.append(("on_save_checkpoint", 3))
    expected += [("on_save_checkpoint", 5), ("on_embeddings", 5), ("on_train_end", 5)]
    assert rec.events == expected
    assert all(o is not None and o.student_probs is not None and o.teacher_targets is not None for o in rec.outputs)

    state = torch.load(Path(cfg.exp_dir) / "checkpoint.pt", weights_only=True)
    for key in ("student", "teacher", "prototypes", "optimizer", "step", "rng", "monitor_hub", "wandb_run_id"):
        assert key in state, key
    assert state["step"] == 6 and state["wandb_run_id"] == res["wandb_run_id"]

    records = wandb_records(res["wandb_run_dir"])
    keys = history_keys(records)
    for k in ("train/loss", "train/ploss", "train/me_max", "train/ke_loss", "train/np", "train/lr",
              "train/wd", "train/momentum", "eval/eer", "eval/min_dcf", "trainer/step"):
        assert k in keys, k
    summary = wandb_summary(res["wandb_run_dir"])
    assert 0.0 <= summary["eval/eer"] <= 1.0 and 0.0 <= summary["eval/eer_at_init"] <= 1.0
    assert summary["eval/eer"] == res["eval/eer"]
    assert summary["health/errors"] == 0 and summary["health/warnings"] == 0
    assert summary["health/codes"] == []


def test_evaluate_command_reproduces_the_final_eer(micro, capsys):
    cfg = load_config(TINY, micro + ["max_steps=4", "eval_at_init=false", "monitors=none"])
    res = train(cfg)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(Path(cfg.exp_dir) / "checkpoint.pt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 4 and out["eer"] == pytest.approx(res["eval/eer"], abs=1e-9)
    assert main(["evaluate", "--checkpoint", str(Path(cfg.exp_dir) / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout}s")
        time.sleep(0.2)


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    # a process of its own, as after a real crash: not the W&B service of this pytest process
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--config", str(TINY), *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_after_first_checkpoint_resumes(micro, tmp_path):
    args = micro + ["ckpt_every=3", "epochs=50", "eval_at_init=false"]
    proc = _start(args, tmp_path)
    ckpt_path = Path(load_config(TINY, args).exp_dir) / "checkpoint.pt"
    t0 = time.time()  # checkpoint-0.pt is there from the start: wait for a periodic one
    while not [p for p in ckpt_path.parent.glob("checkpoint-*.pt") if int(p.stem.split("-")[1]) >= 3]:
        assert proc.poll() is None and time.time() - t0 < 240, "no periodic checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = torch.load(ckpt_path, weights_only=True)
    assert saved["step"] >= 3

    rec = Recorder()
    res = train(load_config(TINY, args + ["resume=true", f"max_steps={saved['step'] + 2}"]), extra_monitors=[rec])
    assert rec.events[0] == ("on_load_checkpoint", saved["step"])
    assert rec.events[1] == ("on_train_start", saved["step"])          # the step counter continues
    assert torch.equal(rec.start_prototypes, saved["prototypes"])      # prototypes as saved
    assert res["step"] == saved["step"] + 2
    assert res["wandb_run_id"] == saved["wandb_run_id"]                 # same W&B run
    assert saved["monitor_hub"]["monitors"]["deltas"]                  # monitor state travelled


def test_sigterm_writes_a_checkpoint_then_exits(micro, tmp_path):
    args = micro + ["ckpt_every=1000", "epochs=200", "eval_at_init=false"]
    proc = _start(args, tmp_path)
    records = Path(load_config(TINY, args).exp_dir) / "records" / "metrics.jsonl"
    _wait_for(records, proc)   # training is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = torch.load(records.parent.parent / "checkpoint.pt", weights_only=True)
    assert 0 < saved["step"] < 200 and "prototypes" in saved
    assert "continue with resume=true" in err


def test_torchrun_two_processes_keep_identical_prototypes(micro, tmp_path):
    exe = Path(sys.executable).with_name("torchrun")
    args = micro + ["max_steps=6", "eval_at_init=false", "batch_size=4", "monitors=[norms,deltas,health]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(exe), "--standalone", "--nproc_per_node=2", "-m", "pipeline", "train",
                          "--config", str(TINY), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((Path(load_config(TINY, args).exp_dir) / "records/summary.json").read_text())
    assert summary["dist/world_size"] == 2
    assert summary["dist/proto_max_abs_diff"] == 0.0
    assert "PROTO_REPLICAS_DIVERGED" not in summary["health/codes"]


@pytest.mark.parametrize("case", ["missing_audio", "empty_dir", "unknown_trial_utt", "wrong_type", "num_proto", "output_dim"])
def test_bad_input_gets_one_line_error(case, micro, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    wav = tmp_path / "ok.wav"  # a real 16 kHz file of its own: the test runs alone too
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
    extra: list[str] = []
    if case == "missing_audio":
        (data / "wav.scp").write_text(f"u1 {wav}\nu2 {tmp_path / 'nope.wav'}\n")
        (data / "utt2spk").write_text("u1 s1\nu2 s2\n")
        # evaluation data (training data skips and counts a missing file: tests/test_loader.py)
        extra, words = [f"eval_data={data}"], ["nope.wav", "u2"]
    elif case == "empty_dir":
        extra, words = [f"data={data}"], ["wav.scp"]
    elif case == "unknown_trial_utt":
        (data / "wav.scp").write_text(f"u1 {wav}\nu2 {wav}\n")
        (data / "utt2spk").write_text("u1 s1\nu2 s2\n")
        (data / "trials").write_text("1 u1 u2\n0 u1 ghost\n")
        extra, words = [f"eval_data={data}"], ["ghost", "trials"]
    elif case == "wrong_type":
        extra, words = ["batch_size=big"], ["batch_size", "must be int"]
    else:
        extra, words = [f"{case}=0"], [f"{case} must be >= 1"]
    code = main(["train", "--config", str(TINY), *micro, "max_steps=1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ")
    for w in words:
        assert w in err[-1], (w, err[-1])
