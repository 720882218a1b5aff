"""HealthDoctor: each finding code fires on the bug it names and stays silent on a healthy run.

Foreign mini-loops (a linear model, prototypes P (16, 8), SGD) emit the events through a
MonitorHub with a fake sink, as any training loop would.
"""
from __future__ import annotations

import datetime
import io
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from monitors import MonitorHub, RunContext, StepOutputs
from monitors.health import doctor as health
from monitors.health.doctor import (
    CODES, HealthDoctor, check_checkpoint, find_prototypes_in_checkpoint,
    prototype_optimizer_state_in_checkpoint,
)
from monitors.core.registry import build_monitors
from conftest import RecordingSink as FakeSink, sinkhorn

K, D, IN, B = 16, 8, 4, 8


def forward(model: nn.Module, P: torch.Tensor, x: torch.Tensor):
    """SDPN-like step: student probabilities p, Sinkhorn targets t, cross-entropy."""
    z = model(x)
    logits = F.normalize(z, dim=-1) @ F.normalize(P, dim=-1).T / 0.1  # (N, K)
    log_p = logits.log_softmax(dim=-1)
    with torch.no_grad():
        s = log_p.exp() ** 4  # sharpen, T = 0.25
        t = sinkhorn(s / s.sum(dim=1, keepdim=True))
    loss = -(t * log_p).sum(dim=1).mean()
    return loss, log_p.exp().detach(), t


class Setup:
    def __init__(self, seed: int = 0, in_optimizer: bool = True, proto_lr: Optional[float] = None,
                 non_leaf: bool = False, **doctor_options: Any) -> None:
        torch.manual_seed(seed)
        self.model = nn.Linear(IN, D)
        leaf = nn.Parameter(torch.empty(K, D).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
        self.leaf = leaf
        # the trap: a copy of the Parameter is what the loop (and the monitor) sees
        self.P = leaf.to(copy=True) if non_leaf else leaf
        groups = [{"params": list(self.model.parameters())}]
        if in_optimizer:
            g = {"params": [leaf], "weight_decay": 0.0}
            if proto_lr is not None:
                g["lr"] = proto_lr
            groups.append(g)
        self.opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        self.sink = FakeSink()
        self.doctor = HealthDoctor(**doctor_options)
        self.hub = MonitorHub([self.doctor], sinks=[self.sink], log_every=5, console=None)
        self.ctx = RunContext(prototypes=self.P, optimizer=self.opt, model=self.model)

    def run(self, steps: int, start: int = 0, x_fn: Optional[Callable[[int], torch.Tensor]] = None,
            before_step: Optional[Callable[[int], None]] = None,
            lr_fn: Optional[Callable[[int], None]] = None, train_start: bool = True) -> None:
        ctx, hub = self.ctx, self.hub
        if train_start:
            hub.emit("on_train_start", ctx)
        gen = torch.Generator().manual_seed(1234 + start)
        for step in range(start, start + steps):
            ctx.step = step
            if lr_fn is not None:
                lr_fn(step)
            x = x_fn(step) if x_fn is not None else torch.randn(B, IN, generator=gen)
            self.opt.zero_grad(set_to_none=True)
            loss, p, t = forward(self.model, self.P, x)
            loss.backward()
            hub.emit("on_after_backward", ctx)
            if before_step is not None:
                before_step(step)
            hub.emit("on_before_optimizer_step", ctx)
            self.opt.step()
            hub.emit("on_after_optimizer_step", ctx)
            ctx.outputs = StepOutputs(loss=loss.detach(), student_probs=p, teacher_targets=t)
            hub.emit("on_step_end", ctx)

    def serious(self) -> dict[str, str]:
        return {f.code: f.severity for f in self.hub.findings if f.severity != "info"}

    def first(self, code: str, severity: str):
        return next((f for f in self.hub.findings if f.code == code and f.severity == severity), None)


# -- healthy ---------------------------------------------------------------------------------
def test_healthy_loop_raises_nothing():
    s = Setup()
    before = s.P.detach().clone()
    s.run(30)
    ckpt = {"model": s.model.state_dict(), "prototypes": s.P, "optimizer": s.opt.state_dict()}
    s.ctx.checkpoint = ckpt
    s.hub.emit("on_save_checkpoint", s.ctx)
    s.hub.emit("on_load_checkpoint", s.ctx)
    s.hub.emit("on_train_end", s.ctx)
    assert not torch.equal(before, s.P.detach())  # the loop really trains the prototypes
    assert s.hub.findings == []
    assert s.sink.summary["health/errors"] == 0 and s.sink.summary["health/warnings"] == 0


def test_per_step_hooks_never_sync():
    """Per-step hooks must not read device values: .item(), bool(), .cpu() ... raise here."""
    s = Setup()
    doc = s.doctor
    banned = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]

    @contextmanager
    def no_sync():
        saved = {n: getattr(torch.Tensor, n) for n in banned}

        def boom(*a, **k):
            raise AssertionError("a per-step hook synchronised with the device")

        for n in banned:
            setattr(torch.Tensor, n, boom)
        try:
            yield
        finally:
            for n, f in saved.items():
                setattr(torch.Tensor, n, f)

    doc.on_train_start(s.ctx)
    for step in range(12):
        s.ctx.step = step
        s.opt.zero_grad(set_to_none=True)
        loss, p, t = forward(s.model, s.P, torch.randn(B, IN))
        loss.backward()
        with no_sync():
            doc.on_after_backward(s.ctx)
            doc.on_before_optimizer_step(s.ctx)
        s.opt.step()
        s.ctx.outputs = StepOutputs(student_probs=p, teacher_targets=t)
        with no_sync():
            doc.on_after_optimizer_step(s.ctx)
            doc.on_step_end(s.ctx)
        if step % 5 == 4:
            doc.on_log(s.ctx)
    assert doc.pop_findings() == []


