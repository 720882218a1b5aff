"""3D-Speaker's SDPN trainer (``speakerlab/bin/train_sdpn.py``) in miniature, watched with one line.

The structure of its loop, written here from scratch on random "fbank" features (CPU, seconds):
``Combiner(backbone, head)`` returns ``(embedding, projection)``; the teacher is a second network
loaded with the student's weights (``requires_grad=False``); the prototypes are a bare (K, D)
tensor in their own param group (weight decay 0); the loss is the soft-nearest-neighbour
cross-entropy against sharpened, Sinkhorn-balanced teacher targets plus ME-MAX;
``optimizer.zero_grad(); loss.backward(); clip; cancel_gradients_last_layer(epoch, student,
freeze_last_layer); optimizer.step()``; then the EMA of the teacher; a checkpoint dict per epoch.

    python experiments/examples/recipe_3dspeaker_sdpn.py --epochs 3 --exp-dir runs/examples/sdpn

The one line: ``attach(optimizer, prototypes, model=student, teacher=teacher)``. No
``freeze_steps``: ``cancel_gradients_last_layer`` clears the gradient of parameters named
``last_layer``, and SDPN's student has none (its prototypes are a bare tensor), so nothing is
frozen; declaring ``freeze_steps=freeze_last_layer * len(train_loader)`` makes the hub say so
(``PROTO_FREEZE_IGNORED``). ``fault=`` builds one of the bugs the hub must catch.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from monitors import attach  # noqa: E402

N_MELS, FRAMES, CHANNELS, EMBED, HIDDEN, OUT_DIM, NUM_PROTO = 20, 40, 24, 48, 64, 32, 64
SPEAKERS, BATCH, LOCAL_NUM = 8, 16, 4
FAULTS = ("teacher_alias", "no_ema", "proto_not_in_optimizer")


class TinyECAPA(nn.Module):
    """(N, n_mels, T) -> (N, EMBED): conv, squeeze-excitation, mean pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(N_MELS, CHANNELS, 3, padding=1)
        self.se = nn.Sequential(nn.Linear(CHANNELS, 8), nn.ReLU(), nn.Linear(8, CHANNELS), nn.Sigmoid())
        self.fc = nn.Linear(CHANNELS, EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        h = h * self.se(h.mean(-1)).unsqueeze(-1)
        return self.fc(h.mean(-1))


class SDPNHead(nn.Module):
    """MLP to the prototypes' space, L2-normalised (no prototype layer: P is a bare tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(EMBED, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


class Combiner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = TinyECAPA(), SDPNHead()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.backbone(x)
        return emb, self.head(emb)


def snn(query: torch.Tensor, prototypes: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    return torch.softmax(F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).T / tau, dim=-1)


@torch.no_grad()
def sinkhorn(q: torch.Tensor, iters: int = 3) -> torch.Tensor:
    q = q.T / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch < freeze_last_layer:
        for n, p in model.named_parameters():
            if "last_layer" in n:
                p.grad = None


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    voices = torch.randn(SPEAKERS, N_MELS, 1, generator=g) * 1.5

    def batch() -> torch.Tensor:  # (B, 1 global + 2 local-pair views, n_mels, T)
        spk = torch.randint(SPEAKERS, (BATCH,), generator=g)
        base = voices[spk] + 0.3 * torch.randn(BATCH, N_MELS, FRAMES, generator=g)
        return torch.stack([base + 0.2 * torch.randn(base.shape, generator=g) for _ in range(3)], dim=1)
    return batch


def train(epochs: int = 3, iters: int = 10, fault: Optional[str] = None, exp_dir: Optional[str] = None,
          freeze_last_layer: int = 1, **attach_options: Any):
    """Train; returns the hub (closed). ``attach_options`` go to attach() (run=False, console=...)."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    torch.manual_seed(0)
    student = Combiner()
    teacher = student if fault == "teacher_alias" else Combiner()
    if teacher is not student:
        teacher.load_state_dict(student.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
    with torch.no_grad():
        prototypes = torch.empty(NUM_PROTO, OUT_DIM).uniform_(-OUT_DIM ** -0.5, OUT_DIM ** -0.5)
    prototypes = nn.Parameter(prototypes)
    base_lr = 0.2
    optimizer = torch.optim.SGD(param_groups(student), lr=base_lr, momentum=0.9, weight_decay=5e-5)
    if fault != "proto_not_in_optimizer":
        optimizer.add_param_group({"params": prototypes, "weight_decay": 0.0, "lr": base_lr})

    # ---- the one line ----------------------------------------------------------------------------
    hub = attach(optimizer, prototypes, model=student, teacher=teacher, exp_dir=exp_dir, **attach_options)

    batch = make_batches(1)
    for epoch in range(epochs):
        for it in range(iters):
            step = epoch * iters + it
            lr = base_lr * min(1.0, (step + 1) / 5)            # warm-up, as the cosine schedule starts
            for group in optimizer.param_groups:
                group["lr"] = lr
            data = batch().transpose(0, 1)                     # (views, B, n_mels, T)
            _, target_views = teacher(data[0])
            half = FRAMES // 2
            local = torch.cat([data[1][..., :half], data[1][..., half:], data[2][..., :half], data[2][..., half:]])
            anchor_emb, anchor_views = student(local)          # (4B, E), (4B, D)
            probs = snn(anchor_views, prototypes)
            with torch.no_grad():
                targets = snn(target_views, prototypes) ** 4
                targets = sinkhorn(targets / targets.sum(1, keepdim=True)).repeat(LOCAL_NUM, 1)
            avg = probs.mean(0)
            loss = -(targets * torch.log(probs + 1e-8)).sum(1).mean() + (avg * torch.log(avg + 1e-8)).sum() \
                + math.log(NUM_PROTO)
            optimizer.zero_grad()
            loss.backward()
            # (under DDP: all-reduce of prototypes.grad here)
            torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
            cancel_gradients_last_layer(epoch, student, freeze_last_layer)
            optimizer.step()
            if fault != "no_ema":
                with torch.no_grad():
                    m = 0.996
                    for q, k in zip(student.parameters(), teacher.parameters()):
                        k.data.mul_(m).add_((1 - m) * q.detach().data)
        save_dict = {"student": student.state_dict(), "teacher": teacher.state_dict(),
                     "prototypes": prototypes.data, "optimizer": optimizer.state_dict(), "epoch": epoch + 1}
        # torch.save(save_dict, ...) as the trainer does, then:
        hub.check_checkpoint(save_dict)
    hub.close()
    return hub


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10, help="iterations per epoch")
    ap.add_argument("--exp-dir", default="runs/examples/recipe_3dspeaker_sdpn")
    ap.add_argument("--fault", choices=FAULTS, default=None, help="build one of the bugs the hub catches")
    args = ap.parse_args(argv)
    hub = train(args.epochs, args.iters, fault=args.fault, exp_dir=args.exp_dir)
    codes = sorted({f.code for f in hub.findings if f.severity != "info"})
    print(f"done: {args.epochs * args.iters} steps, findings above info: {codes or 'none'}")


if __name__ == "__main__":
    main()
