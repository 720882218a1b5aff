"""Tests for pipeline.loss on small random problems (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.loss import SDPNLoss, koleo_loss, sharpen, sinkhorn_knopp, snn
from pipeline.models import init_prototypes

torch.set_num_threads(1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(torch.special.xlogy(p, p)).sum(dim=-1)


def test_sinkhorn_rows_sum_to_one_and_columns_balance() -> None:
    torch.manual_seed(0)
    # skewed scores: most mass on the first prototypes
    scores = sharpen(F.softmax(torch.randn(64, 16) + torch.linspace(3, 0, 16), dim=1), 0.25)
    before = scores.clone()
    q = sinkhorn_knopp(scores, n_iters=3)
    assert torch.equal(scores, before)  # input untouched
    assert q.shape == (64, 16)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))
    cols = q.sum(dim=0)
    assert (cols.max() / cols.min()) < (scores.sum(0).max() / scores.sum(0).min())
    q_many = sinkhorn_knopp(scores, n_iters=50)
    torch.testing.assert_close(q_many.sum(dim=0), torch.full((16,), 64 / 16), rtol=1e-2, atol=1e-2)


def test_sinkhorn_handles_unused_prototype() -> None:
    scores = torch.rand(8, 5)
    scores[:, 2] = 0.0  # underflowed after sharpening
    q = sinkhorn_knopp(scores)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(8))


def test_sharpen_lowers_entropy() -> None:
    p = F.softmax(torch.randn(10, 7), dim=1)
    s = sharpen(p, 0.25)
    torch.testing.assert_close(s.sum(dim=1), torch.ones(10))
    assert (entropy(s) < entropy(p)).all()
    with pytest.raises(ValueError, match="T=0"):
        sharpen(p, 0)


def test_snn_rows_sum_to_one_and_labels() -> None:
    z, P = torch.randn(6, 8), torch.randn(5, 8)
    p = snn(z, P, tau=0.1)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(6))
    torch.testing.assert_close(snn(z, P, 0.1, proto_labels=torch.eye(5)), p)
    # invariant to the scale of z and P (cosine similarity)
    torch.testing.assert_close(snn(3 * z, 0.5 * P, 0.1), p)


def test_koleo_lower_for_spread_points() -> None:
    torch.manual_seed(0)
    spread = torch.eye(8)  # orthogonal: nearest neighbour at distance sqrt(2)
    clustered = torch.ones(8, 8) + 0.01 * torch.randn(8, 8)
    ks, kc = koleo_loss(spread), koleo_loss(clustered)
    assert torch.isfinite(ks) and torch.isfinite(kc)
    torch.testing.assert_close(ks, torch.tensor(-math.log(math.sqrt(2))), rtol=1e-4, atol=1e-4)
    assert ks < kc
    x = torch.randn(10, 4, requires_grad=True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 4))


def _problem(B: int = 16, L: int = 4, D: int = 12, K: int = 10, E: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student_z = torch.randn(L * B, D, generator=g, requires_grad=True)
    teacher_z = torch.randn(B, D, generator=g, requires_grad=True)
    emb = torch.randn(L * B, E, generator=g, requires_grad=True)
    P = init_prototypes(K, D, generator=g)
    return student_z, teacher_z, emb, P


def test_loss_outputs_and_gradient_paths() -> None:
    student_z, teacher_z, emb, P = _problem()
    out = SDPNLoss()(student_z, teacher_z, P, local_num=4, student_emb=emb)
    expected = {"loss", "ploss", "me_max", "ke_loss", "np", "max_t", "min_t",
                "student_probs", "teacher_targets"}
    assert set(out) == expected
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    assert out["loss"].requires_grad
    assert all(not out[k].requires_grad for k in expected - {"loss"})
    assert out["student_probs"].shape == out["teacher_targets"].shape == (64, 10)
    torch.testing.assert_close(out["teacher_targets"].sum(1), torch.ones(64))
    # targets repeated view-major for the 4 local views
    t = out["teacher_targets"].view(4, 16, 10)
    assert torch.equal(t[0], t[3])
    torch.testing.assert_close(
        out["loss"].detach(), out["ploss"] + out["me_max"] + 0.1 * out["ke_loss"]
    )
    assert out["np"].dim() == 0 and out["np"].dtype.is_floating_point
    assert 1 <= out["np"] <= 10
    assert 0 <= out["min_t"] <= out["max_t"] <= 1

    out["loss"].backward()
    assert P.grad is not None and P.grad.abs().sum() > 0  # through the student branch
    assert teacher_z.grad is None  # teacher branch is no-grad
    assert student_z.grad.abs().sum() > 0 and emb.grad.abs().sum() > 0


def test_prototype_grad_from_student_only() -> None:
    # P's gradient equals that of the cross-entropy with the targets taken as constants
    student_z, teacher_z, _, P = _problem()
    crit = SDPNLoss(memax_weight=0.0)
    g_loss = torch.autograd.grad(crit(student_z, teacher_z, P, 4)["loss"], P)[0]
    t = crit.targets(teacher_z, P, 16).repeat(4, 1)
    manual = -(t * torch.log(snn(student_z, P, crit.tau))).sum(1).mean()
    g_manual = torch.autograd.grad(manual, P)[0]
    assert g_loss.abs().sum() > 0
    torch.testing.assert_close(g_loss, g_manual)


def test_np_counts_distinct_argmax() -> None:
    torch.manual_seed(0)
    K, D, B = 8, 16, 256
    P = torch.randn(K, D)
    out = SDPNLoss()(torch.randn(B, D), torch.randn(B, D), P, local_num=1)
    assert out["np"] == K  # random batch, Sinkhorn-balanced: every prototype chosen
    z_one = P[3].expand(B, D) + 0.001 * torch.randn(B, D)  # all teacher views near proto 3
    out1 = SDPNLoss(sinkhorn_iters=0)(torch.randn(B, D), z_one, P, local_num=1)
    assert out1["np"] == 1


def test_me_max_uniform_vs_collapsed() -> None:
    K, D = 8, 8
    P = torch.eye(K, D)
    crit = SDPNLoss()
    # uniform usage: each prototype hit equally often
    z_uni = torch.eye(K, D).repeat(4, 1)
    assert crit(z_uni, z_uni, P, 1)["me_max"] < 1e-3
    # collapsed: every row picks prototype 0 with tiny tau -> near one-hot
    z_col = torch.eye(K, D)[:1].repeat(32, 1)
    me = SDPNLoss(tau=0.01)(z_col, z_uni, P, 1)["me_max"]
    assert abs(me - math.log(K)) < 1e-3


def test_glb_num_two_averages_globals() -> None:
    student_z, _, _, P = _problem(B=8)
    teacher_z = torch.randn(2 * 8, 12)
    crit = SDPNLoss()
    out = crit(student_z, teacher_z, P, local_num=4)
    t = crit.targets(teacher_z, P, 8)
    assert t.shape == (8, 10)
    assert torch.equal(out["teacher_targets"][:8], t)


def test_koleo_reduction_sum_matches_original() -> None:
    student_z, teacher_z, emb, P = _problem()
    mean = SDPNLoss()(student_z, teacher_z, P, 4, emb)["ke_loss"]
    total = SDPNLoss(koleo_reduction="sum")(student_z, teacher_z, P, 4, emb)["ke_loss"]
    torch.testing.assert_close(total, 4 * mean)
    assert SDPNLoss()(student_z, teacher_z, P, 4)["ke_loss"] == 0


def test_bad_shapes_raise() -> None:
    student_z, teacher_z, _, P = _problem(B=8)
    with pytest.raises(ValueError, match="local_num=5"):
        SDPNLoss()(student_z, teacher_z, P, local_num=5)
    with pytest.raises(ValueError, match="teacher_z has 7 rows"):
        SDPNLoss()(student_z, teacher_z[:7], P, local_num=4)


def test_forward_has_no_host_sync() -> None:
    # Meta tensors carry no data: any .item(), bool(tensor) or data-dependent shape fails.
    with torch.device("meta"):
        student_z = torch.randn(4 * 8, 12, requires_grad=True)
        teacher_z = torch.randn(8, 12)
        emb = torch.randn(4 * 8, 6, requires_grad=True)
        P = init_prototypes(10, 12, device="meta")
        out = SDPNLoss()(student_z, teacher_z, P, 4, emb)
        out["loss"].backward()
    assert P.grad is not None and P.grad.shape == P.shape


def test_loss_decreases_on_tiny_problem() -> None:
    torch.manual_seed(0)
    B, L, D, K, E = 32, 2, 8, 6, 10
    # four well-separated clusters; views are noisy copies of the utterance's centre
    centres = F.normalize(torch.randn(4, E), dim=1)
    utt = centres[torch.arange(B) % 4]
    student = torch.nn.Sequential(torch.nn.Linear(E, 16), torch.nn.GELU(), torch.nn.Linear(16, D))
    P = init_prototypes(K, D, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([*student.parameters(), P], lr=1e-2)
    crit = SDPNLoss()
    losses = []
    for _ in range(40):
        views = utt.repeat(L + 1, 1) + 0.05 * torch.randn((L + 1) * B, E)
        z = student(views)
        out = crit(z[B:], z[:B].detach(), P, L, student_emb=views[B:])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
