"""The prototype bugs of real self-supervised trainers, found from ``attach(optimizer, prototypes,
model=model)`` alone (plus the documented ``freeze_steps`` and ``teacher=``), on foreign loops
written here: a DINO-style head with a weight-normalised last layer (old and new ``weight_norm``
APIs), SwAV-style ``nn.Linear`` prototypes normalised in place every step, and an SDPN-style bare
tensor. Healthy loops raise no warning or error, with and without a declared freeze; each faulty
one raises its code within 20 steps."""
from __future__ import annotations

import copy
import json
import math
import os
import warnings
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from monitors import attach
from conftest import RecordingSink, sinkhorn

K, D, IN, B = 32, 16, 12, 32
STEPS = 20
FREEZE = 6


def _data(seed: int) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(8, IN, generator=g) * 2

    def batch() -> torch.Tensor:
        return means[torch.randint(8, (B,), generator=g)] + 0.5 * torch.randn(B, IN, generator=g)
    return batch


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, 32), nn.GELU(), nn.Linear(32, 32))


def _ema(teacher: nn.Module, student: nn.Module, m: float = 0.99) -> None:
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1 - m)


def _serious(hub) -> dict[str, str]:
    return {f.code: f.severity for f in hub.findings if f.severity in ("warning", "error")}


def _first(hub, code: str):
    return next((f for f in hub.findings if f.code == code and f.severity in ("warning", "error")), None)


def _opts(**kw: Any) -> dict:
    return {**dict(run=False, sinks=[RecordingSink()], console=False, log_every=5, tsne={"background": False}), **kw}


# -- DINO: MultiCropWrapper(backbone, DINOHead) with a weight-normalised last layer --------------
class DINOHead(nn.Module):
    def __init__(self, new_api: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, D))
        layer = nn.Linear(D, K, bias=False)
        if new_api:
            self.last_layer = nn.utils.parametrizations.weight_norm(layer)
            g = self.last_layer.parametrizations.weight.original0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.last_layer = nn.utils.weight_norm(layer)
            g = self.last_layer.weight_g
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)  # DINO's norm_last_layer=True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))  # (N, K) logits


class DINO(nn.Module):
    def __init__(self, new_api: bool) -> None:
        super().__init__()
        self.backbone = _backbone()
        self.head = DINOHead(new_api)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def dino_loop(new_api: bool = True, freeze: int = 0, teacher_temp: float = 0.04, center_m: float = 0.9,
              ema: bool = True, alias: bool = False, identical: bool = False, steps: int = STEPS, lr: float = 0.05,
              give_targets: bool = False, **attach_kw: Any):
    torch.manual_seed(0)
    student = DINO(new_api)
    teacher = student
    if not alias:  # as DINO: a second network loaded with the student's weights
        teacher = DINO(new_api)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    hub = attach(opt, "head.last_layer", model=student, teacher=teacher, freeze_steps=freeze, **_opts(**attach_kw))
    center = torch.zeros(1, K)
    batch = _data(1)
    for step in range(steps):
        x = torch.ones(B, IN) if identical else batch()
        with torch.no_grad():
            t_out = teacher(x)
        s_out = student(x + (0 if identical else 0.1 * torch.randn_like(x)))
        t = torch.softmax((t_out - center) / teacher_temp, dim=-1)
        loss = -(t * F.log_softmax(s_out / 0.1, dim=-1)).sum(-1).mean()
        if give_targets:
            hub.log_outputs(teacher_targets=t)
        opt.zero_grad()
        loss.backward()
        if step < freeze:  # DINO's cancel_gradients_last_layer
            for n, p in student.named_parameters():
                if "last_layer" in n:
                    p.grad = None
        opt.step()
        with torch.no_grad():
            center = center * center_m + t_out.mean(0, keepdim=True) * (1 - center_m)
        if ema:
            _ema(teacher, student)
    hub.close()
    return hub


# -- SwAV: prototypes as nn.Linear(D, K), normalised in place every step --------------------------
class SwAV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _backbone()
        self.projection_head = nn.Linear(32, D)
        self.prototypes = nn.Linear(D, K, bias=False)

    def forward(self, x: torch.Tensor):
        z = F.normalize(self.projection_head(self.backbone(x)), dim=-1)  # (N, D)
        return z, self.prototypes(z)                                      # (N, K) scores


