"""Monitors at large K (issue 13): per-row statistics on a fixed row sample above
``sample_above`` are marked as sampled, the summary statistics (gradient norm, update norm,
relative update, drift, moved rows) stay exact, differences are reduced in row blocks without a
(K, D) temporary, and the duplicate check is spread over log intervals."""
from __future__ import annotations

import pytest
import torch

from conftest import Recorder, RecordingSink
from monitors import RunContext, attach, build_monitors
from monitors.health.doctor import HealthDoctor
from monitors.core.proto_stats import assignment_rows, block_rows, row_distances, row_sample


def _run(K: int, D: int, steps: int, full: tuple[int, int] | None = None, **options):
    """A tiny foreign loop with attach(); returns (rows by step, [(P_before, P_after, grad)], P_init).
    ``full``: (full_above, full_every) of the whole-tensor statistics' cadence."""
    torch.manual_seed(0)
    P = torch.nn.Parameter(torch.randn(K, D))
    w = torch.nn.Parameter(torch.randn(D, D) * 0.1)
    opt = torch.optim.SGD([P, w], lr=0.5, momentum=0.9)
    sink = RecordingSink()
    init = P.detach().clone()
    mons = build_monitors({"norms": options, "gradients": options, "deltas": {"drift_every": 1}, "health": {}})
    hub = attach(opt, P, run=False, sinks=[sink], console=None, log_every=steps, monitors=mons,
                 **({} if full is None else {"full_every": full[1]}))
    if full is not None:
        hub.ctx.proto_stats.full_above = full[0]
    seen = []
    for _ in range(steps):
        x = torch.randn(8, D)
        loss = ((x @ w) @ P.T).square().mean() + P[: K // 2].square().sum()  # rows moving unequally
        opt.zero_grad()
        loss.backward()
        before = P.detach().clone()
        grad = P.grad.detach().clone()
        opt.step()
        seen.append((before, P.detach().clone(), grad))
    hub.close()
    rows: dict[int, dict] = {}
    for step, r in sink.rows:
        rows.setdefault(step, {}).update(r)
    return rows, seen, init, hub


def test_sampled_per_row_statistics_are_marked_and_come_from_the_sample():
    K, D, n = 96, 8, 24
    rows, seen, _, hub = _run(K, D, 4, sample_above=64, sample_rows=n)
    assert not hub.findings
    idx = row_sample(K, 64, n, torch.device("cpu"))
    assert idx is not None and idx.shape == (n,) and torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, row_sample(K, 64, n, torch.device("cpu")))  # the same rows every call
    for step, (before, after, grad) in enumerate(seen):
        r = rows[step]
        assert r["proto/norm/sampled"] == n and r["proto/grad/sampled"] == n
        want_norm = after[idx].norm(dim=1)
        want_grad = grad[idx].norm(dim=1)
        assert r["proto/norm/max"] == pytest.approx(float(want_norm.max()), rel=1e-6)
        assert r["proto/norm/mean"] == pytest.approx(float(want_norm.mean()), rel=1e-6)
        assert r["proto/grad/per_proto_max"] == pytest.approx(float(want_grad.max()), rel=1e-6)
        assert r["proto/grad/per_proto_mean"] == pytest.approx(float(want_grad.mean()), rel=1e-6)
    # the sample is not every row: the full maximum differs somewhere, so the flag means something
    assert any(r["proto/norm/max"] != pytest.approx(float(seen[s][1].norm(dim=1).max()), rel=1e-6)
               or r["proto/grad/per_proto_max"] != pytest.approx(float(seen[s][2].norm(dim=1).max()), rel=1e-6)
               for s, r in rows.items() if s < len(seen))
    hist = next(r["proto/norm/hist"] for r in rows.values() if "proto/norm/hist" in r)
    assert hist.numpy().shape == (n,)  # the histogram is of the sample, not of all K


def test_below_sample_above_nothing_is_sampled_or_marked():
    K, D = 48, 8
    rows, seen, _, _ = _run(K, D, 3, sample_above=64, sample_rows=16)
    for step, (_, after, grad) in enumerate(seen):
        r = rows[step]
        assert "proto/norm/sampled" not in r and "proto/grad/sampled" not in r
        assert r["proto/norm/max"] == pytest.approx(float(after.norm(dim=1).max()), rel=1e-6)
        assert r["proto/grad/per_proto_max"] == pytest.approx(float(grad.norm(dim=1).max()), rel=1e-6)


