"""``python -m pipeline sweep``: W&B's grid order and command expansion, a local sweep with a
failing trial that does not stop the others, a relaunch that runs only what is missing, the
summary table and heatmaps, random/bayes through Optuna, the --wandb guard, and one real 2x2
sweep of the tiny pipeline through W&B offline."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, wandb_records
from monitors.formats.sweep_state import sweep_rows as summarize_sweep
from pipeline.cli import main as cli_main
from pipeline.sweep import (build_command, grid_points, heatmap_grid, load_sweep, registered_config,
                            run_sweep, trial_name)

FAKE_TRIAL = textwrap.dedent('''
    """A stand-in for `python -m pipeline train`: key=value arguments in, records out."""
    import json, os, sys, time
    from pathlib import Path

    t0 = time.time()
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    hold = Path(args.get("hold", "/nonexistent"))
    while hold.exists() and args["num_proto"] == "256" and time.time() < t0 + 120:  # tests: a trial that runs on
        time.sleep(0.1)
    with open(args["counter"], "a") as f:                    # one line per trial process started
        f.write(f"{args['num_proto']},{args['output_dim']}\\n")
    if Path(args["fail_flag"]).exists() and args["num_proto"] == "64" and args["output_dim"] == "32":
        print("Traceback (most recent call last):", file=sys.stderr)
        print("ValueError: num_proto=64 with output_dim=32 is broken on purpose", file=sys.stderr)
        sys.exit(3)
    k, d = int(args["num_proto"]), int(args["output_dim"])
    rec = Path(args["exp_dir"]) / "records"
    rec.mkdir(parents=True, exist_ok=True)
    time.sleep(float(args.get("sleep", 0)))
    (Path(args["exp_dir"]) / "share.json").write_text(json.dumps(
        {"threads": args.get("threads"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
         "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "t0": t0, "t1": time.time()}))
    with open(rec / "metrics.jsonl", "w") as f:
        for s in range(3):
            f.write(json.dumps({"trainer/step": s, "train/loss": 3.0 - s, "proto/usage/perplexity_student": k / 2 + s,
                                "proto/usage/dead": float(d - s), "proto/delta/drift": 0.1 * s}) + "\\n")
    eer = 0.5 - k / 1000 - d / 10000
    (rec / "summary.json").write_text(json.dumps({"eval/eer": eer, "health/errors": k % 3, "health/warnings": 0,
                                                  "health/codes": []}))
    print("trial", args["wandb_group"], args["wandb_name"], args["wandb_mode"], args["progress"])
''')


def fake_sweep_file(tmp_path: Path, method: str = "grid", extra: dict | None = None) -> Path:
    prog = tmp_path / "fake_trial.py"
    prog.write_text(FAKE_TRIAL)
    cfg = {
        "name": "fake_np_od", "method": method, "metric": {"name": "eval/eer", "goal": "minimize"},
        "command": ["${env}", "${interpreter}", str(prog), "${args_no_hyphens}"],
        "parameters": {
            "num_proto": {"values": [64, 256]}, "output_dim": {"values": [32, 64]},
            "counter": {"value": str(tmp_path / "counter.txt")},
            "fail_flag": {"value": str(tmp_path / "FAIL")},
            "wandb_mode": {"value": "disabled"},
        },
        **(extra or {}),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def counter_lines(tmp_path: Path) -> list[str]:
    p = tmp_path / "counter.txt"
    return p.read_text().splitlines() if p.exists() else []


def test_grid_order_names_and_command_match_wandb(tmp_path, monkeypatch):
    cfg = load_sweep(ROOT / "experiments/sweeps/num_proto_x_output_dim.yaml")
    assert cfg["method"] == "grid" and cfg["metric"] == {"name": "eval/eer", "goal": "minimize"}
    # W&B's order: names sorted, the last varying fastest
    assert grid_points(cfg) == [{"num_proto": 64, "output_dim": 32}, {"num_proto": 64, "output_dim": 64},
                                {"num_proto": 256, "output_dim": 32}, {"num_proto": 256, "output_dim": 64}]
    assert trial_name({"num_proto": 64, "output_dim": 32}, ["num_proto", "output_dim"]) == "num_proto=64,output_dim=32"
    a, b = trial_name({"lr": 0.1234567891}, ["lr"]), trial_name({"lr": 0.1234567892}, ["lr"])
    assert a != b and a.startswith("lr=0.123457,h=")       # rounded names stay distinct
    # int_uniform is expanded for a grid; zz sorts last
    g = grid_points({"method": "grid", "parameters": {"zz": {"min": 1, "max": 3}, "a": {"values": ["x", "y"]},
                                                      "c": {"value": 5}}})
    assert g[:3] == [{"a": "x", "zz": 1}, {"a": "x", "zz": 2}, {"a": "x", "zz": 3}] and len(g) == 6
    monkeypatch.setenv("PW_TEST_VAR", "hello")
    cmd = build_command(["${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}",
                         "x=${envvar:PW_TEST_VAR}"], {"num_proto": 64, "monitors": ["norms", "usage"], "progress": False},
                        program="train.py")
    assert cmd[:3] == ["/usr/bin/env", sys.executable, "train.py"]
    assert cmd[3:6] == ["--num_proto=64", "--monitors=['norms', 'usage']", "--progress=False"]
    assert cmd[6:9] == ["num_proto=64", "monitors=['norms', 'usage']", "progress=False"]
    assert json.loads(cmd[9]) == {"num_proto": 64, "monitors": ["norms", "usage"], "progress": False}
    assert cmd[10] == "x=hello"
    # the pipeline reads W&B's formatting of these values back correctly
    from pipeline.config import parse_override
    assert parse_override(cmd[7]) == ("monitors", ["norms", "usage"]) and parse_override(cmd[8]) == ("progress", False)


def test_bad_sweep_files_fail_with_the_fix(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("method: grid\nparameters: {num_proto: {values: [8]}}\noverrides: {epochs: 1}\n")
    with pytest.raises(ValueError, match=r"unknown top-level key.*\{value: X\}"):
        load_sweep(p)
    p.write_text("method: grid\nparameters: {lr: {min: 0.1, max: 0.5}}\n")
    with pytest.raises(ValueError, match="grid search needs values"):
        load_sweep(p)
    p.write_text("method: random\nparameters: {lr: {min: 0.1, max: 0.5}}\n")
    with pytest.raises(ValueError, match=r"uses \$\{program\} but `program` is not set"):
        run_sweep(p, tmp_path / "out")                      # W&B's default command needs program
    p.write_text("method: random\nprogram: x.py\nparameters: {lr: {min: 0.1, max: 0.5}}\n")
    with pytest.raises(ValueError, match="--count"):
        run_sweep(p, tmp_path / "out")


def test_failed_trial_does_not_stop_others_and_relaunch_runs_only_it(tmp_path):
    sweep = fake_sweep_file(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "FAIL").touch()
    rows = run_sweep(sweep, out, workers=2, echo=lambda s: None)
    assert sorted(counter_lines(tmp_path)) == sorted(["64,32", "64,64", "256,32", "256,64"])
    state = json.loads((out / "sweep_state.json").read_text())
    bad = state["trials"]["num_proto=64,output_dim=32"]
    assert bad["status"] == "failed" and bad["exit_code"] == 3
    assert "ValueError: num_proto=64 with output_dim=32 is broken on purpose" in bad["error"]
    assert json.loads((out / "trials/num_proto=64,output_dim=32/status.json").read_text())["status"] == "failed"
    for name in ("num_proto=64,output_dim=64", "num_proto=256,output_dim=32", "num_proto=256,output_dim=64"):
        t = state["trials"][name]
        assert t["status"] == "finished" and t["exit_code"] == 0
        log = (out / "trials" / name / "log.txt").read_text()
        assert f"trial fake_np_od {name} disabled False" in log  # the sweep's own arguments arrived
    # the table and the heatmaps hold each trial's own summary value
    assert [r["status"] for r in rows] == ["failed", "finished", "finished", "finished"]
    rv, cv, grid = heatmap_grid(rows, "eval/eer")
    assert rv == [64, 256] and cv == [32, 64]
    for i, k in enumerate(rv):
        for j, d in enumerate(cv):
            s = json.loads((out / "trials" / f"num_proto={k},output_dim={d}/records/summary.json").read_text()) \
                if (k, d) != (64, 32) else None
            assert (np.isnan(grid[i, j]) if s is None else grid[i, j] == s["eval/eer"]), (k, d)
    r = {row["trial"]: row for row in rows}["num_proto=256,output_dim=64"]
    assert r["proto/usage/perplexity_student"] == 130.0 and r["proto/usage/dead"] == 62.0
    assert r["proto/delta/drift"] == pytest.approx(0.2) and r["health/errors"] == 256 % 3
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["status"] for t in table] == ["failed", "finished", "finished", "finished"]
    assert table[0]["eval/eer"] == "" and float(table[3]["eval/eer"]) == pytest.approx(0.5 - 0.256 - 0.0064)
    assert "broken on purpose" in table[0]["error"]
    assert (out / "summary.md").read_text().count("\n|") >= 5
    for m in ("eval_eer", "proto_usage_perplexity_student", "proto_usage_dead", "proto_delta_drift", "health_errors"):
        assert (out / f"heatmap_{m}.png").stat().st_size > 1000
    assert not (out / "wandb").exists()                       # wandb_mode disabled: no summary run

    # relaunch: only the failed trial runs again, the finished ones are left untouched
    logs = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/log.txt")}
    (tmp_path / "FAIL").unlink()
    rows = run_sweep(sweep, out, workers=2, echo=lambda s: None)
    assert counter_lines(tmp_path)[4:] == ["64,32"]
    assert [r["status"] for r in rows] == ["finished"] * 4
    for p, mtime in logs.items():
        assert (p.stat().st_mtime_ns == mtime) == ("num_proto=64,output_dim=32" not in str(p))
    state = json.loads((out / "sweep_state.json").read_text())
    assert state["trials"]["num_proto=64,output_dim=32"]["attempts"] == 2
    rv, cv, grid = heatmap_grid(rows, "eval/eer")
    assert grid[0, 0] == pytest.approx(0.5 - 0.064 - 0.0032)
    # a third launch runs nothing; the CLI exits 0 when every trial finished
    assert cli_main(["sweep", str(sweep), "--out", str(out), "--workers", "2"]) == 0
    assert len(counter_lines(tmp_path)) == 5


def test_each_trial_gets_its_share_of_the_cores(tmp_path, monkeypatch):
    """The sweep decides `threads` (and OMP_NUM_THREADS) per trial, says so before the first
    trial, subtracts the config's data workers, and obeys a `threads` named in the sweep file."""
    from pipeline.sweep import budget

    monkeypatch.setattr(budget, "available_cores", lambda: 8)
    sweep = fake_sweep_file(tmp_path)
    log: list[str] = []
    run_sweep(sweep, tmp_path / "out", workers=2, echo=log.append)
    start = next(i for i, line in enumerate(log) if "started" in line)
    assert any("threads=4 per process (the trial's share), num_workers=0" in line for line in log[:start])
    for tdir in (tmp_path / "out/trials").iterdir():
        share = json.loads((tdir / "share.json").read_text())
        assert share["threads"] == "4" and share["OMP_NUM_THREADS"] == "4", tdir.name
    # a config with data workers: they come out of the share (read from the command's --config)
    conf = tmp_path / "conf.yaml"
    conf.write_text("threads: 8\nnum_workers: 1\n")
    cfg = yaml.safe_load(sweep.read_text())
    b = budget.trial_budget(2, {}, ["python", "-m", "pipeline", "train", "--config", str(conf)])
    assert (b.cores, b.threads, b.data_workers) == (4, 3, 1)
    assert budget.trial_budget(4, {"num_workers": 2}, []).describe().count("oversubscribe") == 1
    assert budget.trial_budget(1, {}, [], procs=2).threads == 4      # a 2-process trial splits its share
    # `threads` named in the sweep file wins over the share
    cfg["parameters"]["threads"] = {"value": 3}
    sweep.write_text(yaml.safe_dump(cfg))
    log.clear()
    run_sweep(sweep, tmp_path / "out3", workers=2, echo=log.append)
    assert any("threads=3 per process (set by the sweep file)" in line for line in log)
    share = json.loads((tmp_path / "out3/trials/num_proto=64,output_dim=64/share.json").read_text())
    assert (share["threads"], share["OMP_NUM_THREADS"]) == ("3", "3")


