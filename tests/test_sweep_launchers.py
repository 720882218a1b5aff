"""Sweeps on the machines people have (issue 27): GPU slices per trial handed out and returned,
a 2-process trial under torchrun (gloo), one submitit job per trial through submitit's local
executor (the code path of Slurm) that survives a killed controller and requeues a preempted
trial from its checkpoint, and one-line errors before anything starts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline.cli import main as cli_main
from pipeline.sweep import run_sweep
from test_sweep import counter_lines, fake_sweep_file

TINY = dict(channels=16, scale=4, embed_dim=32, hidden_dim=32, batch_size=8, max_frames=40, num_train_speakers=4,
            num_eval_speakers=4, utts_per_speaker=4, utt_seconds=1.0, log_every=2, eval_at_init=False,
            monitors=["usage", "health"], wandb_mode="disabled", seed=0)


def tiny_sweep(tmp_path: Path, data_cache: str, **fixed) -> Path:
    """The example sweep's command on a one-trial grid of the tiny config."""
    from pipeline.data import ensure_synthetic_corpus

    ensure_synthetic_corpus(data_cache, num_train_speakers=4, num_eval_speakers=4, utts_per_speaker=4, utt_seconds=1.0)
    cfg = yaml.safe_load((ROOT / "experiments/sweeps/num_proto_x_output_dim.yaml").read_text())
    cfg.pop("early_terminate")
    cfg["parameters"] = {"num_proto": {"values": [8]}, "output_dim": {"values": [8]},
                         **{k: {"value": v} for k, v in {**TINY, "data_cache": data_cache, **fixed}.items()}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_for(cond, timeout: float = 90.0, what: str = "") -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def state_of(out: Path) -> dict:
    try:
        return json.loads((out / "sweep_state.json").read_text()).get("trials", {})
    except (OSError, ValueError):
        return {}


# -- GPU slices on one machine --------------------------------------------------------------------
def test_gpu_slices_are_handed_out_and_returned(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOWATCH_GPU_COUNT", "4")
    sweep = fake_sweep_file(tmp_path)
    cfg = yaml.safe_load(sweep.read_text())
    cfg["parameters"]["sleep"] = {"value": 0.5}
    sweep.write_text(yaml.safe_dump(cfg))
    (tmp_path / "FAIL").touch()                          # 64,32 fails: its slice must come back too
    log: list[str] = []
    rows = run_sweep(sweep, tmp_path / "out", gpus="0,1,2,3", gpus_per_trial=2, echo=log.append)
    assert any("2 trial(s) at once" in line and "slice each of 0,1 | 2,3" in line for line in log)  # workers = slices
    assert [r["status"] for r in rows] == ["failed", "finished", "finished", "finished"]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "out/trials").glob("*/share.json")]
    assert len(runs) == 3 and {r["CUDA_VISIBLE_DEVICES"] for r in runs} <= {"0,1", "2,3"}
    for a in runs:                                        # trials that overlap in time never share a slice
        for b in runs:
            if a is not b and a["t0"] < b["t1"] and b["t0"] < a["t1"]:
                assert a["CUDA_VISIBLE_DEVICES"] != b["CUDA_VISIBLE_DEVICES"]
    state = state_of(tmp_path / "out")
    assert {t["devices"] for t in state.values()} <= {"0,1", "2,3"}
    assert state["num_proto=64,output_dim=32"]["status"] == "failed"