@pytest.mark.parametrize("sample_above", [16, 10_000])
def test_summary_statistics_stay_exact_sampled_or_not(sample_above):
    K, D = 96, 8
    rows, seen, init, _ = _run(K, D, 4, sample_above=sample_above, sample_rows=8)
    for step, (before, after, grad) in enumerate(seen):
        r = rows[step]
        U = (after - before).double()
        assert r["proto/grad/norm"] == pytest.approx(float(grad.double().norm()), rel=1e-6)
        assert r["proto/grad/raw_norm"] == pytest.approx(float(grad.double().norm()), rel=1e-6)
        assert r["proto/grad/to_weight"] == pytest.approx(float(grad.double().norm() / before.double().norm()), rel=1e-6)
        assert r["proto/delta/norm"] == pytest.approx(float(U.norm()), rel=1e-6)
        assert r["proto/delta/relative"] == pytest.approx(float(U.norm() / before.double().norm()), rel=1e-6)
        assert r["proto/delta/per_proto_max"] == pytest.approx(float(U.norm(dim=1).max()), rel=1e-6)
        assert r["proto/delta/moved"] == float((U.norm(dim=1) > 0).sum())  # every row: a count of K
        assert r["proto/delta/drift"] == pytest.approx(
            float((after.double() - init.double()).norm() / init.double().norm()), rel=1e-6)


def test_above_full_above_the_whole_tensor_statistics_come_every_full_every_steps_exact():
    K, D, n = 96, 8, 24
    rows, seen, init, hub = _run(K, D, 7, full=(64, 3), sample_above=64, sample_rows=n)
    assert not hub.findings
    idx = row_sample(K, 64, n, torch.device("cpu"))
    whole = ("proto/grad/norm", "proto/grad/raw_norm", "proto/grad/to_weight", "proto/delta/norm",
             "proto/delta/relative", "proto/delta/per_proto_max", "proto/delta/moved")
    for step, (before, after, grad) in enumerate(seen):
        r = rows[step]
        # the sampled per-row statistics every step
        assert r["proto/norm/sampled"] == n and r["proto/grad/sampled"] == n
        assert r["proto/grad/per_proto_max"] == pytest.approx(float(grad[idx].norm(dim=1).max()), rel=1e-6)
        # the drift has its own cadence (drift_every=1 here)
        assert r["proto/delta/drift"] == pytest.approx(
            float((after.double() - init.double()).norm() / init.double().norm()), rel=1e-6)
        if step % 3:
            assert not set(whole) & set(r), (step, sorted(set(whole) & set(r)))
            continue
        U = (after - before).double()
        assert r["proto/grad/norm"] == pytest.approx(float(grad.double().norm()), rel=1e-6)
        assert r["proto/grad/raw_norm"] == pytest.approx(float(grad.double().norm()), rel=1e-6)
        assert r["proto/delta/norm"] == pytest.approx(float(U.norm()), rel=1e-6)
        assert r["proto/delta/per_proto_max"] == pytest.approx(float(U.norm(dim=1).max()), rel=1e-6)
        assert r["proto/delta/moved"] == float((U.norm(dim=1) > 0).sum())  # every row, not the sample


