"""Metric monitors: norms, gradients, deltas, usage, similarity, evolution.

Hooks are driven directly on tiny CPU tensors with hand-computed expectations, plus one run of
all six through a MonitorHub with a recording sink.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from monitors.plugins.deltas import DeltaMonitor
from monitors.core.events import RunContext, StepOutputs
from monitors.plugins.evolution import EvolutionMonitor
from monitors.plugins.gradients import GradientMonitor
from monitors.core.hub import MonitorHub
from monitors.core.media import Histogram, Image, VectorStat, reduce_rows
from monitors.plugins.norms import NormMonitor
from monitors.core.registry import build_monitors
from monitors.plugins.similarity import SimilarityMonitor
from monitors.plugins.usage import UsageMonitor
from conftest import RecordingSink

NAMES = ["norms", "gradients", "deltas", "usage", "similarity", "evolution"]


def ctx_for(P: torch.Tensor, step: int = 0, **kw) -> RunContext:
    return RunContext(prototypes=P, step=step, **kw)


def val(x) -> float:
    """The value a hook returned: a 0-dim tensor, or a VectorStat reduced as the hub does."""
    if isinstance(x, VectorStat):
        return float(reduce_rows(x.values.reshape(1, -1), x.stat)[0])
    assert isinstance(x, torch.Tensor) and x.dim() == 0, f"expected a 0-dim tensor, got {x!r}"
    return float(x)


# -- norms -----------------------------------------------------------------------------------
def test_norms_known_rows_and_hist_cadence():
    P = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    m = NormMonitor(hist_every=50)
    out = m.on_step_end(ctx_for(P, step=0))
    assert val(out["proto/norm/mean"]) == pytest.approx(2.0)
    assert val(out["proto/norm/min"]) == pytest.approx(0.0)
    assert val(out["proto/norm/max"]) == pytest.approx(5.0)
    assert val(out["proto/norm/std"]) == pytest.approx(math.sqrt(14 / 3))  # population std
    np.testing.assert_allclose(out["proto/norm/hist"].numpy(), [5.0, 0.0, 1.0])
    assert "proto/norm/hist" not in m.on_step_end(ctx_for(P, step=1))
    assert "proto/norm/hist" in m.on_step_end(ctx_for(P, step=50))
    with pytest.raises(ValueError, match="hist_every"):
        NormMonitor(hist_every=0)


# -- gradients -------------------------------------------------------------------------------
def test_gradients_known_values_and_groups():
    P = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))      # ||P|| = sqrt(5)
    P.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])                     # row norms 5, 0
    w = torch.nn.Parameter(torch.tensor([2.0, 0.0]))
    w.grad = torch.tensor([0.0, 1.0])
    b = torch.nn.Parameter(torch.tensor([1.0]))                         # no grad: skipped
    u = torch.nn.Parameter(torch.tensor([1.0]))                         # a group with no grads
    ctx = ctx_for(P, param_groups={"head": [w, b], "frozen": [u]})
    m = GradientMonitor()
    assert val(m.on_after_backward(ctx)["proto/grad/raw_norm"]) == pytest.approx(5.0)
    out = m.on_before_optimizer_step(ctx)
    assert val(out["proto/grad/norm"]) == pytest.approx(5.0)
    assert val(out["proto/grad/per_proto_mean"]) == pytest.approx(2.5)
    assert val(out["proto/grad/per_proto_max"]) == pytest.approx(5.0)
    assert val(out["proto/grad/to_weight"]) == pytest.approx(5.0 / math.sqrt(5.0))
    assert val(out["grad/head/norm"]) == pytest.approx(1.0)
    assert val(out["grad/head/to_weight"]) == pytest.approx(0.5)  # b has no grad: not in ||W||
    assert not any(k.startswith("grad/frozen/") for k in out)
    np.testing.assert_allclose(out["proto/grad/hist"].numpy(), [5.0, 0.0])


def test_gradients_absent_or_non_leaf_gives_nothing_and_no_warning():
    m = GradientMonitor()
    P = torch.nn.Parameter(torch.ones(3, 2))
    assert m.on_before_optimizer_step(ctx_for(P)) is None
    non_leaf = torch.nn.Parameter(torch.ones(3, 2)) * 1.0   # like Parameter(x).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.on_after_backward(ctx_for(non_leaf)) is None
        assert m.on_before_optimizer_step(ctx_for(non_leaf)) is None


# -- deltas ----------------------------------------------------------------------------------
def test_deltas_known_update_moved_and_drift_round_trip():
    P = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 0.0]])  # ||P|| = 3
    m = DeltaMonitor()
    ctx = ctx_for(P)  # one context per run, as a loop keeps it: it holds the shared snapshot
    m.on_train_start(ctx)
    m.on_before_optimizer_step(ctx)
    P[0] += torch.tensor([3.0, 4.0])                                      # one row moves by 5
    out = m.on_after_optimizer_step(ctx)
    assert val(out["proto/delta/norm"]) == pytest.approx(5.0)
    assert val(out["proto/delta/relative"]) == pytest.approx(5.0 / 3.0)
    assert val(out["proto/delta/per_proto_mean"]) == pytest.approx(5.0 / 4)
    assert val(out["proto/delta/per_proto_max"]) == pytest.approx(5.0)
    assert val(out["proto/delta/moved"]) == 1.0
    assert val(out["proto/delta/drift"]) == pytest.approx(5.0 / 3.0)
    np.testing.assert_allclose(m.last_update_norms.numpy(), [5.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(m.last_proto_norms.numpy(), [math.hypot(4, 4), 2.0, 2.0, 0.0])
    assert val(m.last_delta_norm) == pytest.approx(5.0)

    # a tiny change still counts as moved; no snapshot for this step -> nothing
    ctx.step = 1
    assert m.on_after_optimizer_step(ctx) is None
    m.on_before_optimizer_step(ctx)
    P[3, 1] = 1e-12
    out1 = m.on_after_optimizer_step(ctx)
    assert val(out1["proto/delta/moved"]) == 1.0
    assert "proto/delta/drift" not in out1                             # every drift_every=10 steps

    # resume: drift keeps measuring against the original init, not the resumed prototypes
    state = m.state_dict()
    assert state["init"].device.type == "cpu"
    m2 = DeltaMonitor()
    m2.load_state_dict(state)
    ctx2 = ctx_for(P, step=2)
    m2.on_train_start(ctx2)
    m2.on_before_optimizer_step(ctx2)
    out2 = m2.on_after_optimizer_step(ctx2)
    assert val(out2["proto/delta/norm"]) == 0.0 and val(out2["proto/delta/moved"]) == 0.0
    assert val(m2.on_train_end(ctx2)["proto/delta/drift"]) == pytest.approx(5.0 / 3.0)


# -- usage -----------------------------------------------------------------------------------
def test_usage_targets_on_three_prototypes_then_dead_after_window():
    K, N, window = 8, 6, 5
    targets = torch.zeros(N, K)
    targets[torch.arange(N), torch.tensor([0, 1, 2, 0, 1, 2])] = 1.0    # one-hot on 0, 1, 2
    probs = torch.full((N, K), 1.0 / K)                                   # uniform student
    outs = StepOutputs(student_probs=probs, teacher_targets=targets)
    m = UsageMonitor(window=window)
    for step in range(window):  # first `window` steps: nothing is dead yet
        out = m.on_step_end(ctx_for(torch.zeros(K, 2), step=step, outputs=outs))
        assert val(out["proto/usage/dead"]) == 0.0
    assert val(out["proto/usage/distinct_targets"]) == 3.0
    assert val(out["proto/usage/entropy_student"]) == pytest.approx(math.log(K))
    assert val(out["proto/usage/perplexity_student"]) == pytest.approx(K)
    assert val(out["proto/usage/entropy_teacher"]) == pytest.approx(math.log(3))
    assert val(out["proto/usage/perplexity_teacher"]) == pytest.approx(3.0)
    out = m.on_step_end(ctx_for(torch.zeros(K, 2), step=window, outputs=outs))
    assert val(out["proto/usage/dead"]) == K - 3
    assert val(out["proto/usage/dead_fraction"]) == pytest.approx((K - 3) / K)

    # resume; then prototype 2 stops being chosen and dies `window` steps after its last use
    m2 = UsageMonitor(window=window)
    m2.load_state_dict(m.state_dict())
    t2 = targets.clone()
    t2[2], t2[5] = targets[0], targets[1]                                 # only 0 and 1 now
    outs2 = StepOutputs(teacher_targets=t2)
    last_use_of_2 = window
    for step in range(window + 1, last_use_of_2 + window):
        out = m2.on_step_end(ctx_for(torch.zeros(K, 2), step=step, outputs=outs2))
        assert val(out["proto/usage/dead"]) == K - 3
        assert "proto/usage/entropy_student" not in out                     # no student probs
    out = m2.on_step_end(ctx_for(torch.zeros(K, 2), step=last_use_of_2 + window, outputs=outs2))
    assert val(out["proto/usage/dead"]) == K - 2
    assert val(out["proto/usage/distinct_targets"]) == 2.0


def test_usage_skips_silently_without_outputs():
    m = UsageMonitor()
    assert m.on_step_end(ctx_for(torch.zeros(4, 2))) is None
    assert m.on_step_end(ctx_for(torch.zeros(4, 2), outputs=StepOutputs())) is None


# -- similarity ------------------------------------------------------------------------------
def test_similarity_identical_orthogonal_and_known():
    m = SimilarityMonitor(every_n_steps=1)
    K = 5
    out = m.on_step_end(ctx_for(torch.ones(K, 3) * torch.tensor([1.0, 2.0, 3.0])))
    assert val(out["proto/similarity/duplicates"]) == K
    assert val(out["proto/similarity/max"]) == pytest.approx(1.0, abs=1e-6)
    assert val(out["proto/similarity/min_distance"]) == pytest.approx(0.0, abs=1e-3)

    out = SimilarityMonitor(every_n_steps=1).on_step_end(ctx_for(2.0 * torch.eye(4)))
    assert val(out["proto/similarity/duplicates"]) == 0.0
    assert val(out["proto/similarity/max"]) == pytest.approx(0.0)
    assert val(out["proto/similarity/min_distance"]) == pytest.approx(math.sqrt(2.0))

    # cosines: (0,1) = -1, (0,2) = 0, (1,2) = 0
    out = SimilarityMonitor(every_n_steps=1).on_step_end(
        ctx_for(torch.tensor([[1.0, 0.0], [-3.0, 0.0], [0.0, 2.0]])))
    assert val(out["proto/similarity/mean"]) == pytest.approx(-1.0 / 3.0)
    assert val(out["proto/similarity/mean_abs"]) == pytest.approx(1.0 / 3.0)
    assert val(out["proto/similarity/max"]) == pytest.approx(0.0)
    assert val(out["proto/similarity/nn_mean"]) == pytest.approx(0.0)
    np.testing.assert_allclose(np.sort(out["proto/similarity/hist"].numpy()), [-1.0, 0.0, 0.0], atol=1e-6)


def test_similarity_subset_is_fixed_and_bounded():
    torch.manual_seed(0)
    P = torch.randn(50, 4)
    P[1] = P[0]  # duplicates exist, but maybe outside the subset
    m = SimilarityMonitor(every_n_steps=1, max_proto=8, hist_pairs=10)
    a = m.on_step_end(ctx_for(P, step=0))
    b = m.on_step_end(ctx_for(P, step=50))
    assert val(a["proto/similarity/mean"]) == val(b["proto/similarity/mean"])
    assert a["proto/similarity/hist"].numpy().shape == (10,)
    assert val(a["proto/similarity/duplicates"]) <= 8


# -- evolution -------------------------------------------------------------------------------
def _evo_step(m: EvolutionMonitor, P: torch.Tensor, step: int, delta: torch.Tensor) -> None:
    ctx = ctx_for(P, step=step)  # before and after see one context, as in a loop
    m.on_before_optimizer_step(ctx)
    P += delta
    m.on_after_optimizer_step(ctx)


def test_evolution_records_compacts_renders_and_resumes():
    K = 3
    P = torch.zeros(K, 2)
    delta = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 0.0]])  # row 2 never moves
    m = EvolutionMonitor(every_n_steps=1, max_columns=4, image_every=3, max_rows=2, min_render_seconds=0)
    for step in range(4):
        _evo_step(m, P, step, delta)
    h = m.history()
    assert h["steps"] == [0, 1, 2, 3]
    assert h["norm"].shape == (2, 4) and list(h["rows"]) == [0, 2]   # sorted by norm, 2 of 3
    np.testing.assert_allclose(h["norm"][0], [1, 2, 3, 4])
    np.testing.assert_allclose(h["update"][0], [1, 1, 1, 1])
    np.testing.assert_allclose(h["update"][1], [0, 0, 0, 0])
    _evo_step(m, P, 4, delta)           # full: keep steps 0, 2 then record 4; interval doubles
    assert m.history()["steps"] == [0, 2, 4]
    _evo_step(m, P, 5, delta)           # not due (interval 2)
    _evo_step(m, P, 6, delta)
    assert m.history()["steps"] == [0, 2, 4, 6]

    imgs = m.on_log(ctx_for(P, step=6))
    for key in ("proto/evolution/norm", "proto/evolution/update"):
        arr = imgs[key].array()
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 4
    assert m.on_log(ctx_for(P, step=7)) is None                # not due again before image_every

    state = m.state_dict()
    assert state["norm"].device.type == "cpu" and state["steps"] == [0, 2, 4, 6]
    m2 = EvolutionMonitor(every_n_steps=1, max_columns=4, image_every=3, max_rows=2, min_render_seconds=0)
    m2.load_state_dict(state)
    assert m2.history()["steps"] == [0, 2, 4, 6]
    _evo_step(m2, P, 7, delta)           # still interval 2 after the resume
    _evo_step(m2, P, 8, delta)
    h2 = m2.history()
    assert h2["steps"] == [0, 4, 8]
    np.testing.assert_allclose(h2["norm"][0], [1, 5, 9])
    assert "proto/evolution/update" in m2.on_train_end(ctx_for(P, step=8))
    assert m2.on_train_end(ctx_for(P, step=8)) is None         # nothing new since the last render


def test_evolution_renders_at_most_once_per_min_render_seconds():
    P = torch.ones(4, 3)
    m = EvolutionMonitor(every_n_steps=1, image_every=1, min_render_seconds=3600)
    _evo_step(m, P, 0, torch.zeros(4, 3))
    assert m.on_log(ctx_for(P, step=0)) is not None            # the first render is never held back
    _evo_step(m, P, 1, torch.zeros(4, 3))
    assert m.on_log(ctx_for(P, step=1)) is None                # due by steps, held back by time
    assert m.on_train_end(ctx_for(P, step=1)) is not None      # the final picture always comes


def test_evolution_warm_figures_draw_what_fresh_ones_do():
    """on_train_start makes and draws both figures before training; a render afterwards (with
    another y label) gives the very pixels of a figure made for it, and the next render draws
    the new data into the same figure."""
    from monitors.plugins.evolution import _Heatmap
    steps, data = [0, 10, 20], np.arange(12, dtype=np.float64).reshape(4, 3)
    fresh = _Heatmap("c").render(steps, data, "t at 20", "rank (4 of 4)")
    warm = _Heatmap("c")
    warm.warm()
    fig = warm._fig
    assert fig is not None
    assert np.array_equal(warm.render(steps, data, "t at 20", "rank (4 of 4)"), fresh)
    assert warm._fig is fig                                     # the warmed figure was reused
    assert not np.array_equal(warm.render(steps, data[::-1], "t at 20", "rank (4 of 4)"), fresh)
    m = EvolutionMonitor()
    m.on_train_start(ctx_for(torch.ones(4, 3), step=0))
    assert m._norm_map._fig is not None and m._update_map._fig is not None


def test_evolution_uneven_columns_and_frozen_prototypes_render():
    P = torch.ones(4, 3)
    m = EvolutionMonitor(every_n_steps=1, image_every=1, min_render_seconds=0)
    for step in (0, 1, 2, 10):                                  # uneven spacing: true widths
        _evo_step(m, P, step, torch.zeros(4, 3))                # nothing ever moves
    h = m.history()
    assert h["steps"] == [0, 1, 2, 10] and not h["update"].any()
    out = m.on_log(ctx_for(P, step=10))
    assert out["proto/evolution/update"].array().shape[2] == 4
    _evo_step(m, P, 11, torch.zeros(4, 3))
    assert m.on_log(ctx_for(P, step=11))["proto/evolution/norm"].array().dtype == np.uint8


# -- no synchronisation in per-step hooks ------------------------------------------------------
_SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy",
            "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount"}


class _NoSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _SYNCING:
            raise AssertionError(f"per-step hook called {name} (a device sync)")
        if name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                         for a in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            raise AssertionError("per-step hook used boolean-mask indexing (a device sync)")
        return func(*args, **(kwargs or {}))


def _check_values(out) -> None:
    for k, v in (out or {}).items():
        assert not isinstance(v, bool), f"{k} is a Python bool"
        if isinstance(v, torch.Tensor):
            assert v.dim() == 0, f"{k} has shape {tuple(v.shape)}"
        else:
            assert isinstance(v, (int, float, Histogram, VectorStat)), f"{k} is {type(v).__name__}"


def test_no_sync_guard_catches_syncs():
    t = torch.ones(3)
    for bad in (lambda: t.sum().item(), lambda: bool(t[0] > 0), lambda: t[t > 0],
                lambda: torch.nonzero(t), lambda: t.tolist()):
        with pytest.raises(AssertionError, match="sync"), _NoSync():
            bad()


def test_per_step_hooks_do_not_sync_and_return_tensors_or_media():
    torch.manual_seed(0)
    K, D, N = 16, 8, 12
    P = torch.nn.Parameter(torch.randn(K, D))
    w = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.SGD([P, w], lr=0.1)
    monitors = build_monitors({n: {"every_n_steps": 1} for n in NAMES})
    for step in range(3):
        loss = (P.square().sum(1) * torch.arange(K)).sum() + w.sum()
        opt.zero_grad()
        loss.backward()
        probs = torch.softmax(torch.randn(N, K), 1)
        outs = StepOutputs(student_probs=probs, teacher_targets=torch.softmax(5 * torch.randn(N, K), 1))
        ctx = RunContext(prototypes=P, optimizer=opt, step=step, param_groups={"head": [w]})
        for event in ("on_after_backward", "on_before_optimizer_step", "on_after_optimizer_step",
                      "on_step_end"):
            if event == "on_after_optimizer_step":
                opt.step()
            if event == "on_step_end":
                ctx.outputs = outs
            for m in monitors:
                with _NoSync():
                    out = getattr(m, event)(ctx)
                _check_values(out)


# -- all six through a hub -------------------------------------------------------------------

EXPECTED_SCALARS = [
    "proto/norm/mean", "proto/norm/min", "proto/norm/max", "proto/norm/std",
    "proto/grad/raw_norm", "proto/grad/norm", "proto/grad/per_proto_mean",
    "proto/grad/per_proto_max", "proto/grad/to_weight", "grad/head/norm", "grad/head/to_weight",
    "proto/delta/norm", "proto/delta/relative", "proto/delta/per_proto_mean",
    "proto/delta/per_proto_max", "proto/delta/moved", "proto/delta/drift",
    "proto/usage/distinct_targets", "proto/usage/entropy_student", "proto/usage/perplexity_student",
    "proto/usage/entropy_teacher", "proto/usage/perplexity_teacher", "proto/usage/dead",
    "proto/usage/dead_fraction",
    "proto/similarity/max", "proto/similarity/mean", "proto/similarity/mean_abs",
    "proto/similarity/nn_mean", "proto/similarity/duplicates", "proto/similarity/min_distance",
]
EXPECTED_MEDIA = {
    "proto/norm/hist": Histogram, "proto/grad/hist": Histogram, "proto/usage/hist": Histogram,
    "proto/similarity/hist": Histogram, "proto/evolution/norm": Image, "proto/evolution/update": Image,
}


def test_all_six_through_hub_for_30_steps():
    torch.manual_seed(0)
    K, D, N, steps = 32, 8, 16, 30
    P = torch.nn.Parameter(torch.randn(K, D))
    head = torch.nn.Linear(4, D)
    opt = torch.optim.SGD([P, *head.parameters()], lr=0.05)
    monitors = build_monitors({"norms": {"hist_every": 10}, "gradients": {"hist_every": 10},
                               "deltas": {}, "usage": {"window": 10, "hist_every": 10},
                               "similarity": {"every_n_steps": 5, "hist_every": 10},
                               "evolution": {"every_n_steps": 2, "image_every": 10, "min_render_seconds": 0}})
    sink = RecordingSink()
    hub = MonitorHub(monitors, sinks=[sink], log_every=10, console=None)
    ctx = RunContext(prototypes=P, optimizer=opt, param_groups={"head": list(head.parameters())})
    hub.emit("on_train_start", ctx)
    for step in range(steps):
        ctx.step = step
        x = torch.randn(N, 4)
        z = torch.nn.functional.normalize(head(x), dim=1)
        logits = z @ torch.nn.functional.normalize(P, dim=1).T / 0.1       # (N, K)
        probs = logits.softmax(1)
        targets = torch.nn.functional.one_hot(torch.randint(0, 4, (N,)), K).float()
        loss = -(targets * probs.clamp_min(1e-9).log()).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        hub.emit("on_after_backward", ctx)
        torch.nn.utils.clip_grad_norm_([P], 1.0)
        hub.emit("on_before_optimizer_step", ctx)
        opt.step()
        hub.emit("on_after_optimizer_step", ctx)
        ctx.outputs = StepOutputs(loss=loss.detach(), student_probs=probs.detach(), teacher_targets=targets)
        hub.emit("on_step_end", ctx)
    hub.emit("on_train_end", ctx)
    hub.close()

    assert hub.disabled == {} and sink.alerts == []
    seen: dict = {}
    for _, row in sink.rows:
        for k, v in row.items():
            seen.setdefault(k, []).append(v)
    for key in EXPECTED_SCALARS:
        assert key in seen, f"{key} never logged"
        assert all(isinstance(v, float) and math.isfinite(v) for v in seen[key]), key
    for key, kind in EXPECTED_MEDIA.items():
        assert key in seen and all(isinstance(v, kind) for v in seen[key]), key
    assert len(seen["proto/norm/mean"]) == steps
    assert len(seen["proto/similarity/max"]) == steps // 5
    assert all(v > 0 for v in seen["proto/delta/norm"])                   # SGD did move P
    assert seen["proto/usage/dead"][-1] == K - 4                            # targets only 0..3
    assert seen["proto/usage/distinct_targets"][-1] <= 4
    evo = hub.get("evolution").history()
    assert evo["steps"] == list(range(0, steps, 2)) and evo["norm"].shape == (K, steps // 2)
    # the hub's state round trip restores every monitor
    state = hub.state_dict()
    hub2 = MonitorHub(build_monitors(NAMES), console=None)
    hub2.load_state_dict(state)
    assert hub2.get("evolution").history()["steps"] == evo["steps"]