def test_random_and_bayes_use_optuna_and_resume(tmp_path):
    extra = {"parameters": {"num_proto": {"min": 8, "max": 512}, "output_dim": {"values": [32, 64]},
                            "counter": {"value": str(tmp_path / "counter.txt")},
                            "fail_flag": {"value": str(tmp_path / "FAIL")}, "wandb_mode": {"value": "disabled"}}}
    sweep = fake_sweep_file(tmp_path, "random", extra)
    out = tmp_path / "random"
    rows = run_sweep(sweep, out, workers=2, count=3, echo=lambda s: None)
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows)
    assert all(8 <= r["num_proto"] <= 512 and r["output_dim"] in (32, 64) for r in rows)
    assert len({r["trial"] for r in rows}) == 3
    n = len(counter_lines(tmp_path))
    rows2 = run_sweep(sweep, out, workers=2, count=3, echo=lambda s: None)   # same seed: all re-used
    assert len(counter_lines(tmp_path)) == n and [r["trial"] for r in rows2] == [r["trial"] for r in rows]

    sweep = fake_sweep_file(tmp_path, "bayes", extra)
    rows = run_sweep(sweep, tmp_path / "bayes", workers=1, count=3, echo=lambda s: None)
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows)


def test_wandb_mode_needs_an_account(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    rc = cli_main(["sweep", str(ROOT / "experiments/sweeps/num_proto_x_output_dim.yaml"), "--wandb",
                   "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 2 and "wandb login" in err and "drop --wandb" in err
    # what would be registered: the file's command wrapped by the per-trial launcher
    cfg = load_sweep(ROOT / "experiments/sweeps/num_proto_x_output_dim.yaml")
    reg = registered_config(cfg, "runs/sweeps/x")
    assert reg["command"][:9] == ["${env}", "${interpreter}", "-m", "pipeline.sweep", "--trial-root", "runs/sweeps/x",
                                  "--arg-style", "plain", "--"]
    assert reg["command"][9:] == [str(c) for c in cfg["command"]]
    assert reg["parameters"]["wandb_group"] == {"value": "num_proto_x_output_dim"}
    assert reg["parameters"]["wandb_mode"] == {"value": "online"} and set(reg) <= {
        "program", "method", "parameters", "metric", "early_terminate", "name", "description", "command"}
    # the launcher a W&B agent runs: own exp_dir per W&B run id, status.json, exit code passed on
    prog = tmp_path / "p.py"
    prog.write_text("import sys; print(sys.argv[1:]); sys.exit(0 if 'num_proto=8' in sys.argv else 4)\n")
    env = dict(os.environ, WANDB_RUN_ID="abc123")
    for arg, want in (("num_proto=8", 0), ("num_proto=9", 4)):
        r = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--trial-root", str(tmp_path / "w"), "--",
                            sys.executable, str(prog), arg], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == want, r.stderr
        st = json.loads((tmp_path / "w/trials/abc123/status.json").read_text())
        assert st["status"] == ("finished" if want == 0 else "failed")
        assert f"exp_dir={(tmp_path / 'w/trials/abc123').resolve()}" in (tmp_path / "w/trials/abc123/log.txt").read_text()


def test_real_pipeline_2x2_sweep_offline(tmp_path, data_cache):
    """The real trainer, tiny: 4 trials, 2 at a time, each its own W&B offline run in the group."""
    from pipeline.data import ensure_synthetic_corpus

    tiny = dict(channels=16, scale=4, embed_dim=32, hidden_dim=32, batch_size=8, max_frames=40,
                num_train_speakers=4, num_eval_speakers=4, utts_per_speaker=4, utt_seconds=1.0,
                max_steps=4, log_every=2, ckpt_every=100, eval_at_init=False,
                monitors=["norms", "deltas", "usage", "similarity", "health"], data_cache=data_cache)
    # the trials share the corpus: make it once, before two processes would race to write it
    ensure_synthetic_corpus(data_cache, num_train_speakers=4, num_eval_speakers=4, utts_per_speaker=4, utt_seconds=1.0)
    cfg = load_sweep(ROOT / "experiments/sweeps/num_proto_x_output_dim.yaml")
    cfg["parameters"] = {"num_proto": {"values": [8, 16]}, "output_dim": {"values": [8, 16]},
                         **{k: {"value": v} for k, v in tiny.items()}}
    sweep = tmp_path / "real.yaml"
    sweep.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(sweep), "--workers", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "num_proto=16,output_dim=16" in r.stdout and "best (minimize eval/eer)" in r.stdout
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"threads={share} per process (the trial's share)" in r.stdout   # said before the first trial
    assert "oversubscribe" not in r.stdout
    rows = summarize_sweep(out)
    assert [r["trial"] for r in rows] == ["num_proto=8,output_dim=8", "num_proto=8,output_dim=16",
                                          "num_proto=16,output_dim=8", "num_proto=16,output_dim=16"]
    rv, cv, grid = heatmap_grid(rows, "eval/eer")
    for i, k in enumerate(rv):
        for j, d in enumerate(cv):
            tdir = out / "trials" / f"num_proto={k},output_dim={d}"
            s = json.loads((tdir / "records/summary.json").read_text())
            assert grid[i, j] == s["eval/eer"]
            assert s["perf/threads"] == share     # the trial's own torch.get_num_threads(), not the config's 2
            assert list(tdir.glob("wandb/offline-run-*"))     # each trial is its own offline W&B run
            assert list(tdir.glob("checkpoint.pt"))
    row = rows[-1]
    assert row["proto/usage/perplexity_student"] is not None and row["health/errors"] == 0
    assert (out / "heatmap_eval_eer.png").is_file() and (out / "summary.csv").is_file()
    summary_run = list(out.glob("wandb/offline-run-*"))        # the sweep-summary run, in the sweep's group
    assert len(summary_run) == 1
    run_rec = next(r["run"] for r in wandb_records(summary_run[0]) if r.get("type") == "run")
    assert run_rec["job_type"] == "sweep-summary" and run_rec["run_group"] == "num_proto_x_output_dim"
    trial_rec = next(r["run"] for r in wandb_records(next(out.glob("trials/*/wandb/offline-run-*")))
                     if r.get("type") == "run")
    assert trial_rec["run_group"] == "num_proto_x_output_dim"
