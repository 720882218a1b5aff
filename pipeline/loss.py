"""SDPN loss: soft-nearest-neighbour prototype assignment, Sinkhorn-balanced teacher targets,
cross-entropy + mean-entropy maximisation (me-max) + KoLeo.

Shapes: B utterances per rank, K prototypes, D head output dim, E embedding dim.
Everything here is sync-free: no .item(), no data-dependent Python branching, so the
returned statistics stay on the device until the monitor hub moves them.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from monitors.core.distributed import world_size

__all__ = [
    "sinkhorn_knopp",
    "sharpen",
    "snn",
    "koleo_loss",
    "SDPNLoss",
    "all_reduce_sum",
    "AllReduceMean",
    "all_reduce_mean",
]


# --------------------------------------------------------------------------- distributed


def all_reduce_sum(x: Tensor) -> Tensor:
    """In-place sum over ranks; does nothing when not distributed. Not differentiable."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class AllReduceMean(torch.autograd.Function):
    """Mean over ranks in forward, identity in backward (3D-Speaker's AllReduce).

    Each rank's gradient then reaches its own contribution only; DDP averages the
    resulting parameter gradients, which matches differentiating the global mean.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world = world_size()
        if world > 1:
            x = x.contiguous().clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x = x / world
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def all_reduce_mean(x: Tensor) -> Tensor:
    """Differentiable mean over ranks (identity backward); x itself when not distributed."""
    return AllReduceMean.apply(x) if world_size() > 1 else x


# --------------------------------------------------------------------------- pieces


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, n_iters: int = 3) -> Tensor:
    """Balance assignment probabilities so prototypes are used equally (SwAV/MSN/SDPN).

    scores: (B, K) non-negative, already sharpened. Alternately normalises each prototype's
    total mass to 1/K and each sample's mass to 1/B_global, with prototype and total sums
    all-reduced across ranks. Returns (B, K) with rows summing to 1. n_iters=0 returns the
    row-normalised input. Column sums are clamped away from 0 so a prototype no sample
    touches (underflow after sharpening) yields zeros, not NaN.
    """
    if n_iters < 0:
        raise ValueError(f"sinkhorn n_iters={n_iters} must be >= 0; use 3 as in SDPN")
    Q = scores.float().T.clone()  # (K, B)
    K, B_local = Q.shape
    B = B_local * world_size()
    if n_iters == 0:
        return (Q / Q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(Q.dtype).tiny)).T

    tiny = torch.finfo(Q.dtype).tiny
    Q /= all_reduce_sum(Q.sum()).clamp_min(tiny)  # whole matrix sums to 1
    for _ in range(n_iters):
        # rows: each prototype's total mass (over all ranks) becomes 1/K
        row = all_reduce_sum(Q.sum(dim=1, keepdim=True))  # (K, 1)
        Q /= row.clamp_min(tiny)
        Q /= K
        # columns: each sample's mass becomes 1/B
        Q /= Q.sum(dim=0, keepdim=True).clamp_min(tiny)  # (1, B_local)
        Q /= B
    Q *= B  # columns sum to 1: each sample's assignment is a distribution
    return Q.T  # (B_local, K)


def sharpen(p: Tensor, T: float) -> Tensor:
    """p ** (1/T) renormalised over the last dim; T < 1 lowers entropy."""
    if T <= 0:
        raise ValueError(f"sharpen temperature T={T} must be > 0; SDPN uses 0.25")
    sp = p ** (1.0 / T)
    return sp / sp.sum(dim=-1, keepdim=True)


def _snn_logits(z: Tensor, prototypes: Tensor, tau: float) -> Tensor:
    """Cosine similarity to each prototype over tau: (N, D), (K, D) -> (N, K), float32."""
    z = F.normalize(z.float(), dim=-1)
    protos = F.normalize(prototypes.float(), dim=-1)
    return z @ protos.T / tau


def snn(
    z: Tensor, prototypes: Tensor, tau: float, proto_labels: Tensor | None = None
) -> Tensor:
    """Soft nearest neighbour: softmax(norm(z) @ norm(P).T / tau) @ proto_labels.

    z (N, D), prototypes (K, D) -> (N, K) rows summing to 1 (to proto_labels' width when
    given). proto_labels defaults to the identity (one label per prototype), which is skipped.
    Computed in float32 whatever the input dtype.
    """
    p = F.softmax(_snn_logits(z, prototypes, tau), dim=-1)
    if proto_labels is not None:
        p = p @ proto_labels.to(p.dtype)
    return p


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimator: -mean_i log ||x_i - nn(x_i)|| on normalised x.

    x: (N, E) with N >= 2. Lower when points are spread over the sphere.
    """
    if x.shape[0] < 2:
        raise ValueError(
            f"koleo_loss needs at least 2 vectors, got shape {tuple(x.shape)}; use a batch >= 2"
        )
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T  # (N, N) cosine similarity
        dots.fill_diagonal_(-2.0)  # never pick yourself
        nn_idx = dots.argmax(dim=1)  # (N,)
    dist_nn = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)  # (N,)
    return -torch.log(dist_nn + eps).mean()


# --------------------------------------------------------------------------- loss