# -- static traps ----------------------------------------------------------------------------
def test_not_in_optimizer_error_at_start_and_not_updating_within_20_steps():
    s = Setup(in_optimizer=False)
    s.run(20)
    f = s.first("PROTO_NOT_IN_OPTIMIZER", "error")
    assert f is not None and f.step == 0 and "add_param_group" in f.message
    g = s.first("PROTO_NOT_UPDATING", "error")
    assert g is not None and g.step < 20
    assert "PROTO_NOT_UPDATING" in s.sink.summary["health/codes"]


def test_non_leaf_prototypes():
    s = Setup(non_leaf=True)
    assert not s.P.is_leaf
    s.run(5)
    f = s.first("PROTO_NOT_LEAF", "error")
    assert f is not None and f.step == 0 and "nn.Parameter(x.to(device))" in f.message


def test_requires_grad_false_is_error_unless_frozen():
    s = Setup()
    s.P.requires_grad_(False)
    s.hub.emit("on_train_start", s.ctx)
    assert s.first("PROTO_NO_GRAD", "error") is not None

    s = Setup()
    s.P.requires_grad_(False)
    s.ctx.freeze_steps = 10
    s.hub.emit("on_train_start", s.ctx)
    assert s.serious() == {} and s.first("PROTO_NO_GRAD", "info") is not None


def _cancel_grad(s: Setup, until: int) -> Callable[[int], None]:
    def cancel(step: int) -> None:  # freeze_last_layer as in DINO / 3D-Speaker
        if step < until:
            s.P.grad = None
    return cancel


def test_intended_freeze_is_info_and_endless_cancel_is_error():
    s = Setup()
    s.ctx.freeze_steps = 10
    s.run(30, before_step=_cancel_grad(s, 10))
    assert s.serious() == {}
    assert s.first("PROTO_NO_GRAD", "info") is not None

    s = Setup()
    s.ctx.freeze_steps = 5
    s.run(30, before_step=_cancel_grad(s, 10_000))
    f = s.first("PROTO_NO_GRAD", "error")
    assert f is not None and f.step == 5 + s.doctor.settings.patience  # patience counted after the freeze
    assert "PROTO_NOT_UPDATING" not in s.serious()  # no gradient: nothing to count


# -- learning rate ---------------------------------------------------------------------------
def test_warmup_with_lr_zero_everywhere_is_only_info():
    s = Setup()

    def warmup(step: int) -> None:  # a loop that rewrites every group's lr
        for g in s.opt.param_groups:
            g["lr"] = 0.0 if step < 25 else 0.1

    s.run(40, lr_fn=warmup)
    assert s.serious() == {}
    assert s.first("PROTO_LR_ZERO", "info") is not None


def test_only_prototype_lr_zero_for_long_is_warning():
    s = Setup(proto_lr=0.0)
    s.run(30)
    f = s.first("PROTO_LR_ZERO", "warning")
    assert f is not None and f.step == s.doctor.settings.patience
    assert s.serious() == {"PROTO_LR_ZERO": "warning"}


# -- value checks ----------------------------------------------------------------------------
def test_nan_in_prototypes():
    s = Setup()

    def poison(step: int) -> None:
        if step == 6:
            with torch.no_grad():
                s.P[3, 2] = float("nan")

    s.run(10, before_step=poison)
    f = s.first("PROTO_NONFINITE", "error")
    assert f is not None and f.step == 9  # read at the log interval after the NaN


def test_identical_inputs_collapse_then_error():
    s = Setup()
    row = torch.randn(1, IN)
    s.run(20, x_fn=lambda step: row.repeat(B, 1))
    w = s.first("PROTO_COLLAPSE", "warning")
    e = s.first("PROTO_COLLAPSE", "error")
    assert w is not None and w.step == 4 and "same assignment" in w.message
    assert e is not None and e.step == 14  # collapse_patience = 3 intervals


