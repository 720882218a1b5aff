"""CheckpointManager (step-numbered files, checkpoint.pt, keep N, finite check, newest-good
resume), ExpDirLock, the resume shape check, and the hub's isolation of sinks that raise."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import RecordingSink
from monitors import Finding, MonitorHub, RunContext
from pipeline import checkpoint as ckpt
from pipeline.checkpoint import CheckpointManager, ExpDirLock, check_resume_config, nonfinite_tensors


def _state(step: int, value: float = 1.0) -> dict:
    return {"step": step, "prototypes": torch.full((4, 3), value),
            "student": {"w": torch.ones(2), "n": torch.tensor(3)}, "optimizer": {"state": {0: {"m": torch.zeros(2)}}}}


def test_keeps_the_last_n_step_files_and_points_checkpoint_pt_at_the_newest(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for step in (0, 3, 6, 9):
        assert m.save(_state(step), step) == tmp_path / f"checkpoint-{step}.pt"
    assert [s for s, _ in m.step_files()] == [9, 6]
    assert os.path.samefile(tmp_path / "checkpoint.pt", tmp_path / "checkpoint-9.pt")  # a hard link
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 9
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
        CheckpointManager(tmp_path, keep=0)


def test_a_nonfinite_state_is_never_written(tmp_path, capsys):
    m = CheckpointManager(tmp_path, keep=2)
    m.save(_state(3), 3)
    bad = _state(6)
    bad["student"]["w"][1] = float("inf")
    bad["prototypes"][0, 0] = float("nan")
    assert nonfinite_tensors(bad) == ["prototypes", "student/w"]
    assert m.save(bad, 6) is None
    err = capsys.readouterr().err
    assert "checkpoint of step 6 NOT written" in err and "prototypes, student/w" in err and "step 3" in err
    assert [s for s, _ in m.step_files()] == [3]
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 3


def test_resume_skips_a_truncated_or_nonfinite_newest_and_says_so(tmp_path):
    m = CheckpointManager(tmp_path, keep=3)
    for step in (3, 6):
        m.save(_state(step, value=float(step)), step)
    # a newer file that is truncated (a disk fault), and one written by an older version with NaN
    data = (tmp_path / "checkpoint-6.pt").read_bytes()
    (tmp_path / "checkpoint-12.pt").write_bytes(data[: len(data) // 2])
    torch.save(_state(9, value=float("nan")), tmp_path / "checkpoint-9.pt")
    lines: list[str] = []
    state, path = m.load_newest_good(log=lines.append)
    assert state["step"] == 6 and path.name == "checkpoint-6.pt"
    assert len(lines) == 2 and "checkpoint-12.pt" in lines[0] and "could not be read" in lines[0]
    assert "checkpoint-9.pt" in lines[1] and "NaN/Inf" in lines[1]
    assert os.path.samefile(tmp_path / "checkpoint.pt", path)  # checkpoint.pt names what was resumed
    with pytest.raises(ValueError, match=r"use an earlier checkpoint \(checkpoint-9.pt, checkpoint-6.pt, checkpoint-3.pt"):
        ckpt.load(tmp_path / "checkpoint-12.pt")  # evaluate --checkpoint names the ones to try


def test_resume_from_a_lone_checkpoint_pt_and_when_nothing_is_usable(tmp_path):
    m = CheckpointManager(tmp_path)
    assert m.load_newest_good() is None                     # nothing at all: a new run
    ckpt.save_atomic(_state(5), tmp_path / "checkpoint.pt")  # a run from before step files
    assert m.load_newest_good()[0]["step"] == 5
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"no usable checkpoint in .*checkpoint.pt \(unreadable\)"):
        m.load_newest_good(log=lambda line: None)


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    m = CheckpointManager(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".checkpoint-3.pt.tmp.{dead.stdout.strip()}"
    stale.write_bytes(b"half")
    live = tmp_path / f".checkpoint-6.pt.tmp.{os.getppid()}"  # a live process: left alone
    live.write_bytes(b"half")
    m.clean_temporaries()
    assert not stale.exists() and live.exists()


def test_resume_shape_check_lists_every_key_with_both_values():
    saved = {"num_proto": 16, "output_dim": 16, "embed_dim": 32, "lr": 0.4}
    check_resume_config(saved, {**saved, "lr": 0.1}, "x.pt")  # lr may change
    with pytest.raises(ValueError) as e:
        check_resume_config(saved, {**saved, "num_proto": 32, "output_dim": 8}, "runs/x/checkpoint-6.pt")
    msg = str(e.value)
    assert "\n" not in msg and "runs/x/checkpoint-6.pt" in msg
    assert "num_proto: checkpoint 16, now 32" in msg and "output_dim: checkpoint 16, now 8" in msg
    assert "resume with num_proto=16 output_dim=16" in msg


def test_exp_dir_lock_blocks_a_second_live_run_not_a_dead_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.checkpoint import ExpDirLock; "
        "ExpDirLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)"),
        str(Path(__file__).resolve().parents[1]), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"exp_dir {tmp_path} is in use by a running training \(pid {holder.pid}\)"):
            ExpDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with ExpDirLock(tmp_path):  # the killed holder's lock is gone with it
        pass
    ExpDirLock(tmp_path).acquire().release()


# -- sinks that raise ----------------------------------------------------------------------------
class _Broken(RecordingSink):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.method, self.calls = method, 0

    def _maybe(self) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")

    def log_rows(self, rows) -> None:
        self._maybe() if self.method == "log_rows" else super().log_rows(rows)

    def set_summary(self, values) -> None:
        self._maybe() if self.method == "set_summary" else super().set_summary(values)

    def alert(self, finding) -> None:
        self._maybe() if self.method == "alert" else super().alert(finding)

    def close(self) -> None:
        self._maybe() if self.method == "close" else super().close()


@pytest.mark.parametrize("method", ["log_rows", "set_summary", "alert", "close"])
def test_a_sink_that_raises_is_reported_once_and_switched_off(method):
    broken, good = _Broken(method), RecordingSink()
    lines: list[str] = []
    hub = MonitorHub([], sinks=[broken, good], log_every=2, console=lines.append)
    ctx = RunContext(prototypes=torch.randn(4, 3, requires_grad=True))
    for s in range(6):
        ctx.step = s
        hub.log({"train/loss": torch.tensor(float(s))})
        hub.emit("on_step_end", ctx)
        if s == 2:
            hub.report(Finding("PROTO_LR_ZERO", "warning", s, "lr 0"))
    hub.close()
    failed = [f for f in hub.findings if f.code == "SINK_FAILED"]
    assert len(failed) == 1 and failed[0].severity == "warning"
    assert f"_Broken raised in {method}" in failed[0].message and "No space left" in failed[0].message
    assert "switched off" in failed[0].message
    assert broken.calls == 1 and not hub.sink_active(broken)
    assert [s for s, r in good.rows if "train/loss" in r] == list(range(6))  # the other sink went on
    assert {a.code for a in good.alerts} >= {"PROTO_LR_ZERO", "SINK_FAILED"} and good.closed
    if method != "close":  # a failure at close comes after the last summary
        assert good.summary["health/codes"] == ["PROTO_LR_ZERO", "SINK_FAILED"]
    assert sum("SINK_FAILED" in line for line in lines) == 1


def test_a_sink_that_recovers_keeps_receiving():
    class Flaky(RecordingSink):
        def __init__(self) -> None:
            super().__init__()
            self.up = False

        def log_rows(self, rows) -> None:
            if not self.up:
                raise ConnectionError("server unreachable")
            super().log_rows(rows)

        def recover(self, error: str):
            self.up = True
            return "fell back to a local copy"

    sink = Flaky()
    hub = MonitorHub([], sinks=[sink], log_every=1, console=None)
    ctx = RunContext(prototypes=torch.randn(4, 3, requires_grad=True))
    for s in range(3):
        ctx.step = s
        hub.log({"x": float(s)})
        hub.emit("on_step_end", ctx)
    hub.close()
    (f,) = [f for f in hub.findings if f.code == "SINK_FAILED"]
    assert "fell back to a local copy" in f.message and hub.sink_active(sink)
    assert [s for s, r in sink.rows if "x" in r] == [0, 1, 2]  # the failed batch was retried