@pytest.mark.parametrize("argv, message", [
    (["--launcher", "pbs"], "unknown launcher 'pbs': use --launcher local (this machine) or slurm"),
    (["--launcher", "slurm"], "--launcher slurm needs --partition NAME"),
    (["--gpus", "0,x"], "--gpus '0,x': expected GPU indices such as 0,1,2,3 or `all`"),
    (["--gpus", "0,4"], "--gpus '0,4': GPU 4 does not exist (this machine has 4: 0-3)"),
    (["--gpus", "0,1", "--gpus-per-trial", "3"], "--gpus-per-trial 3 is larger than the 2 GPU(s) of --gpus 0,1"),
    (["--gpus-per-trial", "2"], "--gpus-per-trial 2 needs --gpus"),
    (["--launcher", "slurm", "--partition", "p", "--time", "1h"], "--time '1h': expected minutes, HH:MM:SS"),
    (["--launcher", "slurm", "--partition", "p", "--slurm-arg", "account"], "--slurm-arg 'account': expected KEY=VALUE"),
])
def test_misuse_is_one_line_and_starts_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("PROTOWATCH_GPU_COUNT", "4")
    sweep = fake_sweep_file(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["sweep", str(sweep), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + message) and "\n" not in err, err
    assert not out.exists() and not counter_lines(tmp_path)


def test_slurm_without_submitit_starts_nothing(tmp_path, monkeypatch, capsys):
    from pipeline.sweep import slurm_job

    monkeypatch.setattr(slurm_job, "submitit", None)
    sweep = fake_sweep_file(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["sweep", str(sweep), "--out", str(out), "--launcher", "slurm", "--partition", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {slurm_job.NOT_INSTALLED}" and "pip install submitit==1.5.4" in err
    assert not out.exists() and not counter_lines(tmp_path)


# -- several processes per trial -----------------------------------------------------------------
def test_two_process_trial_under_torchrun_ends_with_equal_replicas(tmp_path, data_cache):
    sweep = tiny_sweep(tmp_path, data_cache, max_steps=4, ckpt_every=100)
    out = tmp_path / "out"
    log: list[str] = []
    rows = run_sweep(sweep, out, nproc_per_trial=2, echo=log.append, summary_run=False)
    assert rows[0]["status"] == "finished", rows[0]["error"]
    assert any("2 process(es)" in line and "torchrun, gloo" in line for line in log)
    tdir = out / "trials/num_proto=8,output_dim=8"
    assert "torch.distributed.run --standalone --nproc_per_node=2" in (tdir / "log.txt").read_text().splitlines()[0]
    s = json.loads((tdir / "records/summary.json").read_text())
    assert s["dist/world_size"] == 2 and s["dist/proto_max_abs_diff"] == 0.0   # the replicas are equal
    assert s["perf/threads"] == max(1, len(os.sched_getaffinity(0)) // 2)       # the share split between 2


# -- one job per trial through submitit (its local executor standing in for Slurm) ------------------
def slurm_cmd(sweep: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "sweep", str(sweep), "--out", str(out), "--launcher", "slurm",
            "--cluster", "local", "--partition", "debug", "--gpus-per-trial", "0", "--poll-seconds", "0.3"]


def test_submitit_sweep_survives_a_killed_controller(tmp_path):
    sweep = fake_sweep_file(tmp_path)
    cfg = yaml.safe_load(sweep.read_text())
    cfg["parameters"]["hold"] = {"value": str(tmp_path / "HOLD")}   # the num_proto=256 trials run until it goes
    sweep.write_text(yaml.safe_dump(cfg))
    (tmp_path / "HOLD").touch()
    out = tmp_path / "out"
    first = subprocess.Popen(slurm_cmd(sweep, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: [t.get("status") for t in state_of(out).values()] == ["finished", "finished", "running",
                                                                             "running"], what="2 finished, 2 running")
    finally:
        first.kill()                                              # the controller dies; the jobs do not
        first.wait()
    state = state_of(out)
    jobs = {n: t["job_id"] for n, t in state.items()}
    assert len(set(jobs.values())) == 4                           # one job per trial, its id in the state
    log = tmp_path / "second.log"
    with open(log, "w") as f:
        second = subprocess.Popen(slurm_cmd(sweep, out), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: log.read_text().count("re-attached to job") == 2, what="the relaunch re-attaching")
    finally:
        (tmp_path / "HOLD").unlink()                              # the held trials may end now
    assert second.wait(timeout=120) == 0, log.read_text()
    stdout = log.read_text()
    assert stdout.count("finished before") == 2 and "submitted as job" not in stdout, stdout
    assert sorted(counter_lines(tmp_path)) == sorted(["64,32", "64,64", "256,32", "256,64"])   # nothing ran twice
    state = state_of(out)
    assert all(t["status"] == "finished" for t in state.values())
    assert {n: t["job_id"] for n, t in state.items()} == jobs
    assert (out / "summary.csv").is_file() and (out / "heatmap_eval_eer.png").is_file()


def test_submitit_requeues_a_preempted_trial_from_its_checkpoint(tmp_path, data_cache):
    sweep = tiny_sweep(tmp_path, data_cache, max_steps=20, ckpt_every=2)
    out = tmp_path / "out"
    ctl = subprocess.Popen(slurm_cmd(sweep, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tdir = out / "trials/num_proto=8,output_dim=8"
    try:
        wait_for(lambda: any(int(p.stem.split("-")[1]) >= 4 for p in tdir.glob("checkpoint-*.pt")),
                 what="a checkpoint past step 4")
        pid = json.loads((tdir / "status.json").read_text())["pid"]
        os.kill(pid, signal.SIGUSR2)                   # what Slurm sends before a preemption or the time limit
        stdout, _ = ctl.communicate(timeout=240)
    finally:
        if ctl.poll() is None:
            ctl.kill()
    assert ctl.returncode == 0, stdout
    t = state_of(out)["num_proto=8,output_dim=8"]
    assert t["status"] == "finished" and t["attempts"] == 2 and t["resumed"] is True
    log = (tdir / "log.txt").read_text()
    resumed = [line for line in log.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 4, log[-2000:]   # not from step 0
    assert [line.endswith("attempt 2") and " resume=True " in line for line in log.splitlines()
            if line.startswith("$ ")] == [False, True]                              # the same job, requeued
    steps = [json.loads(x)["trainer/step"] for x in (tdir / "records/metrics.jsonl").read_text().splitlines()
             if "trainer/step" in x]
    assert max(steps) >= 18


# -- watching a sweep of jobs -----------------------------------------------------------------------
def test_dashboard_shows_each_trial_state_step_and_job(tmp_path):
    from monitors.dashboard.watching import looks_finished, write_dashboard

    sweep = tmp_path / "sweep"
    trials = {"num_proto=8,output_dim=8": ("finished", "101", 20), "num_proto=8,output_dim=16": ("running", "102", 7),
              "num_proto=16,output_dim=8": ("pending", "103", None), "num_proto=16,output_dim=16": ("failed", "104", 3)}
    state = {"name": "np_od", "method": "grid", "metric": {"name": "eval/eer", "goal": "minimize"},
             "swept": ["num_proto", "output_dim"], "trials": {}}
    for name, (status, job, step) in trials.items():
        k, d = (int(x.split("=")[1]) for x in name.split(","))
        rec = sweep / "trials" / name / "records"
        rec.mkdir(parents=True)
        if step is not None:
            (rec / "metrics.jsonl").write_text("".join(json.dumps({"trainer/step": s, "train/loss": 1.0 / (s + 1)}) + "\n"
                                                       for s in range(step + 1)))
        if status == "finished":
            (rec / "summary.json").write_text(json.dumps({"eval/eer": 0.25}))
        state["trials"][name] = {"params": {"num_proto": k, "output_dim": d}, "status": status, "job_id": job,
                                 "exp_dir": f"trials/{name}", "error": "exit code 1" if status == "failed" else ""}
    (sweep / "sweep_state.json").write_text(json.dumps(state))
    page = write_dashboard(sweep).read_text()
    assert '<span class="st-running">running</span> at step 7 &middot; job 102' in page
    assert '<span class="st-pending">pending</span> &middot; job 103' in page
    assert '<span class="st-finished">finished</span> &middot; job 101' in page
    assert '<span class="st-failed">failed</span> &middot; job 104' in page
    assert "<th>job_id</th>" in page and "<th>step</th>" in page
    assert not looks_finished(sweep)                    # --watch goes on while a trial is pending or running


def test_wandb_agents_one_per_gpu_slice(tmp_path, monkeypatch):
    """--wandb --gpus: one `wandb agent` per slice, each seeing its slice; --workers 0 registers only."""
    import wandb

    from pipeline.sweep import wandb_agent

    started: list[tuple[list[str], str]] = []

    class Agent:
        def __init__(self, cmd, env):
            started.append((cmd, env.get("CUDA_VISIBLE_DEVICES")))

        def wait(self):
            return 0

    monkeypatch.setenv("PROTOWATCH_GPU_COUNT", "4")
    monkeypatch.setattr(wandb_agent, "_wandb_api_key", lambda: "key")
    monkeypatch.setattr(wandb, "sweep", lambda cfg, project=None, entity=None: "sid42")
    monkeypatch.setattr(wandb_agent.subprocess, "Popen", lambda cmd, env=None: Agent(cmd, env))
    sweep = ROOT / "experiments/sweeps/num_proto_x_output_dim.yaml"
    assert cli_main(["sweep", str(sweep), "--wandb", "--gpus", "0,1,2,3", "--gpus-per-trial", "2",
                     "--out", str(tmp_path / "w")]) == 0
    assert [env for _, env in started] == ["0,1", "2,3"]
    assert all(cmd[1:] == ["agent", "protowatch/sid42"] for cmd, _ in started)
    started.clear()
    assert cli_main(["sweep", str(sweep), "--wandb", "--workers", "0", "--out", str(tmp_path / "w2")]) == 0
    assert started == []


def test_slurm_job_options_become_sbatch_lines(tmp_path, monkeypatch, capsys):
    """What submitit's Slurm executor would write for our options (a stand-in `srun` on PATH)."""
    from pipeline.cli import build_parser
    from pipeline.sweep.slurm_job import SlurmOptions, make_executor

    sweep = fake_sweep_file(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    assert cli_main(["sweep", str(sweep), "--out", str(tmp_path / "o"), "--launcher", "slurm", "--partition", "p"]) == 2
    assert "no Slurm here (srun is not on PATH)" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin/srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    args = build_parser().parse_args(["sweep", str(sweep), "--launcher", "slurm", "--partition", "gpu",
                                      "--gpus-per-trial", "4", "--cpus-per-gpu", "8", "--mem", "200G",
                                      "--time", "1-00:00:00", "--slurm-arg", "account=abc", "--slurm-arg", "qos=high"])
    opts = SlurmOptions.from_args(args)
    assert (opts.timeout_min, opts.nproc_per_trial, opts.cpus()) == (1440, 4, 32)
    text = make_executor(tmp_path / "submitit", opts)._executor._make_submission_file_text("CMD", "uid")
    for line in ("--partition=gpu", "--time=1440", "--gpus-per-node=4", "--cpus-per-task=32", "--mem=200G",
                 "--account=abc", "--qos=high", "--signal=USR2@180", "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in text, line
