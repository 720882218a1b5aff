"""attach() on loops shaped like the three trainers people run (issue 25): 3D-Speaker's SDPN
(``train_sdpn.py``), WeSpeaker's DINO (``dino_executor.run_epoch``: the head called outside the
speaker model's forward, tuple outputs, GradScaler) and facebookresearch/dino (``main_dino.py``:
``MultiCropWrapper``, fp16 GradScaler). The loops are the runnable recipes of
``experiments/examples/`` (tiny models, CPU): the teacher a separate module, the freeze by
``cancel_gradients_last_layer``, the GradScaler at a scale of 2**16.

Asserted: the capture message names the head; a healthy loop raises nothing at warning or error;
each of four faults raises its code within 20 steps; under the GradScaler the logged gradient
norms are the unscaled ones; a step skipped on inf is neither counted nor logged; the summed
gradient across ranks is still told under a GradScaler."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import RecordingSink
from monitors import attach

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "examples"))
import recipe_3dspeaker_sdpn as sdpn  # noqa: E402
import recipe_facebook_dino as fb_dino  # noqa: E402
import recipe_wespeaker_dino as we_dino  # noqa: E402

RECIPES = {"3dspeaker_sdpn": sdpn, "wespeaker_dino": we_dino, "facebook_dino": fb_dino}
#: what the capture message must name: the head (its output, or the input of its prototype layer)
HEAD_NAMED = {"3dspeaker_sdpn": "the output of 'head'",
              "wespeaker_dino": "the input of 'projection_head.last_layer'",
              "facebook_dino": "the input of 'head.last_layer'"}
FAULT_CODE = {"teacher_alias": "TEACHER_SHARES_STUDENT", "no_ema": "TEACHER_NOT_UPDATING",
              "freeze_teacher": "PROTO_FREEZE_IGNORED", "head_not_in_optimizer": "PROTO_NOT_IN_OPTIMIZER",
              "proto_not_in_optimizer": "PROTO_NOT_IN_OPTIMIZER"}


def _train(name: str, **kw: Any):
    """Run a recipe with the hub writing to a RecordingSink; returns (hub, sink, console lines)."""
    lines: list[str] = []
    sink = RecordingSink()
    opts = dict(run=False, sinks=[sink], console=lines.append, log_every=5, tsne={"background": False})
    opts.update(kw)
    out = RECIPES[name].train(**opts)
    hub = out[0] if isinstance(out, tuple) else out
    return hub, sink, lines


def _serious(hub) -> list[str]:
    return [str(f) for f in hub.findings if f.severity in ("warning", "error")]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_healthy_loop_names_the_head_and_raises_nothing(name):
    """20 steps (the first 10 under the declared freeze, by cancel_gradients_last_layer), every
    default monitor: the capture is the head's, nothing at warning or error."""
    hub, sink, lines = _train(name, epochs=2)
    said = [l for l in lines if "capture:" in l]
    assert len(said) == 1 and HEAD_NAMED[name] in said[0] and "FALLBACK" not in said[0], said
    assert _serious(hub) == []
    assert hub.disabled == {}
    assert hub.ctx.step == 20 and hub.skipped_steps == 0
    assert "proto/usage/entropy_student" in sink.keys()  # usage from the automatic capture


@pytest.mark.parametrize("name,fault", [(n, f) for n in sorted(RECIPES) for f in RECIPES[n].FAULTS])
def test_fault_raises_its_code_within_20_steps(name, fault):
    hub, _, _ = _train(name, epochs=2, fault=fault, monitors=["health", "checks"], console=False)
    code = FAULT_CODE[fault]
    hits = [f for f in hub.findings if f.code == code and f.severity in ("warning", "error")]
    assert hits and hits[0].step < 20, [str(f) for f in hub.findings]


def test_wespeaker_capture_before_the_fix_was_an_inner_activation():
    """The trap of the issue is in the recipe: the speaker model returns a tuple whose first element
    (the pooled SE-weighted statistics) is D wide; the capture must not stop at s_model's return."""
    model = we_dino.DINO(we_dino.TinyECAPA())
    out = model.s_model(torch.randn(4, we_dino.FRAMES, we_dino.N_MELS))
    assert isinstance(out, tuple) and out[0].shape[-1] == we_dino.BOTTLENECK


