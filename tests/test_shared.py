"""Work shared between monitors (ctx.proto_stats) and vector statistics reduced at the log interval
(media.VectorStat): the values are right, reused only within one event, and a monitor still
sees writes PyTorch's version counter misses (``.data``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import RecordingSink
from monitors import MonitorHub, RunContext, attach, build_monitors
from monitors.core.media import VECTOR_STATS, VectorStat


def test_vector_stats_are_reduced_per_step_at_the_flush():
    sink = RecordingSink()
    hub = MonitorHub([], sinks=[sink], log_every=100, console=None)
    rng = np.random.default_rng(0)
    vectors = [rng.normal(size=7).astype(np.float32) for _ in range(3)] + [np.zeros(7, np.float32)]
    vectors[1][2] = 0.0
    for step, v in enumerate(vectors):
        t = torch.from_numpy(v)
        hub.log({f"v/{stat}": VectorStat(t, stat) for stat in VECTOR_STATS}, step=step)
        hub.log({"w/mean": VectorStat(torch.arange(step + 1.0), "mean")}, step=step)  # another length each step
    hub.log({"e/max": VectorStat(torch.zeros(0), "max")}, step=0)
    hub.log({"b/nonzero": VectorStat(torch.tensor([True, False, True]), "nonzero"),
             "i/mean": VectorStat(torch.tensor([1, 2]), "mean")}, step=0)  # bool and int vectors
    hub.flush()
    rows = dict(sink.rows)
    assert sorted(rows) == [0, 1, 2, 3]
    for step, v in enumerate(vectors):
        r, x = rows[step], v.astype(np.float64)
        want = {"mean": x.mean(), "min": x.min(), "max": x.max(), "std": x.std(), "sum": x.sum(),
                "norm": np.linalg.norm(x), "nonzero": float(np.count_nonzero(x))}
        for stat, value in want.items():
            assert r[f"v/{stat}"] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, stat)
            assert isinstance(r[f"v/{stat}"], float)
        assert r["w/mean"] == pytest.approx(step / 2)
    assert rows[1]["v/nonzero"] == 6.0
    assert np.isnan(rows[0]["e/max"])  # an empty vector has no maximum
    assert rows[0]["b/nonzero"] == 2.0 and rows[0]["i/mean"] == 1.5


def test_vector_stat_refuses_an_unknown_statistic():
    with pytest.raises(ValueError, match="unknown statistic 'median'.*mean, min, max"):
        VectorStat(torch.ones(3), "median")
    with pytest.raises(TypeError, match="torch.Tensor"):
        VectorStat([1.0, 2.0], "mean")


def test_shared_values_are_reused_within_an_event_only():
    P = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    ctx = RunContext(prototypes=P)
    sh = ctx.proto_stats
    sh.next_event()
    a = sh.row_norms(ctx)
    assert sh.row_norms(ctx) is a                       # computed once for every monitor
    np.testing.assert_allclose(a.numpy(), [5.0, 1.0])
    with torch.no_grad():
        P.mul_(2)                                       # bumps the version counter: seen at once
    np.testing.assert_allclose(sh.row_norms(ctx).numpy(), [10.0, 2.0])
    P.data.mul_(0.5)                                    # .data: the version counter does not move
    assert sh.row_norms(ctx).numpy().tolist() == [10.0, 2.0]  # (the same event: reused)
    sh.next_event()                                     # the hub starts every event like this
    np.testing.assert_allclose(sh.row_norms(ctx).numpy(), [5.0, 1.0])
    assert sh.grad_norm(ctx) is None                    # no gradient yet
    (P.sum() * 2).backward()
    np.testing.assert_allclose(sh.grad_row_norms(ctx).numpy(), [2 * 2 ** 0.5] * 2)
    assert float(sh.grad_norm(ctx)) == pytest.approx(4.0)


def test_snapshot_and_update_are_one_copy_per_step():
    P = torch.nn.Parameter(torch.zeros(3, 2))
    ctx = RunContext(prototypes=P)
    sh = ctx.proto_stats
    sh.next_event()
    snap = sh.snapshot(ctx)
    assert sh.snapshot(ctx) is snap and sh.has_snapshot(ctx)
    sh.next_event()
    P.data[1] = torch.tensor([3.0, 4.0])                # what optimizer.step() would do
    np.testing.assert_allclose(sh.update_row_norms(ctx).numpy(), [0.0, 5.0, 0.0])
    assert float(sh.update_norm(ctx)) == 5.0
    ctx.step = 1                                        # the next step has no snapshot yet
    sh.next_event()
    assert sh.update_row_norms(ctx) is None and not sh.has_snapshot(ctx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_monitors_run_on_float64_and_bfloat16_prototypes(dtype):
    """Each monitor of the default set works on prototypes that are not float32 (the delta
    monitor's float32 work buffer once refused float64)."""
    torch.manual_seed(0)
    P = torch.nn.Parameter(torch.randn(16, 8, dtype=dtype))
    w = torch.nn.Parameter(torch.randn(8, 8, dtype=dtype))
    opt = torch.optim.SGD([P, w], lr=0.1)
    sink = RecordingSink()
    hub = attach(opt, P, run=False, sinks=[sink], console=None, log_every=5, param_groups={"w": [w]},
                 monitors=build_monitors(["norms", "gradients", "deltas", "health"])
                 + build_monitors({"evolution": {"max_tracked": 8, "every_n_steps": 1}}))
    for _ in range(10):
        x = torch.randn(12, 8, dtype=dtype)
        loss = -torch.log_softmax((x @ w) @ P.T, dim=1).max(1).values.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hub.close()
    assert hub.disabled == {}, hub.disabled
    assert not hub.codes("warning") and not hub.codes("error")
    rows = dict(sink.rows)
    for k in ("proto/norm/mean", "proto/grad/norm", "proto/delta/norm", "proto/delta/moved", "proto/delta/drift",
              "grad/w/norm"):
        assert k in rows[0], k
    assert rows[3]["proto/delta/moved"] > 0 and rows[3]["proto/delta/norm"] > 0
    assert hub.get("evolution").history()["steps"] == list(range(10))  # a subset of 8 of 16 rows


def test_update_in_place_of_the_snapshot_is_read_once_and_retaken_next_step():
    """At small K the update is subtracted into the snapshot itself: later readers of the same
    step get the same norms, and the next step's snapshot is a fresh copy of P."""
    P = torch.nn.Parameter(torch.zeros(3, 2))
    ctx = RunContext(prototypes=P)
    sh = ctx.proto_stats
    for step, row in ((0, [3.0, 4.0]), (1, [0.0, 1.0])):
        ctx.step = step
        sh.next_event()
        sh.snapshot(ctx)
        sh.next_event()
        P.data[1] += torch.tensor(row)
        first = sh.update_row_norms(ctx)
        assert sh.update_row_norms(ctx) is first           # the step's one update, reused
        np.testing.assert_allclose(first.numpy(), [0.0, float(np.hypot(*row)), 0.0])
        assert float(sh.update_norm(ctx)) == pytest.approx(float(np.hypot(*row)))


def test_row_entropy_matches_torch_special_entr():
    from monitors.health.interval_checks import _row_entropy

    torch.manual_seed(0)
    m = torch.softmax(torch.randn(6, 9) * 4, dim=1)
    m[0] = torch.tensor([1.0] + [0.0] * 8)                  # 0 log 0 = 0
    np.testing.assert_allclose(_row_entropy(m).numpy(), torch.special.entr(m).sum(-1).numpy(), atol=1e-6)
    assert float(_row_entropy(torch.full((1, 512), 1 / 512))[0]) == pytest.approx(np.log(512), rel=1e-6)