def test_full_every_is_checked():
    P = torch.nn.Parameter(torch.randn(8, 4))
    with pytest.raises(ValueError, match="full_every must be an integer >= 1"):
        attach(torch.optim.SGD([P], lr=0.1), P, run=False, sinks=[], console=None, full_every=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_row_distances_in_blocks_equal_the_direct_difference(dtype):
    K, D = 3001, 256                      # 1024-row blocks on a CPU: three, the last one partial
    assert block_rows(torch.Size([K, D]), torch.device("cpu")) == 1024
    a, b = torch.randn(K, D).to(dtype), torch.randn(K, D).to(dtype)
    b[7] = a[7]                           # an unmoved row stays exactly 0
    got, scratch = row_distances(a, b)
    want = torch.linalg.vector_norm(a.double() - b.double(), dim=1)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got[7] == 0
    assert scratch.shape == (1024, D)     # the only work buffer: one block, not (K, D)
    again, scratch2 = row_distances(a, b, scratch)
    assert scratch2 is scratch and torch.equal(again, got)


def test_the_snapshot_is_the_one_k_by_d_buffer():
    K, D = 4096, 256
    P = torch.nn.Parameter(torch.randn(K, D))
    opt = torch.optim.SGD([P], lr=0.1)
    hub = attach(opt, P, run=False, sinks=[], console=None, log_every=5,
                 monitors=["norms", "gradients", "deltas", "evolution", "health"])
    for _ in range(3):
        opt.zero_grad()
        P.square().sum().backward()
        opt.step()
    sh = hub.ctx.proto_stats
    assert sh._snap.shape == (K, D)
    assert sh._scratch.shape[0] * 4 <= K   # differences go through a block of rows
    hub.close()


def test_duplicate_check_is_spread_over_log_intervals():
    K, D = 256, 8
    torch.manual_seed(0)
    base = torch.randn(K // 2, D)
    P = torch.cat([base, base + 1e-4 * torch.randn(K // 2, D)])  # every row has a near-duplicate
    doc = HealthDoctor(dup_pairs_per_log=32 * K, dup_max_pairs=128 * K)  # 128 rows, 32 per interval
    ctx = RunContext(prototypes=P)
    for interval in range(4):
        ctx.step = 10 * interval + 9
        doc.on_log(ctx)
        found = [f.code for f in doc.pop_findings()]
        if interval < 3:
            assert found == [], interval           # the check is not complete yet
        else:
            assert found == ["PROTO_DUPLICATES"]    # judged once its 128 rows are compared
    assert doc.interval.duplicates.checked_rows == 128


def test_duplicate_check_of_a_small_k_is_one_interval_and_exact():
    K, D = 64, 8
    torch.manual_seed(1)
    P = torch.randn(K, D)
    P[1] = P[0]                                     # 2 of 64 rows: 3 %, under dup_fraction
    doc = HealthDoctor()
    ctx = RunContext(prototypes=P, step=9)
    doc.on_log(ctx)
    assert doc.interval.duplicates.checked_rows == K and doc.pop_findings() == []


@pytest.mark.parametrize("full_above, full_every", [(16384, 4), (8, 4)])
def test_a_nan_written_by_the_step_is_seen_through_the_update_norm(full_above, full_every):
    """The health doctor reads NaN/Inf prototypes from the step's update norm (no extra pass
    over P): a NaN that optimizer.step() itself writes is reported at the next log interval,
    also when (above full_above) the update is measured every full_every steps only."""
    torch.manual_seed(0)
    P = torch.nn.Parameter(torch.randn(32, 8))

    opt = torch.optim.SGD([P], lr=0.1)
    steps = []

    def poison(optimizer, args, kwargs):  # registered before attach(): runs first after step()
        steps.append(1)
        if len(steps) == 7:               # step index 6
            P.data[3, 2] = float("nan")

    opt.register_step_post_hook(poison)
    hub = attach(opt, P, run=False, sinks=[], console=None, log_every=5, monitors=["deltas", "health"],
                 full_every=full_every)
    hub.ctx.proto_stats.full_above = full_above
    for _ in range(10):
        opt.zero_grad()
        P.square().sum().backward()
        opt.step()
    hub.close()
    found = [(f.code, f.step) for f in hub.findings if f.severity == "error"]
    assert ("PROTO_NONFINITE", 9) in found


def test_large_k_capture_reads_the_first_rows_and_still_sees_collapse():
    """Above ASSIGN_ENTRIES / N prototypes the assignments derived from the one line are those
    of the first assignment_rows(K) rows of the batch (marked ``proto/usage/sampled``); a collapse
    is still reported from them."""
    K, D, N = 32768, 8, 64
    rows = assignment_rows(K)
    assert rows == 32 and assignment_rows(512) == 2048  # every row of a usual batch at K=512
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, D))
    P = torch.nn.Parameter(torch.randn(K, D))
    opt = torch.optim.SGD([*model.parameters(), P], lr=0.1)
    sink = RecordingSink()
    rec = Recorder()  # what the monitors read in on_step_end
    hub = attach(opt, P, model=model, run=False, sinks=[sink], console=None, log_every=10,
                 monitors=["usage", "health", rec])
    for _ in range(20):
        z = torch.nn.functional.normalize(model(torch.ones(N, 4)), dim=-1)  # every input: one output
        loss = -(z @ torch.nn.functional.normalize(P, dim=-1).T).amax(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hub.close()
    seen = [tuple(o.student_probs.shape) for o in rec.outputs if o is not None and o.student_probs is not None]
    assert seen and set(seen) == {(rows, K)}, seen
    marked = {s: r["proto/usage/sampled"] for s, r in sink.rows if "proto/usage/sampled" in r}
    assert marked and set(marked.values()) == {float(rows)} and all(s % 5 == 0 for s in marked)
    f = next((f for f in hub.findings if f.code == "PROTO_COLLAPSE"), None)
    assert f is not None and "one-prototype kind" in f.message, [str(x) for x in hub.findings]