class SDPNLoss(nn.Module):
    """SDPN objective on one step's head outputs.

    loss = ploss + memax_weight * me_max + koleo_weight * ke_loss, where
    - ploss: cross-entropy between Sinkhorn-balanced sharpened teacher assignments t and
      student assignments p, mean over all local-view rows;
    - me_max: log K - H(mean over the global batch of p) (0 when prototypes are used evenly);
    - ke_loss: KoLeo on the student backbone embedding, mean over local views
      (`koleo_reduction="sum"` reproduces 3D-Speaker, which sums over its 4 local views).
    """

    def __init__(
        self,
        tau: float = 0.1,
        teacher_temp: float = 0.25,
        sinkhorn_iters: int = 3,
        memax_weight: float = 1.0,
        koleo_weight: float = 0.1,
        koleo_reduction: str = "mean",
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau={tau} must be > 0; SDPN uses 0.1")
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp={teacher_temp} must be > 0; SDPN uses 0.25")
        if sinkhorn_iters < 0:
            raise ValueError(f"sinkhorn_iters={sinkhorn_iters} must be >= 0; SDPN uses 3")
        if koleo_reduction not in ("mean", "sum"):
            raise ValueError(
                f"koleo_reduction={koleo_reduction!r} is not one of 'mean', 'sum'"
            )
        self.tau = tau
        self.teacher_temp = teacher_temp
        self.sinkhorn_iters = sinkhorn_iters
        self.memax_weight = memax_weight
        self.koleo_weight = koleo_weight
        self.koleo_reduction = koleo_reduction

    @torch.no_grad()
    def targets(self, teacher_z: Tensor, prototypes: Tensor, batch: int) -> Tensor:
        """Teacher targets (B, K): sharpen(snn) -> Sinkhorn over all glb*B rows, then the
        mean over the glb global views of each utterance (view-major rows)."""
        t = sharpen(snn(teacher_z.detach(), prototypes.detach(), self.tau), self.teacher_temp)
        t = sinkhorn_knopp(t, self.sinkhorn_iters)  # (glb*B, K)
        glb = teacher_z.shape[0] // batch
        return t.view(glb, batch, -1).mean(dim=0) if glb > 1 else t  # (B, K)

    def forward(
        self,
        student_z: Tensor,
        teacher_z: Tensor,
        prototypes: Tensor,
        local_num: int,
        student_emb: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """student_z (local_num*B, D) view-major; teacher_z (glb*B, D) view-major;
        prototypes (K, D); student_emb (local_num*B, E) or None. Returns tensors, all
        detached except "loss"."""
        n_s, n_t = student_z.shape[0], teacher_z.shape[0]
        if local_num < 1 or n_s % local_num != 0:
            raise ValueError(
                f"student_z has {n_s} rows, not a multiple of local_num={local_num}; pass "
                f"local views stacked view-major as (local_num * B, D)"
            )
        B = n_s // local_num
        if n_t < B or n_t % B != 0:
            raise ValueError(
                f"teacher_z has {n_t} rows, not a multiple of the batch B={B} "
                f"(= {n_s} student rows / local_num {local_num}); pass (glb_num * B, D)"
            )
        if student_emb is not None and student_emb.shape[0] != n_s:
            raise ValueError(
                f"student_emb has {student_emb.shape[0]} rows but student_z has {n_s}; pass "
                f"the backbone outputs of the same local views"
            )
        K = prototypes.shape[0]

        # student assignments p over prototypes (grad flows to student_z and prototypes)
        logits = _snn_logits(student_z, prototypes, self.tau)  # (L*B, K)
        log_p = F.log_softmax(logits, dim=-1)
        probs = log_p.exp()

        # teacher targets t (no grad), repeated for each local view
        t = self.targets(teacher_z, prototypes, B)  # (B, K)
        t_rep = t.repeat(local_num, 1)  # (L*B, K), view-major like student_z

        ploss = -(t_rep * log_p).sum(dim=1).mean()

        # me-max: push the batch-mean assignment (averaged over ranks) towards uniform
        avg_p = all_reduce_mean(probs.mean(dim=0))  # (K,)
        me_max = torch.special.xlogy(avg_p, avg_p).sum() + math.log(K)

        if student_emb is not None:
            per_view = torch.stack([koleo_loss(e) for e in student_emb.chunk(local_num)])
            ke_loss = per_view.mean() if self.koleo_reduction == "mean" else per_view.sum()
        else:
            ke_loss = logits.new_zeros(())

        loss = ploss + self.memax_weight * me_max + self.koleo_weight * ke_loss

        with torch.no_grad():
            chosen = t.argmax(dim=1)  # (B,)
            used = torch.zeros(K, device=t.device, dtype=t.dtype).index_fill_(0, chosen, 1.0)
            n_proto = used.sum()  # distinct argmax prototypes on this rank; no sync
            max_t = t.max(dim=1).values.mean()  # as logged by 3D-Speaker: row max, averaged
            min_t = t.min(dim=1).values.mean()

        return {
            "loss": loss,
            "ploss": ploss.detach(),
            "me_max": me_max.detach(),
            "ke_loss": ke_loss.detach(),
            "np": n_proto,
            "max_t": max_t,
            "min_t": min_t,
            "student_probs": probs.detach(),
            "teacher_targets": t_rep,
        }
