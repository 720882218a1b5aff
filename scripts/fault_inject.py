"""Fault injection: SIGKILL a short training run at random points, N times, and resume it each
time; then check that nothing was lost.

    python scripts/fault_inject.py --kills 10 [--seed 0] [--work runs/fault_inject]

Each round starts ``python -m pipeline train ... resume=true`` (through this script's ``--child``
mode, which adds a probe monitor) on the same ``exp_dir`` and kills it with SIGKILL:

- ``time``: after a random delay from its launch (often during start-up: imports, data, W&B);
- ``time-train``: a random 0-3 s after training started (steps, flushes, checkpoint writes);
- ``mid-write``: the child kills itself halfway through writing a checkpoint's bytes;
- ``before-rename``: after the step file's bytes are written and fsynced, before its rename;
- ``before-pointer``: after the rename, before ``checkpoint.pt`` is pointed at the new file;
- ``after-pointer``: after ``checkpoint.pt`` moved, before old files are pruned.

The write-point kills patch ``torch.save``/``os.replace`` in the child only; the pipeline code
is the one users run. After each kill the next round resumes, and the script checks, for every
resume: the step counter continues from the newest good checkpoint on disk, the prototypes equal
that checkpoint's, every W&B run directory carries the first run's id, and the local records hold
every step before that checkpoint. A last round runs to the end; its records must cover every step.

It prints ``kills survived / kills tried`` and ``prototypes intact / resumes``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ROOT / "experiments/sdpn_tiny.yaml"
WRITE_POINTS = ("mid-write", "before-rename", "before-pointer", "after-pointer")
POINTS = ("time-train", "mid-write", "time", "before-rename", "time-train", "before-pointer", "time",
          "after-pointer")  # the default plan, repeated: half random times, half write points


def micro_overrides(data_cache: str, exp_dir: str, steps: int) -> list[str]:
    """A run of a few seconds on CPU (the tests' micro configuration), checkpointing often."""
    return [
        f"data_cache={data_cache}", "num_train_speakers=4", "num_eval_speakers=4", "utts_per_speaker=4",
        "utt_seconds=1.0", "channels=16", "scale=4", "embed_dim=32", "hidden_dim=32", "output_dim=16",
        "num_proto=16", "batch_size=8", "max_frames=40", "epochs=1000", "warmup_epochs=1",
        f"max_steps={steps}", "log_every=2", "ckpt_every=3", "keep_checkpoints=2", "progress=false",
        "threads=1", "eval_at_init=false", "eval_data=", f"exp_dir={exp_dir}",
        "monitors=[norms,deltas,health]",
    ]


# ----------------------------------------------------------------------------------------------
# the child: the trainer, with a probe and (optionally) a kill at a point of a checkpoint write
# ----------------------------------------------------------------------------------------------
def _arm_write_kill(point: str, at_save: int) -> None:
    """Make this process SIGKILL itself at ``point`` of its ``at_save``-th checkpoint write."""
    import io

    import torch

    from pipeline import checkpoint as ckpt

    count = {"n": 0}
    real_save, real_replace = torch.save, os.replace

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        if not Path(getattr(f, "name", "")).name.startswith(".checkpoint-"):
            return real_save(obj, f, *a, **k)  # not a checkpoint write (the probe's own file)
        count["n"] += 1
        if point == "mid-write" and count["n"] == at_save:
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        real_save(obj, f, *a, **k)

    def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        name = Path(src).name
        if count["n"] == at_save:
            if point == "before-rename" and name.startswith(".checkpoint-"):
                die()
            if point == "before-pointer" and name.startswith(f".{ckpt.CHECKPOINT_NAME}.tmp"):
                die()
        real_replace(src, dst, *a, **k)
        if count["n"] == at_save and point == "after-pointer" and name.startswith(f".{ckpt.CHECKPOINT_NAME}.tmp"):
            die()

    ckpt.torch.save = save      # torch is shared: the wrapper passes every other save through
    ckpt.os.replace = replace   # os is shared: the wrapper passes every other rename through


def child_main(args: argparse.Namespace) -> int:
    import torch

    from monitors import Monitor
    from pipeline.config import load_config
    from pipeline.train import train

    class Probe(Monitor):
        """Writes the step and prototypes the run starts from (after any resume)."""
        name = "fault_probe"

        def on_train_start(self, ctx: Any) -> None:
            torch.save({"step": int(ctx.step), "prototypes": ctx.prototypes.detach().cpu().clone()}, args.probe)

    if args.point in WRITE_POINTS:
        _arm_write_kill(args.point, args.at_save)
    cfg = load_config(TINY, args.overrides)
    train(cfg, extra_monitors=[Probe()])
    return 0


# ----------------------------------------------------------------------------------------------
# the parent: kill, resume, check
# ----------------------------------------------------------------------------------------------
def _newest_good(exp_dir: Path) -> Optional[dict[str, Any]]:
    from pipeline.checkpoint import CheckpointManager

    found = CheckpointManager(exp_dir).load_newest_good(log=lambda line: None, repoint=False)
    return None if found is None else found[0]


def _record_steps(exp_dir: Path) -> set[int]:
    from monitors.formats.records import METRICS_FILE, RECORDS_DIR, STEP_KEY, read_jsonl

    return {int(r[STEP_KEY]) for r in read_jsonl(exp_dir / RECORDS_DIR / METRICS_FILE)
            if "train/loss" in r and STEP_KEY in r}


def _wandb_ids(exp_dir: Path) -> set[str]:
    runs = (exp_dir / "wandb").glob("*run-*")
    return {p.name.rsplit("-", 1)[-1] for p in runs if p.is_dir()}


def run_campaign(kills: int = 10, seed: int = 0, work: str | os.PathLike = "runs/fault_inject",
                 steps: int = 150, points: Optional[list[str]] = None, max_delay: float = 10.0,
                 data_cache: Optional[str] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``kills`` rounds of start/kill, then one round to the end. Returns the counts and, per
    round, what was checked."""
    import torch

    rng = random.Random(seed)
    work = Path(work)
    exp_dir = work / "run"
    if exp_dir.exists():
        import shutil

        shutil.rmtree(exp_dir)
    data_cache = data_cache or str(work / "corpus")
    overrides = micro_overrides(data_cache, str(exp_dir), steps) + ["resume=true"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    tried = survived = resumes = intact = 0
    rounds: list[dict[str, Any]] = []
    first_id: Optional[str] = None
    plan = points or [POINTS[i % len(POINTS)] for i in range(kills)]
    for r in range(len(plan) + 1):
        final = r == len(plan)
        point = "none" if final else plan[r]
        expected = _newest_good(exp_dir)                     # what this round must resume from
        probe = work / f"probe-{r}.pt"
        probe.unlink(missing_ok=True)
        at_save = rng.randint(1, 3)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--probe", str(probe),
               "--point", point, "--at-save", str(at_save), "--", *overrides]
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(1.0, max_delay) if point == "time" else rng.uniform(0.0, 3.0)
        killed_by_us = False
        if point == "time-train":  # wait for training to start (the probe), then a random delay
            while not probe.exists() and proc.poll() is None and time.time() - t0 < 300:
                time.sleep(0.05)
        if point.startswith("time"):
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                killed_by_us = True
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        rc = proc.returncode
        row: dict[str, Any] = {"round": r, "point": point, "rc": rc, "seconds": round(time.time() - t0, 1)}
        if point.startswith("time"):
            row["delay"] = round(delay, 2)
        was_killed = rc == -signal.SIGKILL
        # -- the checks of this round's resume (what it started from) ---------------------------
        if probe.exists():
            from monitors.formats.checkpoints import load_checkpoint

            p = load_checkpoint(probe, mmap=False)  # weights_only=True: the probe holds tensors and ints
            exp_step = int(expected["step"]) if expected is not None else 0
            ok_step = p["step"] == exp_step
            ok_protos = expected is None or torch.equal(p["prototypes"], expected["prototypes"])
            if expected is not None:
                resumes += 1
                intact += bool(ok_step and ok_protos)
            row.update(start_step=p["step"], expected_step=exp_step, prototypes_equal=ok_protos)
        elif rc == 0:
            row["error"] = "finished without writing its probe"
        # -- the state after the kill -------------------------------------------------------------
        good = _newest_good(exp_dir)
        ids = _wandb_ids(exp_dir)
        if good is not None and first_id is None:
            first_id = good.get("wandb_run_id")
        ok_ids = first_id is None or ids <= {first_id}
        ok_ckpt_id = good is None or good.get("wandb_run_id") == first_id
        steps_rec = _record_steps(exp_dir)
        good_step = int(good["step"]) if good is not None else 0
        ok_records = set(range(good_step)) <= steps_rec
        row.update(good_step=good_step, wandb_ids=sorted(ids), records_ok=ok_records)
        if final:
            row["complete"] = rc == 0 and good_step == steps and set(range(steps)) <= steps_rec
            if rc != 0:
                row["stderr"] = err[-2000:]
        elif was_killed:
            tried += 1
            row["killed"] = "by the parent" if killed_by_us else f"itself at {point} of save {at_save}"
        else:
            row["not_killed"] = f"exited {rc} before the kill"
            if rc != 0:
                row["stderr"] = err[-2000:]
        row["ok"] = ok_ids and ok_ckpt_id and ok_records and (not probe.exists() or row.get("prototypes_equal", True)
                                                             and row.get("start_step") == row.get("expected_step"))
        rounds.append(row)
        log(json.dumps({k: v for k, v in row.items() if k != "stderr"}))
        if "stderr" in row:
            log(row["stderr"])
    # a kill is survived when the round after it resumed correctly and nothing before the
    # newest good checkpoint was lost
    # (the first later round that reached training; rounds killed during start-up in between
    # must have left everything as it was)
    for i, row in enumerate(rounds[:-1]):
        if "killed" not in row:
            continue
        j = next(j for j in range(i + 1, len(rounds)) if "start_step" in rounds[j] or j == len(rounds) - 1)
        if all(rounds[k]["ok"] for k in range(i, j + 1)) and "start_step" in rounds[j]:
            survived += 1
    final_ok = rounds[-1].get("complete", False) and rounds[-1]["ok"]
    out = {"kills_tried": tried, "kills_survived": survived, "resumes": resumes, "prototypes_intact": intact,
           "final_complete": final_ok, "wandb_run_id": first_id, "rounds": rounds}
    log(f"kills survived / kills tried: {survived} / {tried}")
    log(f"prototypes intact / resumes: {intact} / {resumes}")
    log(f"final run complete (every step in the local records, one W&B run id {first_id}): {final_ok}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="kill rounds (each then resumed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/fault_inject", help="working directory (its run/ is wiped)")
    p.add_argument("--steps", type=int, default=150, help="steps of the whole run")
    p.add_argument("--max-delay", type=float, default=10.0, help="longest delay of a time kill (s)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--point", default="none", help=argparse.SUPPRESS)
    p.add_argument("--at-save", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)
    res = run_campaign(kills=args.kills, seed=args.seed, work=args.work, steps=args.steps, max_delay=args.max_delay)
    ok = res["kills_survived"] == res["kills_tried"] and res["prototypes_intact"] == res["resumes"] and res["final_complete"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
