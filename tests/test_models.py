"""Tests for pipeline.models on tiny CPU configurations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pipeline.models import (
    ECAPA_TDNN,
    SDPNHead,
    SDPNModel,
    build_model,
    ema_update,
    init_prototypes,
    make_teacher,
    param_groups,
)

torch.set_num_threads(1)

TINY = dict(in_dim=20, channels=32, embed_dim=24, scale=4, output_dim=16, hidden_dim=48)


def tiny_model() -> SDPNModel:
    torch.manual_seed(0)
    return build_model(**TINY)


def test_ecapa_output_shape() -> None:
    net = ECAPA_TDNN(in_dim=20, channels=32, embed_dim=24, scale=4, attn_channels=16)
    out = net(torch.randn(3, 37, 20))  # (B, T, F)
    assert out.shape == (3, 24)
    assert torch.isfinite(out).all()


def test_ecapa_rejects_bad_config_and_input() -> None:
    with pytest.raises(ValueError, match="channels=30"):
        ECAPA_TDNN(channels=30, scale=4)
    net = ECAPA_TDNN(in_dim=20, channels=32, embed_dim=8, scale=4)
    with pytest.raises(ValueError, match="transpose"):
        net(torch.randn(2, 20, 50))  # (B, F, T) by mistake


def test_model_returns_embedding_and_unit_norm_z() -> None:
    model = tiny_model()
    emb, z = model(torch.randn(4, 30, 20))
    assert emb.shape == (4, 24) and z.shape == (4, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4))


def test_head_layers_and_norm() -> None:
    head = SDPNHead(10, output_dim=6, hidden_dim=12, nlayers=3)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.GELU] * 2 + [nn.Linear]
    z = head(torch.randn(5, 10))
    assert z.shape == (5, 6)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    assert SDPNHead(10, bottleneck_dim=7, hidden_dim=12)(torch.randn(3, 10)).shape == (3, 7)
    assert len(SDPNHead(10, output_dim=6, nlayers=1).mlp) == 1


def test_init_prototypes_range_shape_leaf() -> None:
    g = torch.Generator().manual_seed(1)
    P = init_prototypes(50, 16, generator=g)
    bound = 1 / math.sqrt(16)
    assert P.shape == (50, 16)
    assert P.is_leaf and P.requires_grad and not isinstance(P, nn.Parameter)
    assert P.min() >= -bound and P.max() <= bound
    assert P.max() > 0.8 * bound and P.min() < -0.8 * bound  # fills the range
    P2 = init_prototypes(50, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(P.detach(), P2.detach())  # seeded
    assert init_prototypes(3, 4, device="cpu").is_leaf


@pytest.mark.parametrize("num_proto,output_dim,key", [(0, 8, "num_proto"), (8, 0, "output_dim")])
def test_init_prototypes_rejects_nonpositive(num_proto: int, output_dim: int, key: str) -> None:
    with pytest.raises(ValueError, match=rf"{key}=0 must be >= 1; set {key}"):
        init_prototypes(num_proto, output_dim)


def test_param_groups_split() -> None:
    model = tiny_model()
    groups = param_groups(model)
    assert [g["name"] for g in groups] == ["regularized", "not_regularized"]
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter twice
    assert set(ids) == {id(p) for p in model.parameters()}  # every parameter covered
    assert all(p.ndim <= 1 for p in groups[1]["params"])
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4)  # accepted as-is


def test_param_groups_skip_frozen() -> None:
    model = tiny_model()
    model.head.requires_grad_(False)
    n = sum(len(g["params"]) for g in param_groups(model))
    assert n == sum(1 for p in model.parameters() if p.requires_grad)


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for b in model.buffers():
            if b.dtype.is_floating_point:
                b.add_(1.0)


def test_make_teacher_frozen_copy() -> None:
    student = tiny_model()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (n, s), (_, t) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(s, t), n


def test_ema_update_momentum_zero_copies_one_keeps() -> None:
    student = tiny_model()
    teacher = make_teacher(student)
    _perturb(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    ema_update(teacher, student, momentum=1.0)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name]), name

    ema_update(teacher, student, momentum=0.0)
    for (name, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), name  # params and buffers


def test_ema_update_interpolates() -> None:
    student = tiny_model()
    teacher = make_teacher(student)
    t0 = [p.clone() for p in teacher.parameters()]
    _perturb(student)
    ema_update(teacher, student, momentum=0.75)
    for a, s, t in zip(t0, student.parameters(), teacher.parameters()):
        torch.testing.assert_close(t, 0.75 * a + 0.25 * s.detach())


def test_ema_update_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="make_teacher"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)
