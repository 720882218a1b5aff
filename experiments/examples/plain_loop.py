"""An SDPN-style training loop written without protowatch, watched with one line: ``attach``.

Random "speakers" (a mean vector each, views = mean + noise), a small MLP student and its EMA
teacher, a free prototypes tensor P (K, D), Sinkhorn-balanced teacher targets, ME-MAX. Runs on
CPU in a few seconds and writes an offline W&B run under --exp-dir:

    python experiments/examples/plain_loop.py --steps 200 --exp-dir runs/examples/plain_loop
    wandb leet inspect --summary --json runs/examples/plain_loop/wandb/latest-run
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from monitors import attach  # noqa: E402


class Student(nn.Module):
    def __init__(self, in_dim: int = 40, embed_dim: int = 64, out_dim: int = 32) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_dim, 128), nn.GELU(), nn.Linear(128, embed_dim))
        self.head = nn.Sequential(nn.Linear(embed_dim, 128), nn.GELU(), nn.Linear(128, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=-1)  # (B, D) on the unit sphere


def snn(z: torch.Tensor, P: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Soft nearest neighbour: (B, D), (K, D) -> (B, K) probabilities."""
    return torch.softmax(F.normalize(z, dim=-1) @ F.normalize(P, dim=-1).T / tau, dim=-1)


@torch.no_grad()
def sinkhorn(t: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Balance (B, K) targets so every prototype gets the same total mass."""
    q = t.T.clone()  # (K, B)
    K, B = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True) * K
        q /= q.sum(dim=0, keepdim=True) * B
    return (q * B).T


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--exp-dir", default="runs/examples/plain_loop", help="W&B run and local records go here")
    ap.add_argument("--num-proto", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    num_spk, in_dim, D, B = 32, 40, 32, 64
    means = torch.randn(num_spk, in_dim) * 2.0

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(num_spk, (n,))
        return means[y] + torch.randn(n, in_dim), y

    student = Student(in_dim, 64, D)
    teacher = copy.deepcopy(student).requires_grad_(False)
    P = nn.Parameter(torch.empty(args.num_proto, D).uniform_(-1 / math.sqrt(D), 1 / math.sqrt(D)))
    optimizer = torch.optim.SGD([{"params": student.parameters()},
                                 {"params": [P], "weight_decay": 0.0}], lr=0.05, momentum=0.9, weight_decay=5e-5)

    # ---- the one line: watch the prototypes of this loop -------------------------------------
    hub = attach(optimizer, P, model=student, teacher=teacher, capture="head", exp_dir=args.exp_dir, log_every=10)

    for step in range(args.steps):
        x, _ = batch(B)
        local_views = torch.cat([x + 0.3 * torch.randn_like(x) for _ in range(2)])  # (2B, in)
        p = snn(student(local_views), P)                                                # (2B, K)
        with torch.no_grad():
            t = snn(teacher(x), P) ** (1 / 0.25)
            t = sinkhorn(t / t.sum(dim=1, keepdim=True)).repeat(2, 1)                   # (2B, K)
        mean_p = p.mean(dim=0)
        loss = -(t * torch.log(p + 1e-8)).sum(dim=1).mean() + (math.log(args.num_proto) + (mean_p * torch.log(mean_p + 1e-8)).sum())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # EMA teacher
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(0.99).add_(ps.detach(), alpha=0.01)
        if (step + 1) % 100 == 0:  # optional: a t-SNE frame of labelled eval embeddings
            student.eval()
            xe, ye = batch(256)
            with torch.no_grad(), hub.capture(labels=ye):
                student(xe)
            student.train()
        if hub.should_stop:
            break

    ckpt = {"model": student.state_dict(), "prototypes": P.detach(), "optimizer": optimizer.state_dict()}
    hub.check_checkpoint(ckpt)  # optional: are the prototypes (and their optimizer state) saved?
    hub.close()
    codes = sorted({f.code for f in hub.findings if f.severity != "info"})
    print(f"done: {args.steps} steps, loss {loss.item():.3f}, findings: {codes or 'none'}")


if __name__ == "__main__":
    main()