def swav_loop(freeze: int = 0, steps: int = STEPS, **attach_kw: Any):
    torch.manual_seed(0)
    model = SwAV()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hub = attach(opt, model.prototypes, model=model, freeze_steps=freeze, **_opts(**attach_kw))
    batch = _data(2)
    for step in range(steps):
        with torch.no_grad():  # SwAV: normalise the prototypes before every forward
            w = model.prototypes.weight.data.clone()
            model.prototypes.weight.copy_(F.normalize(w, dim=1))
        x = batch()
        _, s1 = model(x + 0.1 * torch.randn_like(x))
        _, s2 = model(x + 0.1 * torch.randn_like(x))
        with torch.no_grad():
            q1, q2 = sinkhorn(torch.exp(s1 / 0.05)), sinkhorn(torch.exp(s2 / 0.05))
        loss = -0.5 * ((q1 * F.log_softmax(s2 / 0.1, -1)).sum(-1) + (q2 * F.log_softmax(s1 / 0.1, -1)).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        if step < freeze:  # SwAV's freeze_prototypes_niters
            for n, p in model.named_parameters():
                if "prototypes" in n:
                    p.grad = None
        opt.step()
    hub.close()
    return hub


# -- SDPN: a bare (K, D) tensor outside the model, EMA teacher, Sinkhorn targets ----------------
class SDPNStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _backbone()
        self.head = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, D))

    def forward(self, x: torch.Tensor):
        emb = self.backbone(x)
        return emb, F.normalize(self.head(emb), dim=-1)  # (N, 32), (N, D)