def test_inner_module_fallback_says_so_and_how_to_name_the_module():
    """Nothing in a head has the prototypes' width (the head is outside the model): the choice
    falls back to an inner D-wide activation, and its message says so and names a module to pass."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))  # D=16 wide inside
    head = nn.Linear(8, 16)
    P = nn.Parameter(torch.randn(10, 16))
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters(), P], lr=0.1)
    lines: list[str] = []
    hub = attach(opt, P, model=backbone, run=False, console=lines.append, monitors=["usage"])
    for _ in range(2):
        z = nn.functional.normalize(head(backbone(torch.randn(8, 12))), dim=-1)
        loss = -torch.log_softmax(z @ nn.functional.normalize(P, dim=-1).T / 0.1, -1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hub.close()
    said = [l for l in lines if "capture:" in l]
    assert len(said) == 1 and "FALLBACK" in said[0] and "the output of '1'" in said[0], said
    assert "capture='<module name>'" in said[0] and "pass a model= that holds it" in said[0], said
    # with the head in the model the message offers its name
    model = nn.Sequential(backbone, nn.Sequential())
    model.add_module("proj_head", nn.Identity())
    lines.clear()
    hub = attach(opt, P, model=model, run=False, console=lines.append, monitors=["usage"])
    z = nn.functional.normalize(head(model(torch.randn(8, 12))), dim=-1)
    opt.zero_grad()
    (z @ P.T).mean().backward()
    hub.close()
    said = [l for l in lines if "capture:" in l]
    assert "FALLBACK" in said[0] and "capture='proj_head'" in said[0], said


def test_explicit_capture_wins():
    hub, _, lines = _train("wespeaker_dino", epochs=1, epoch_iter=2, capture="projection_head.mlp",
                           monitors=["usage"])
    assert hub._capture[1] == "projection_head.mlp"
    assert not any("capture:" in l for l in lines)


# -- AMP -------------------------------------------------------------------------------------------
def _true_grad_norms():
    """Record ||grad|| of every parameter at every optimizer.step() of any optimizer (a global
    pre-hook runs before the optimizer's own, so it sees what the hub sees)."""
    seen: list[dict[int, float]] = []

    def hook(opt, args, kwargs):
        seen.append({id(p): float(p.grad.detach().double().norm()) for g in opt.param_groups
                     for p in g["params"] if p.grad is not None})
    handle = register_optimizer_step_pre_hook(hook)
    return seen, handle


@pytest.mark.parametrize("name", ["wespeaker_dino", "facebook_dino"])
def test_gradient_norms_under_grad_scaler_are_the_unscaled_ones(name):
    """GradScaler at 2**16: proto/grad/norm and proto/grad/raw_norm (on_after_backward) equal the
    norms of the unscaled gradients the optimizer used, step by step, after the freeze."""
    seen, handle = _true_grad_norms()
    try:
        hub, sink, _ = _train(name, epochs=2, monitors=["gradients"], console=False)
    finally:
        handle.remove()
    assert RECIPES[name] is not None and len(seen) == 20
    pid = id(hub.ctx.prototypes)
    rows = dict(sink.rows)
    checked = 0
    for step in range(10, 20):  # after the freeze: the prototypes have a gradient
        true = seen[step][pid]
        assert 0 < true < 100  # a scaled one would be ~2**16 times larger
        for key in ("proto/grad/norm", "proto/grad/raw_norm"):
            if key in rows.get(step, {}):
                assert rows[step][key] == pytest.approx(true, rel=1e-5), (step, key)
                checked += 1
    assert checked >= 10


def test_skipped_step_is_neither_counted_nor_logged():
    """An inf in the loss at one step: GradScaler skips optimizer.step(); the hub's step counter,
    its logged rows and its findings ignore that step, and the gradients logged stay unscaled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))
    layer = nn.Linear(8, 20, bias=False)
    opt = torch.optim.SGD([*model.parameters(), *layer.parameters()], lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    sink = RecordingSink()
    hub = attach(opt, layer, model=nn.Sequential(model, layer), run=False, sinks=[sink], console=False,
                 log_every=5, monitors=["gradients", "deltas", "health", "checks"])
    seen, handle = _true_grad_norms()
    try:
        for i in range(12):
            x = torch.randn(16, 12)
            logits = layer(nn.functional.normalize(model(x), dim=-1))
            loss = -torch.log_softmax(logits / 0.1, -1).mean()
            if i == 4:
                loss = loss * float("inf")
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    finally:
        handle.remove()
    hub.close()
    assert scaler.get_scale() == 2.0 ** 15  # halved once: one step skipped
    assert hub.skipped_steps == 1 and hub.ctx.step == 11 and len(seen) == 11
    assert _serious(hub) == []
    rows = dict(sink.rows)
    # steps 0..10 (11: what close() writes at the end, no step outputs)
    assert sorted(rows)[:11] == list(range(11)) and set(rows) <= set(range(12))
    assert not any(k.startswith(("proto/grad", "proto/update", "train/")) for k in rows.get(11, {})), rows.get(11)
    for step in range(11):
        v = rows[step].get("proto/grad/raw_norm")
        if v is not None:
            assert math.isfinite(v) and v == pytest.approx(seen[step][id(layer.weight)], rel=1e-5)


# -- PROTO_GRAD_NOT_AVERAGED under a GradScaler ------------------------------------------------------
def _scaled_sum_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        for variant in ("mean", "sum"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))
            P = nn.Parameter(torch.randn(20, 8) * 0.3)
            opt = torch.optim.SGD([P], lr=0.1, momentum=0.9)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
            hub = attach(opt, P, model=model, run=False, console=False, log_every=5,
                         monitors=["health", "checks"], checks={"grad_avg_every": 2})
            g = torch.Generator().manual_seed(10 + rank)
            for _ in range(10):
                with torch.no_grad():
                    z = nn.functional.normalize(model(torch.randn(16, 12, generator=g)), dim=-1)
                loss = -torch.log_softmax(z @ nn.functional.normalize(P, dim=-1).T / 0.1, -1).mean()
                opt.zero_grad()
                scaler.scale(loss).backward()
                dist.all_reduce(P.grad)  # 3D-Speaker's AllReduceSum (on the scaled gradient)
                if variant == "mean":
                    P.grad /= world
                scaler.step(opt)
                scaler.update()
            hub.close()
            result[variant] = [[f.code, f.severity] for f in hub.findings
                               if f.code == "PROTO_GRAD_NOT_AVERAGED" or f.severity != "info"]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)  # results are on disk: skip gloo's C++ teardown (see test_attach)


def test_summed_gradient_is_told_under_grad_scaler(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_scaled_sum_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["mean"] == [], r["mean"]
        assert r["sum"] == [["PROTO_GRAD_NOT_AVERAGED", "warning"]], r["sum"]


def test_scaler_found_only_at_the_step_still_gives_unscaled_norms():
    """A scaler the backward-time search cannot see (held in a list, not a local or an attribute):
    found at the first optimizer.step() (GradScaler.step is on the stack), the first step's
    gradient work is redone on the unscaled gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))
    layer = nn.Linear(8, 20, bias=False)
    opt = torch.optim.SGD([*model.parameters(), *layer.parameters()], lr=0.05)
    holder = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)]
    sink = RecordingSink()
    hub = attach(opt, layer, model=nn.Sequential(model, layer), run=False, sinks=[sink], console=False,
                 log_every=5, monitors=["gradients"])
    seen, handle = _true_grad_norms()
    try:
        for _ in range(3):
            loss = -torch.log_softmax(layer(nn.functional.normalize(model(torch.randn(16, 12)), dim=-1)) / 0.1,
                                      -1).mean()
            opt.zero_grad()
            holder[0].scale(loss).backward()
            holder[0].step(opt)
            holder[0].update()
    finally:
        handle.remove()
    hub.close()
    rows = dict(sink.rows)
    for step in range(3):
        assert rows[step]["proto/grad/raw_norm"] == pytest.approx(seen[step][id(layer.weight)], rel=1e-5), step
