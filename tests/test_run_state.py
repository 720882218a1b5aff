"""The run's state as one object: :class:`TrainState` written by :class:`RunCheckpointer` and
read back by :func:`restore` (a save -> restore round trip), with the checkpoint's keys pinned:
the on-disk format does not change with the object that carries the state."""
from __future__ import annotations

import copy

import pytest
import torch

from monitors import Monitor, MonitorHub, RunContext
from pipeline import checkpoint as ckpt
from pipeline.checkpoint import CheckpointManager
from pipeline.config import Config
from pipeline.loader import TrainFeed
from pipeline.run_state import RunCheckpointer, TrainState, restore

#: the keys of a pipeline checkpoint, as every release has written them
CHECKPOINT_KEYS = {"student", "teacher", "optimizer", "step", "epoch", "config", "rng", "wandb_run_id",
                   "data", "prototypes", "monitor_hub"}


class _Loads(Monitor):
    name = "loads"

    def __init__(self) -> None:
        super().__init__(1)
        self.seen: list[tuple[int, int, int]] = []

    def on_load_checkpoint(self, ctx) -> None:
        self.seen.append((ctx.step, ctx.epoch, ctx.checkpoint["step"]))


def _run(seed: int, per_epoch: int = 4) -> TrainState:
    """A small state: a linear student, its teacher, 5 prototypes, SGD with momentum, a feed of 10 items."""
    torch.manual_seed(seed)
    student = torch.nn.Linear(3, 2)
    teacher = copy.deepcopy(student)
    prototypes = torch.randn(5, 2).requires_grad_(True)
    optimizer = torch.optim.SGD([{"params": list(student.parameters())}, {"params": [prototypes]}],
                                lr=0.1, momentum=0.9)
    feed = TrainFeed(list(range(10)), batch_size=2, per_epoch=per_epoch, seed=0, rank=0, world=1,
                     device=torch.device("cpu"))
    return TrainState(student=student, teacher=teacher, student_ddp=student, prototypes=prototypes,
                      optimizer=optimizer, scaler=None, feed=feed, per_epoch=per_epoch)


def _trained(seed: int) -> TrainState:
    """A state after one optimizer step (momentum buffers exist), at step 6 of epoch 1, one file skipped."""
    run = _run(seed)
    (run.student(torch.ones(2, 3)).pow(2).sum() + run.prototypes.pow(2).sum()).backward()
    run.optimizer.step()
    run.step = 6
    run.feed.bad_paths["a.wav"] = "missing"
    return run


def test_a_checkpoint_of_the_train_state_restores_it(tmp_path):
    run = _trained(0)
    manager = CheckpointManager(tmp_path)
    checkpoints = RunCheckpointer(Config(exp_dir=str(tmp_path)), manager, MonitorHub([], console=None),
                                  RunContext(prototypes=run.prototypes), run, wandb_sink=None, rank=0, resumed=False)
    assert checkpoints.last_good_step is None
    checkpoints.save()
    assert checkpoints.last_good_step == 6
    saved = ckpt.load(manager.step_path(6))
    assert set(saved) == CHECKPOINT_KEYS
    assert (saved["step"], saved["epoch"], saved["wandb_run_id"]) == (6, 1, None)
    assert saved["data"] == {"num_items": 10, "bad_paths": {"a.wav": "missing"}, "seed": 0}

    fresh, loads = _run(1), _Loads()
    assert not torch.equal(fresh.prototypes, run.prototypes)
    ctx = RunContext(prototypes=fresh.prototypes)
    assert restore(saved, fresh, MonitorHub([loads], console=None), ctx) == 6
    assert (fresh.step, fresh.epoch, ctx.step, ctx.epoch) == (6, 1, 6, 1)
    assert loads.seen == [(6, 1, 6)]
    for a, b in ((fresh.student, run.student), (fresh.teacher, run.teacher)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(fresh.prototypes, run.prototypes) and fresh.prototypes.requires_grad
    bufs = [fresh.optimizer.state[p]["momentum_buffer"] for p in [*fresh.student.parameters(), fresh.prototypes]]
    want = [run.optimizer.state[p]["momentum_buffer"] for p in [*run.student.parameters(), run.prototypes]]
    assert all(torch.equal(x, y) for x, y in zip(bufs, want))
    assert fresh.feed.skipped_files == 1


def test_prototypes_left_out_of_the_checkpoint_stay_as_built(tmp_path, capsys):
    """bug_proto_not_in_checkpoint: no "prototypes" key; a restore keeps the state's own. A feed
    of another size is warned about."""
    run = _trained(0)
    manager = CheckpointManager(tmp_path)
    RunCheckpointer(Config(exp_dir=str(tmp_path), bug_proto_not_in_checkpoint=True), manager,
                    MonitorHub([], console=None), RunContext(prototypes=run.prototypes), run,
                    wandb_sink=None, rank=0, resumed=False).save(emit=False)
    saved = ckpt.load(manager.pointer)
    assert set(saved) == CHECKPOINT_KEYS - {"prototypes"}
    fresh = _run(1)
    fresh.feed.dataset = list(range(12))
    before = fresh.prototypes.detach().clone()
    restore(saved, fresh, MonitorHub([], console=None), RunContext(prototypes=fresh.prototypes))
    assert torch.equal(fresh.prototypes, before)
    assert "the checkpoint's data had 10 utterances, this one has 12" in capsys.readouterr().err


@pytest.mark.parametrize("resumed", [True, False])
def test_last_good_step_starts_at_the_resumed_step(tmp_path, resumed):
    run = _trained(0)
    checkpoints = RunCheckpointer(Config(exp_dir=str(tmp_path)), CheckpointManager(tmp_path),
                                  MonitorHub([], console=None), RunContext(prototypes=run.prototypes), run,
                                  wandb_sink=None, rank=0, resumed=resumed)
    assert checkpoints.last_good_step == (6 if resumed else None)
    assert checkpoints.start_step == 6
