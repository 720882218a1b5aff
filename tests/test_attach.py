"""attach() on foreign PyTorch loops written here (no import from pipeline/): the events come
from PyTorch's hooks, and the health doctor finds the faults of the SDPN bug story."""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from monitors import Monitor, attach
from monitors.attaching.attached_hub import AttachedHub
from monitors.attaching.resolve import resolve_prototypes
from conftest import RecordingSink as RecSink, Recorder, sinkhorn

K, D, IN, B = 16, 8, 12, 32


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, D)

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)), dim=-1)


def snn(z, P, tau=0.1):
    return torch.softmax(F.normalize(z, dim=-1) @ F.normalize(P, dim=-1).T / tau, dim=-1)


def make(seed: int = 0, proto_in_optimizer: bool = True, non_leaf: bool = False, momentum: float = 0.0):
    torch.manual_seed(seed)
    student = Student()
    P = nn.Parameter(torch.empty(K, D).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
    if non_leaf:
        P = P.clone()  # the nn.Parameter(x).cuda() trap: a non-leaf copy of the parameter
    groups: list[dict] = [{"params": list(student.parameters())}]
    if proto_in_optimizer and not non_leaf:
        groups.append({"params": [P], "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=0.1, momentum=momentum)
    return student, P, opt


def run_steps(student, P, opt, steps: int, identical: bool = False, lr_fn=None, seed: int = 1,
              accumulate: int = 1) -> None:
    """The user's loop: SDPN-style cross-entropy to Sinkhorn targets plus ME-MAX."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(8, IN, generator=g) * 2
    for step in range(steps):
        if lr_fn is not None:
            for group in opt.param_groups:
                group["lr"] = lr_fn(step, group)
        opt.zero_grad()
        for _ in range(accumulate):
            if identical:
                x = torch.ones(B, IN)
            else:
                x = means[torch.randint(8, (B,), generator=g)] + torch.randn(B, IN, generator=g)
            noise = 0.0 if identical else 0.1 * torch.randn(B, IN, generator=g)
            p = snn(student(x + noise), P)  # the student view
            with torch.no_grad():
                t = sinkhorn(snn(student(x), P) ** 4)
            mp = p.mean(0)
            loss = -(t * torch.log(p + 1e-8)).sum(1).mean() + (mp * torch.log(mp + 1e-8)).sum()
            (loss / accumulate).backward()
        opt.step()


def bad_codes(hub) -> set[str]:
    return {f.code for f in hub.findings if f.severity in ("warning", "error")}


def opts(**kw: Any) -> dict:
    # t-SNE inline: a background worker process per test costs seconds to start
    return dict(run=False, sinks=[RecSink()], console=False, log_every=5, tsne={"background": False}, **kw)


def test_monitors_attach_stays_the_function_after_a_call():
    """``import monitors; monitors.attach(...)`` works every time (the package attribute once became
    the submodule of the same name after the first call)."""
    import importlib

    import monitors

    module = importlib.import_module("monitors.attaching.api")

    student, P, opt = make()
    monitors.attach(opt, P, **opts()).close()
    assert monitors.attach is module.attach and callable(monitors.attach)
    monitors.attach(opt, P, **opts()).close()


# -- faults found -----------------------------------------------------------------------------
def test_healthy_loop_raises_nothing_and_logs_the_metrics():
    student, P, opt = make(momentum=0.9)
    sink = RecSink()
    hub = attach(opt, P, model=student, run=False, sinks=[sink], console=False, log_every=5, capture="head",
                 tsne={"background": False})
    run_steps(student, P, opt, 30)
    hub.close()
    assert bad_codes(hub) == set(), [str(f) for f in hub.findings]
    assert hub.disabled == {}
    keys = sink.keys()
    for k in ("proto/norm/mean", "proto/grad/norm", "proto/delta/norm", "proto/usage/entropy_student",
              "proto/similarity/max", "perf/monitor_ms"):
        assert k in keys, k
    assert [s for s, _ in sink.rows if "proto/norm/mean" in _] == list(range(30))
    assert sink.summary["health/codes"] == [] and sink.closed


def test_prototypes_not_in_optimizer_reported_at_attach_then_not_updating():
    student, P, opt = make(proto_in_optimizer=False)
    hub = attach(opt, P, model=student, **opts())
    assert "PROTO_NOT_IN_OPTIMIZER" in {f.code for f in hub.findings if f.severity == "error"}  # at once
    run_steps(student, P, opt, 25)
    hub.close()
    assert {"PROTO_NOT_IN_OPTIMIZER", "PROTO_NOT_UPDATING"} <= bad_codes(hub)


def test_non_leaf_prototypes_reported_and_loop_still_runs():
    student, P, opt = make(non_leaf=True)
    rec = Recorder()
    hub = attach(opt, P, model=student, monitors=["default", rec], **opts())
    assert "PROTO_NOT_LEAF" in bad_codes(hub)
    run_steps(student, P, opt, 3)
    hub.close()
    # no grad hook on a non-leaf tensor: optimizer.step() emits on_after_backward itself
    assert [e for e, s in rec.events if s == 1][:2] == ["on_after_backward", "on_before_optimizer_step"]


def test_collapse_when_all_inputs_identical():
    student, P, opt = make()
    hub = attach(opt, P, model=student, capture="head", **opts())
    run_steps(student, P, opt, 15, identical=True)
    hub.close()
    assert "PROTO_COLLAPSE" in bad_codes(hub)


@pytest.mark.parametrize("kind", ["warmup_all_groups", "freeze_prototypes"])
def test_intentional_lr_zero_is_info_only(kind):
    student, P, opt = make()
    if kind == "warmup_all_groups":  # linear warm-up from lr 0
        lr_fn, extra = (lambda step, g: 0.1 * min(1.0, step / 10)), {}
    else:  # freeze_last_layer: the prototypes' group at lr 0 for 10 steps, declared
        lr_fn, extra = (lambda step, g: 0.0 if (any(q is P for q in g["params"]) and step < 10) else 0.1), {"freeze_steps": 10}
    hub = attach(opt, P, model=student, **opts(**extra))
    run_steps(student, P, opt, 25, lr_fn=lr_fn)
    hub.close()
    assert bad_codes(hub) == set(), [str(f) for f in hub.findings]
    assert "PROTO_LR_ZERO" in {f.code for f in hub.findings if f.severity == "info"}


def test_check_checkpoint(tmp_path):
    student, P, opt = make(momentum=0.9)
    rec = Recorder()
    hub = attach(opt, P, model=student, monitors=["health", rec], **opts())
    run_steps(student, P, opt, 2)
    missing = hub.check_checkpoint({"model": student.state_dict(), "optimizer": opt.state_dict()})
    assert [(f.code, f.severity) for f in missing] == [("PROTO_NOT_IN_CHECKPOINT", "error")]
    assert "PROTO_NOT_IN_CHECKPOINT" in bad_codes(hub)
    assert rec.events[-1] == ("on_save_checkpoint", 2)
    # a second bad checkpoint is still answered (the hub reports the code once)
    assert [f.code for f in hub.check_checkpoint({"x": 1})] == ["PROTO_NOT_IN_CHECKPOINT"]
    nested = {"state": {"protos": P.detach().clone()}, "optim": [opt.state_dict()]}
    assert hub.check_checkpoint(nested) == []
    torch.save(nested, tmp_path / "ok.pt")
    assert hub.check_checkpoint(str(tmp_path / "ok.pt")) == []
    # the prototypes are there, their momentum is not
    no_state = hub.check_checkpoint({"state": {"protos": P.detach().clone()}})
    assert [(f.code, f.severity) for f in no_state] == [("PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT", "warning")]
    hub.close()


# -- events -----------------------------------------------------------------------------------
def test_event_order_is_exact():
    student, P, opt = make()
    rec = Recorder()
    hub = attach(opt, P, model=student, monitors=[rec], **opts())
    assert rec.events == [("on_train_start", 0)]  # at attach time
    run_steps(student, P, opt, 2)
    hub.check_checkpoint({"p": P.detach()})
    hub.log_embeddings(torch.randn(5, D), labels=list("aabbc"))
    hub.close()
    hub.close()  # idempotent
    step = ["on_after_backward", "on_before_optimizer_step", "on_after_optimizer_step", "on_step_end"]
    assert rec.events == ([("on_train_start", 0)] + [(e, 0) for e in step] + [(e, 1) for e in step]
                          + [("on_save_checkpoint", 2), ("on_embeddings", 2), ("on_train_end", 2)])
    assert rec.embeddings == [((5, D), list("aabbc"))]
    assert rec.outputs[0].schedules == {"lr": 0.1, "wd": 0.0}


@pytest.mark.parametrize("declared", [1, 3])
def test_gradient_accumulation_emits_after_backward_once_per_step(declared):
    student, P, opt = make()
    rec = Recorder()
    hub = attach(opt, P, model=student, monitors=[rec], accumulate_grad_batches=declared, **opts())
    grads = []
    hub.add(_GradProbe(grads))
    run_steps(student, P, opt, 2, accumulate=3)
    hub.close()
    assert [e for e, _ in rec.events].count("on_after_backward") == 2
    if declared == 3:  # emitted at the end of the 3rd backward: the accumulated gradient, pre-step
        assert all(g is not None for g in grads)


class _GradProbe(Monitor):
    name = "probe"

    def __init__(self, out):
        super().__init__(1)
        self.out = out

    def on_after_backward(self, ctx):
        self.out.append(None if ctx.prototypes.grad is None else ctx.prototypes.grad.clone())


def test_after_backward_sees_every_gradient():
    """The grad hook fires inside backward; the event waits for the end of the backward pass."""
    student, P, opt = make()
    seen = []

    class Probe(Monitor):
        name = "probe"

        def on_after_backward(self, ctx):
            seen.append(all(p.grad is not None for p in ctx.model.parameters()))

    hub = attach(opt, P, model=student, monitors=[Probe()], **opts())
    run_steps(student, P, opt, 2)
    hub.close()
    assert seen == [True, True]


def test_detach_removes_every_hook():
    student, P, opt = make()
    rec = Recorder()
    hub = attach(opt, P, model=student, monitors=[rec], capture="head", **opts())
    run_steps(student, P, opt, 1)
    n = len(rec.events)
    hub.detach()
    run_steps(student, P, opt, 3)
    assert len(rec.events) == n
    assert not P._post_accumulate_grad_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not student.head._forward_hooks
    hub.close()


def test_capture_outputs_and_eval_embeddings():
    student, P, opt = make()
    rec = Recorder()
    hub = attach(opt, P, model=student, monitors=[rec], capture="head", **opts())
    run_steps(student, P, opt, 1)
    probs = rec.outputs[0].student_probs
    assert probs.shape == (2 * B, K) and torch.allclose(probs.sum(1), torch.ones(2 * B))
    assert rec.outputs[0].projections.shape == (2 * B, D)
    student.eval()
    with torch.no_grad(), hub.capture() as cap:
        for y in ([0, 1, 2], [3, 4]):
            student(torch.randn(len(y), IN))
            cap.add_labels(torch.tensor(y))
    assert rec.embeddings == [((5, D), [0, 1, 2, 3, 4])]
    with pytest.raises(ValueError, match="prototypes have dim"):
        hub.log_embeddings(torch.randn(3, D + 1), [0, 1, 2])
    hub.close()


def test_log_outputs_reach_step_end_and_state_round_trips():
    student, P, opt = make()
    rec = Recorder()
    hub = attach(opt, P, model=student, monitors=["health", "usage", rec], **opts())
    hub.log_outputs(loss=torch.tensor(1.5, requires_grad=True), student_probs=torch.full((4, K), 1 / K))
    run_steps(student, P, opt, 3)
    assert rec.outputs[0].loss == 1.5 and not rec.outputs[0].loss.requires_grad
    assert rec.outputs[1].loss is None  # per step
    with pytest.raises(ValueError, match="valid: embeddings"):
        hub.log_outputs(probs=1)
    state = hub.state_dict()
    hub.close()
    student2, P2, opt2 = make()
    hub2 = attach(opt2, P2, model=student2, monitors=["health", "usage", Recorder()], **opts())
    hub2.load_state_dict(state)
    assert hub2.ctx.step == 3
    run_steps(student2, P2, opt2, 1)
    assert hub2.ctx.step == 4
    hub2.close()


# -- resolving the prototypes -----------------------------------------------------------------
class SwAVHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, D)
        self.prototypes = nn.Linear(D, K, bias=False)


class Wrapper(nn.Module):  # what DDP / DataParallel look like from outside
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_resolution_of_tensors_modules_and_names():
    head = SwAVHead()
    P = torch.randn(K, D, requires_grad=True)
    assert resolve_prototypes(P)[0] is P
    assert resolve_prototypes(head.prototypes)[0] is head.prototypes.weight
    assert resolve_prototypes("prototypes", head) == (head.prototypes.weight, "prototypes.weight")
    assert resolve_prototypes("prototypes.weight", head)[0] is head.prototypes.weight
    # DINO's weight-normalised last layer: the trained direction v
    dino = nn.Module()
    dino.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(D, K, bias=False))
    v = dino.last_layer.parametrizations.weight.original1
    assert resolve_prototypes("last_layer", dino)[0] is v
    assert resolve_prototypes("last_layer.weight", dino)[0] is v
    wrapped = Wrapper(dino)
    assert resolve_prototypes("module.last_layer.weight", wrapped)[0] is v
    assert resolve_prototypes("last_layer.weight", wrapped)[0] is v
    assert resolve_prototypes("module.last_layer.weight", dino)[0] is v
    with pytest.warns(FutureWarning):
        old = nn.utils.weight_norm(nn.Linear(D, K))
    assert resolve_prototypes(old)[0] is old.weight_v
    # a free tensor stored as a plain attribute (SDPN)
    m = nn.Module()
    m.head = nn.Module()
    m.head.prototypes = torch.randn(K, D)
    assert resolve_prototypes("head.prototypes", m)[0] is m.head.prototypes


def test_bad_inputs_say_what_is_wrong_and_how_to_fix():
    head = SwAVHead()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="must be a \\(num_proto, dim\\) tensor"):
        attach(opt, 3, run=False)
    with pytest.raises(ValueError, match="prototypes must be a \\(num_proto, dim\\) tensor, got shape \\(16,\\)"):
        attach(opt, torch.randn(K), run=False)
    with pytest.raises(ValueError, match="'protoypes' was not found in SwAVHead. Close names: prototypes"):
        attach(opt, "protoypes", model=head, run=False)
    with pytest.raises(ValueError, match="pass model="):
        attach(opt, "prototypes", run=False)
    with pytest.raises(ValueError, match="unknown option 'log_evry' \\(did you mean 'log_every'\\?\\); valid options:"):
        attach(opt, head.prototypes, run=False, log_evry=5)
    with pytest.raises(ValueError, match="no module 'hed'"):
        attach(opt, head.prototypes, model=head, run=False, capture="hed")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        attach(object(), head.prototypes, run=False)
    with pytest.raises(TypeError, match="pass a dict of its options"):
        attach(opt, head.prototypes, run=False, tsne=50)
    with pytest.raises(ValueError, match="unknown monitor"):
        attach(opt, head.prototypes, run=False, monitors=["norms", "tnse"])


def test_per_monitor_options_are_passed():
    head = SwAVHead()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    hub = attach(opt, head.prototypes, run=False, console=False, tsne={"frame_every": 50, "background": False},
                 similarity={"every_n_steps": 7})
    assert hub.get("tsne").frame_every_n_steps == 50 and hub.get("similarity").every_n_steps == 7
    assert isinstance(hub, AttachedHub)
    hub.close()


# -- DDP (2 processes, gloo) ------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        for allreduce in (False, True):
            torch.manual_seed(0)  # same initial prototypes on every rank
            P = nn.Parameter(torch.randn(K, D))
            opt = torch.optim.SGD([P], lr=0.5)
            hub = attach(opt, P, run=False, sinks=[RecSink()], monitors=["health"], console=False, log_every=5)
            g = torch.Generator().manual_seed(100 + rank)  # each rank sees other data
            for _ in range(10):
                x = torch.randn(B, D, generator=g)
                p = snn(x, P)
                loss = -(p * torch.log(p + 1e-8)).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                if allreduce:  # the SDPN fix: the prototypes live outside the DDP module
                    dist.all_reduce(P.grad)
                    P.grad /= world
                opt.step()
            hub.close()
            result[str(allreduce)] = {"codes": sorted(bad_codes(hub)), "rank": hub.ctx.rank,
                                      "world": hub.ctx.world_size, "sinks": len(hub.sinks)}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.barrier()  # both ranks done before either tears the group down
        dist.destroy_process_group()
    # Results are on disk: leave without running C++ static destructors, where gloo's threads
    # now and then abort at interpreter exit ("terminate called without an active exception").
    os._exit(0)


def test_ddp_replicas_diverge_without_gradient_all_reduce(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (r0["False"]["rank"], r0["False"]["world"], r1["False"]["rank"]) == (0, 2, 1)
    assert r1["False"]["sinks"] == 0 and r0["False"]["sinks"] == 1  # only rank 0 writes
    assert "PROTO_REPLICAS_DIVERGED" in r0["False"]["codes"]  # without the all-reduce
    assert r0["True"]["codes"] == [] and r1["True"]["codes"] == []  # with it


# -- end to end through W&B offline -----------------------------------------------------------
def test_wandb_offline_run_holds_metrics_and_health_codes(tmp_path):
    student, P, opt = make(proto_in_optimizer=False)
    hub = attach(opt, P, model=student, dir=str(tmp_path), exp_dir=str(tmp_path / "exp"), console=False,
                 log_every=5, capture="head", evolution={"image_every": 1000})
    run_steps(student, P, opt, 15)
    hub.close()
    run_dirs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(run_dirs) == 1
    wandb_cli = str(Path(sys.executable).parent / "wandb")
    records = subprocess.run([wandb_cli, "leet", "inspect", "--json", run_dirs[0]], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    history = [json.loads(line)["history"]["item"] for line in records.splitlines() if '"type":"history"' in line]
    keys = {k for item in history for k in item}
    for k in ("proto/norm/mean", "proto/grad/norm", "proto/delta/norm", "proto/usage/entropy_student",
              "trainer/step", "health/error/PROTO_NOT_IN_OPTIMIZER"):
        assert k in keys, k
    summary = json.loads(subprocess.run([wandb_cli, "leet", "inspect", "--summary", "--json", run_dirs[0]],
                                        capture_output=True, text=True, timeout=120, check=True).stdout)["summary"]
    assert "PROTO_NOT_IN_OPTIMIZER" in summary["health/codes"] and summary["health/errors"] >= 1
    assert (tmp_path / "exp" / "records" / "metrics.jsonl").exists()


def test_capture_picks_an_element_of_a_tuple_output():
    class TupleHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(IN, D)
            self.protos = nn.Linear(D, K, bias=False)

        def forward(self, x):
            z = F.normalize(self.lin(x), dim=-1)
            return z, self.protos(z)  # (projections, scores)

    model = nn.Module()
    model.head = TupleHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for spec, shape in (("head:0", (B, D)), ("head:1", None)):
        hub = attach(opt, "head.protos", model=model, monitors=[Recorder()], capture=spec, **opts())
        z, s = model.head(torch.randn(B, IN))
        opt.zero_grad()
        (s.logsumexp(-1).mean()).backward()
        opt.step()
        out = hub.get("recorder").outputs[0]
        assert out.student_probs.shape == (B, K)
        if shape is None:  # scores: softmax(s / T), no projections
            assert out.projections is None
            assert torch.allclose(out.student_probs, torch.softmax(s.detach() / 0.1, -1))
        else:
            assert out.projections.shape == shape
        hub.close()