def _snn(z: torch.Tensor, P: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    return torch.softmax(z @ F.normalize(P, dim=-1).T / tau, dim=-1)


def sdpn_loop(freeze: int = 0, freeze_by_name: bool = False, identical: bool = False, ema: bool = True,
              steps: int = STEPS, embeddings: Optional[Callable] = None, **attach_kw: Any):
    torch.manual_seed(0)
    student = SDPNStudent()
    teacher = copy.deepcopy(student).requires_grad_(False)
    P = nn.Parameter(torch.empty(K, D).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
    opt = torch.optim.SGD([{"params": student.parameters()}, {"params": [P], "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9)
    hub = attach(opt, P, model=student, teacher=teacher, freeze_steps=freeze, **_opts(**attach_kw))
    batch = _data(3)
    for step in range(steps):
        x = torch.ones(B, IN) if identical else batch()
        p = _snn(student(x + (0 if identical else 0.1 * torch.randn_like(x)))[1], P)
        with torch.no_grad():
            t = sinkhorn(_snn(teacher(x)[1], P) ** 4)
        mp = p.mean(0)
        loss = -(t * torch.log(p + 1e-8)).sum(1).mean() + (mp * torch.log(mp + 1e-8)).sum()
        opt.zero_grad()
        loss.backward()
        if step < freeze:
            if freeze_by_name:  # 3D-Speaker's freeze_last_layer: cancels names with 'last_layer'
                for n, q in student.named_parameters():
                    if "last_layer" in n:
                        q.grad = None
            else:
                P.grad = None
        opt.step()
        if ema:
            _ema(teacher, student)
    if embeddings is not None:
        hub.log_embeddings(*embeddings(student))
    hub.close()
    return hub


# -- healthy: nothing above info -----------------------------------------------------------------
HEALTHY = {
    "dino_new_weight_norm": lambda **kw: dino_loop(new_api=True, **kw),
    "dino_old_weight_norm": lambda **kw: dino_loop(new_api=False, **kw),
    "swav_linear": swav_loop,
    "sdpn_tensor": sdpn_loop,
}


@pytest.mark.parametrize("freeze", [0, FREEZE])
@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_foreign_loops_raise_nothing(name, freeze):
    hub = HEALTHY[name](freeze=freeze)
    assert _serious(hub) == {}, [str(f) for f in hub.findings]
    assert hub.disabled == {}
    assert hub._capture is not None  # found from the one line: usage metrics run
    assert "proto/usage/entropy_student" in hub.last_values
    if freeze:
        assert ("PROTO_NO_GRAD", "info") in {(f.code, f.severity) for f in hub.findings}


def test_automatic_capture_chooses_the_projections():
    dino = dino_loop(steps=1)
    assert dino._capture[1] == f"head.last_layer:{'<input>'}"
    swav = swav_loop(steps=1)
    assert swav._capture[1] == "prototypes:<input>"
    sdpn = sdpn_loop(steps=1)
    assert sdpn._capture[1] == ":1"  # the model's own output, element 1 of (emb, z)
    lines: list[str] = []
    off = sdpn_loop(steps=1, capture=False, console=lines.append)
    assert off._capture is None and not any("capture" in l for l in lines)
    said: list[str] = []
    sdpn_loop(steps=1, console=said.append)
    assert any("capture: the output of 'SDPNStudent'[1]" in l and "projections" in l for l in said), said


# -- faulty ----------------------------------------------------------------------------------------
def test_freeze_that_matches_no_name_is_reported():
    hub = sdpn_loop(freeze=10, freeze_by_name=True)
    f = _first(hub, "PROTO_FREEZE_IGNORED")
    assert f is not None and f.severity == "warning" and f.step <= 20, [str(x) for x in hub.findings]
    assert "freeze_steps=10" in f.message and "last_layer" in f.message and "prototypes.grad = None" in f.message
    # the same freeze applied to the tensor itself: healthy
    assert "PROTO_FREEZE_IGNORED" not in _serious(sdpn_loop(freeze=10))


def test_collapse_from_the_one_line():
    hub = sdpn_loop(identical=True)
    f = _first(hub, "PROTO_COLLAPSE")
    assert f is not None and f.step <= 20 and "one-prototype kind" in f.message, [str(x) for x in hub.findings]


def test_identical_embeddings_logged_raise_collapse():
    same = lambda student: (torch.ones(40, D) / math.sqrt(D), [i % 4 for i in range(40)])
    hub = sdpn_loop(steps=3, embeddings=same)
    f = _first(hub, "PROTO_COLLAPSE")
    assert f is not None and "embeddings" in f.message
    varied = lambda student: (F.normalize(torch.randn(40, D), dim=-1), [i % 4 for i in range(40)])
    assert "PROTO_COLLAPSE" not in _serious(sdpn_loop(steps=3, embeddings=varied))


def test_uniform_collapse_told_apart():
    # dino #246: a teacher temperature far too high makes every target uniform; the student
    # follows, and the loss sits at ln K
    # (the loop hands its targets over: hub.log_outputs(teacher_targets=t))
    hub = dino_loop(teacher_temp=100.0, give_targets=True)
    f = _first(hub, "PROTO_COLLAPSE")
    assert f is not None and f.step <= 20 and "uniform kind" in f.message, [str(x) for x in hub.findings]
    assert "teacher temperature" in f.message and "one-prototype" not in f.message
    # the same loop with a sound teacher temperature and its targets handed over: healthy
    assert _serious(dino_loop(give_targets=True)) == {}


def test_teacher_aliased_is_an_error_at_once():
    hub = dino_loop(alias=True, steps=2)
    f = _first(hub, "TEACHER_SHARES_STUDENT")
    assert f is not None and f.severity == "error" and f.step == 0 and "deepcopy" in f.message


def test_ema_never_applied():
    hub = sdpn_loop(ema=False)
    f = _first(hub, "TEACHER_NOT_UPDATING")
    assert f is not None and f.severity == "warning" and f.step <= 20, [str(x) for x in hub.findings]
    assert "EMA" in f.message
    hub = dino_loop(ema=False)
    assert "TEACHER_NOT_UPDATING" in _serious(hub)


# -- summed gradient on 2 gloo ranks -----------------------------------------------------------------
def _sum_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        for variant in ("mean", "sum", "sum_adam", "none"):
            torch.manual_seed(0)  # the same initial values on every rank
            student = SDPNStudent()
            P = nn.Parameter(torch.empty(K, D).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
            opt = (torch.optim.Adam([P], lr=1e-3) if variant == "sum_adam"
                   else torch.optim.SGD([P], lr=0.1, momentum=0.9))
            hub = attach(opt, P, model=student, **_opts(monitors=["health", "checks"]))
            batch = _data(10 + rank)  # each rank its own data
            for _ in range(12):
                with torch.no_grad():
                    z = student(batch())[1]
                p = _snn(z, P)
                mp = p.mean(0)
                loss = -(sinkhorn(p.detach() ** 4) * torch.log(p + 1e-8)).sum(1).mean() + (mp * torch.log(mp)).sum()
                opt.zero_grad()
                loss.backward()
                if variant != "none":
                    dist.all_reduce(P.grad)  # 3D-Speaker's AllReduceSum
                if variant == "mean":
                    P.grad /= world
                opt.step()
            hub.close()
            result[variant] = [[f.code, f.severity, f.step, f.message] for f in hub.findings
                               if f.code == "PROTO_GRAD_NOT_AVERAGED" or f.severity != "info"]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)  # results are on disk: skip gloo's C++ teardown (see test_attach)


def test_summed_gradient_across_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sum_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["mean"] == [], r["mean"]
        (code, sev, step, msg), = r["sum"]
        assert (code, sev) == ("PROTO_GRAD_NOT_AVERAGED", "warning") and step <= 20
        assert "2 ranks" in msg and "2x the configured lr" in msg and "/= dist.get_world_size()" in msg
        assert [(c, s) for c, s, *_ in r["sum_adam"]] == [("PROTO_GRAD_NOT_AVERAGED", "info")]
        # not reduced at all: the replica check's error, not a wrong "summed"
        assert {c for c, *_ in r["none"]} == {"PROTO_REPLICAS_DIVERGED"}, r["none"]


# -- resumes: "not restored", not "not in the checkpoint" -----------------------------------------
@pytest.mark.parametrize("new_api", [True, False])
def test_resume_without_restoring_says_not_restored(new_api):
    torch.manual_seed(0)
    saved = DINO(new_api)
    ckpt = {"student": saved.state_dict()}  # the weight-normalised layer's v is under its own name
    torch.manual_seed(1)
    live = DINO(new_api)  # resumed, but the loop forgot student.load_state_dict(ckpt['student'])
    opt = torch.optim.SGD([p for p in live.parameters() if p.requires_grad], lr=0.1)
    hub = attach(opt, "head.last_layer", model=live, **_opts())
    found = hub.check_checkpoint(ckpt, resumed=True)
    hub.close()
    (f,) = [x for x in found if x.code == "PROTO_NOT_IN_CHECKPOINT"]
    assert f.severity == "warning" and "not restored" in f.message and "without prototypes" not in f.message
    assert "last_layer" in f.message
    live.load_state_dict(ckpt["student"])  # restored: nothing to say
    hub = attach(opt, "head.last_layer", model=live, **_opts())
    assert [x for x in hub.check_checkpoint(ckpt, resumed=True) if x.code == "PROTO_NOT_IN_CHECKPOINT"] == []
    hub.close()


def test_capture_rules_when_d_equals_k_and_with_scores():
    # D == K, a bare tensor: an output with last dim D == K is taken as the projections
    torch.manual_seed(0)
    student = SDPNStudent()
    P = nn.Parameter(torch.randn(D, D))  # K == D
    opt = torch.optim.SGD([{"params": student.parameters()}, {"params": [P]}], lr=0.1)
    said: list[str] = []
    hub = attach(opt, P, model=student, **_opts(console=said.append))
    p = _snn(student(torch.randn(B, IN))[1], P)
    (-(p * torch.log(p)).sum(1).mean()).backward()
    opt.step()
    hub.close()
    assert hub._capture[1] == ":1" and any("as the projections" in l for l in said), said

    class Scores(nn.Module):  # returns only the (N, K) scores: the head's (N, D) output wins
        def __init__(self) -> None:
            super().__init__()
            self.body = SDPNStudent()
            self.P = nn.Parameter(torch.randn(K, D))

        def forward(self, x):
            return self.body(x)[1] @ F.normalize(self.P, dim=-1).T

    m = Scores()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    hub = attach(opt, m.P, model=m, **_opts())
    m(torch.randn(B, IN)).logsumexp(-1).mean().backward()
    opt.step()
    hub.close()
    assert hub._capture[1] == "body:1"