def test_collapse_warmup_skips_early_steps():
    s = Setup(collapse_warmup=100)
    row = torch.randn(1, IN)
    s.run(10, x_fn=lambda step: row.repeat(B, 1))
    assert "PROTO_COLLAPSE" not in s.serious()


def test_low_usage_perplexity_collapse():
    """Distinct rows that all put their mass on one prototype: perplexity ~1."""
    doc = HealthDoctor()
    P = nn.Parameter(torch.randn(K, D))
    ctx = RunContext(prototypes=P)
    probs = torch.full((B, K), 1e-6)
    probs[:, 0] = 1.0
    probs[:, 1:] += torch.rand(B, K - 1) * 1e-3  # rows differ
    probs = probs / probs.sum(dim=1, keepdim=True)
    for step in range(5):
        ctx.step = step
        ctx.outputs = StepOutputs(student_probs=probs)
        doc.on_step_end(ctx)
    doc.on_log(ctx)
    found = doc.pop_findings()
    assert [(f.code, f.severity) for f in found] == [("PROTO_COLLAPSE", "warning")]
    assert "perplexity" in found[0].message


def test_duplicated_prototype_rows():
    s = Setup()
    with torch.no_grad():
        s.P[K // 2:] = s.P[: K // 2]
    s.run(5)
    f = s.first("PROTO_DUPLICATES", "warning")
    assert f is not None and "100%" in f.message


def test_norm_out_of_range():
    s = Setup()
    with torch.no_grad():
        s.P[0] = 0.0
    s.hub.emit("on_train_start", s.ctx)
    s.hub.flush()
    assert s.serious() == {"PROTO_NORM_OUT_OF_RANGE": "warning"}


# -- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_without_prototypes_is_error():
    s = Setup()
    s.run(3)
    s.ctx.checkpoint = {"model": s.model.state_dict(), "optimizer": s.opt.state_dict(), "step": 3}
    s.hub.emit("on_save_checkpoint", s.ctx)
    f = s.first("PROTO_NOT_IN_CHECKPOINT", "error")
    assert f is not None and "checkpoint['prototypes'] = prototypes" in f.message


def test_checkpoint_with_nested_prototypes_and_helpers(tmp_path: Path):
    s = Setup()
    s.run(3)
    head = nn.Module()
    head.prototypes = s.P
    ckpt = {"student": {"head": head.state_dict()}, "optimizer": s.opt.state_dict(), "epoch": 0}
    # a round trip through torch.save: the saved copy holds equal values, not the same tensor
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    loaded = torch.load(path)
    assert find_prototypes_in_checkpoint(ckpt, s.P) == ["student/head/prototypes"]
    assert find_prototypes_in_checkpoint(loaded, s.P) == ["student/head/prototypes"]
    assert find_prototypes_in_checkpoint([{"x": torch.zeros(3)}, s.P], s.P) == ["1"]
    assert find_prototypes_in_checkpoint({"model": s.model.state_dict()}, s.P) == []
    # momentum of the prototypes is in the saved optimizer state (position 2: after W and b)
    assert prototype_optimizer_state_in_checkpoint(loaded, s.P, s.opt)
    assert not prototype_optimizer_state_in_checkpoint({"prototypes": s.P}, s.P, s.opt)
    s.ctx.checkpoint = loaded
    s.hub.emit("on_save_checkpoint", s.ctx)
    s.hub.emit("on_load_checkpoint", s.ctx)
    assert s.hub.findings == []
    assert check_checkpoint(loaded, s.P) == []


def test_resume_from_checkpoint_without_prototypes():
    s = Setup()
    s.ctx.checkpoint = {"model": s.model.state_dict()}
    s.hub.emit("on_load_checkpoint", s.ctx)
    f = s.first("PROTO_NOT_IN_CHECKPOINT", "error")
    assert f is not None and "restart from random" in f.message
    # prototypes saved but not restored into the live tensor
    found = check_checkpoint({"prototypes": torch.randn(K, D)}, s.P, loaded=True)
    assert [(f.code, f.severity) for f in found] == [("PROTO_NOT_IN_CHECKPOINT", "warning")]
    assert "prototypes.data.copy_(checkpoint['prototypes'])" in found[0].message


# -- state -----------------------------------------------------------------------------------
def test_state_dict_round_trip_keeps_counters():
    """7 stuck steps, save, resume into a fresh doctor: it reports at the same step as an
    uninterrupted run (counter > 10 at step 10, read at the log interval of step 14)."""
    a = Setup(in_optimizer=False)
    a.run(7)
    assert a.first("PROTO_NOT_UPDATING", "error") is None
    buf = io.BytesIO()
    torch.save(a.hub.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert all(v.device.type == "cpu" for v in state["monitors"]["health"]["device"].values())

    b = Setup(in_optimizer=False)
    b.hub.load_state_dict(state)
    assert b.doctor.state_dict()["stuck_run"] == 7
    b.run(8, start=7, train_start=False)
    f = b.first("PROTO_NOT_UPDATING", "error")
    assert f is not None and f.step == 14

    c = Setup(in_optimizer=False)  # the same 8 steps without the saved counters: silent
    c.run(8, start=7, train_start=False)
    assert c.first("PROTO_NOT_UPDATING", "error") is None


def test_registry_options_and_codes_documented():
    (doc,) = build_monitors({"health": {"patience": 3, "collapse_warmup": 7}})
    assert isinstance(doc, HealthDoctor) and doc.settings.patience == 3 and doc.settings.collapse_warmup == 7
    with pytest.raises(ValueError, match="patience"):
        HealthDoctor(patience=-1)
    codes = [v for k, v in vars(health).items() if k.startswith(("PROTO_", "TEACHER_"))]
    assert set(codes) <= set(CODES) and len(codes) == 15
    assert "SINK_FAILED" in CODES  # the hub's own code, in the same table
    doc_md = Path(__file__).resolve().parents[1] / "docs" / "findings.md"
    if doc_md.exists():
        text = doc_md.read_text()
        assert all(code in text for code in CODES)


# -- distributed -----------------------------------------------------------------------------
def _replica_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked child: keep OpenMP out of it
    # a short timeout: a rank left waiting in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results = {}
    try:
        for scenario in ("identical", "noise", "init", "raises_on_rank1"):
            torch.manual_seed(0 if scenario != "init" else rank)
            P = nn.Parameter(torch.randn(K, D))
            opt = torch.optim.SGD([P], lr=0.1)
            doctor = HealthDoctor()
            if scenario == "raises_on_rank1" and rank == 1:  # a bug hit on one rank only
                def boom(ctx, _orig=doctor.on_before_optimizer_step):
                    if ctx.step == 2:
                        raise RuntimeError("only on rank 1")
                    return _orig(ctx)
                doctor.on_before_optimizer_step = boom
            hub = MonitorHub([doctor], sinks=[FakeSink()], log_every=5, console=None)
            ctx = RunContext(prototypes=P, optimizer=opt, rank=rank, world_size=world)
            hub.emit("on_train_start", ctx)
            for step in range(10):
                ctx.step = step
                opt.zero_grad()
                (P * P).sum().backward()  # the same gradient on every rank
                hub.emit("on_after_backward", ctx)
                hub.emit("on_before_optimizer_step", ctx)
                opt.step()
                if scenario in ("noise", "raises_on_rank1") and step == 3:
                    with torch.no_grad():
                        P.add_(torch.randn(K, D, generator=torch.Generator().manual_seed(rank)) * 1e-3)
                hub.emit("on_after_optimizer_step", ctx)
                hub.emit("on_step_end", ctx)
            hub.emit("on_train_end", ctx)
            results[scenario] = [[f.code, f.severity, f.step, f.message] for f in hub.findings]
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    # Results are on disk: leave without running C++ static destructors, where gloo's threads
    # now and then abort at interpreter exit ("terminate called without an active exception").
    os._exit(0)


def test_replicas_diverged_two_gloo_processes(tmp_path: Path):
    # fork: the children inherit the imported modules (spawn re-imports torch: ~10 s on a busy box)
    mp.start_processes(_replica_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["identical"] == []
        noise = [f for f in res["noise"] if f[0] == "PROTO_REPLICAS_DIVERGED"]
        # the noise is added after step 3's optimizer step; the next check is at step 5,
        # read at the log interval ending at step 9
        assert [(f[1], f[2]) for f in noise] == [("error", 9)] and "all_reduce" in noise[0][3]
        init = [f for f in res["init"] if f[0] == "PROTO_REPLICAS_DIVERGED"]
        assert init and init[0][2] == 0 and "broadcast" in init[0][3]
    # the doctor raised on rank 1 only and was switched off there; rank 1 still takes part in the
    # replica comparisons, so rank 0 neither hangs nor misses the divergence
    r0 = json.loads((tmp_path / "rank0.json").read_text())["raises_on_rank1"]
    r1 = json.loads((tmp_path / "rank1.json").read_text())["raises_on_rank1"]
    assert [(f[0], f[1], f[2]) for f in r0] == [("PROTO_REPLICAS_DIVERGED", "error", 9)], r0
    assert [(f[0], f[2]) for f in r1] == [("MONITOR_FAILED", 2)] and "only on rank 1" in r1[0][3]
