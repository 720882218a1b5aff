"""facebookresearch/dino's ``main_dino.py`` in miniature, watched with one line.

The structure of its loop, written here from scratch on random "images" (CPU, seconds): a
``MultiCropWrapper(backbone, DINOHead)`` that runs the backbone once per crop resolution and the
head once on the concatenated features; the teacher a second wrapper loaded with the student's
weights (``requires_grad=False``); ``DINOHead`` with a weight-normalised ``last_layer`` (its
direction is the prototypes); the DINO loss with a centred, sharpened teacher on the 2 global
crops; under ``use_fp16`` a ``GradScaler``: ``fp16_scaler.scale(loss).backward();
fp16_scaler.unscale_(optimizer); clip_gradients; cancel_gradients_last_layer(epoch, student,
freeze_last_layer); fp16_scaler.step(optimizer); fp16_scaler.update()``; then the EMA of the
teacher with a momentum schedule; a checkpoint dict per epoch.

    python experiments/examples/recipe_facebook_dino.py --epochs 3 --exp-dir runs/examples/facebook_dino

The one line, after the optimizer and the scaler are built::

    hub = attach(optimizer, student.module.head.last_layer, model=student, teacher=teacher_without_ddp,
                 freeze_steps=args.freeze_last_layer * len(data_loader))

(``student.head.last_layer`` without DDP). ``fault=`` builds one of the bugs the hub must catch.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from monitors import attach  # noqa: E402

GLOBAL_RES, LOCAL_RES, N_LOCAL, WIDTH, HIDDEN, BOTTLENECK, OUT_DIM = 16, 8, 4, 48, 64, 32, 64
CLASSES, BATCH = 8, 8
FAULTS = ("teacher_alias", "no_ema", "freeze_teacher", "head_not_in_optimizer")


class TinyConvNet(nn.Module):
    """(N, 3, r, r) -> (N, WIDTH) at any resolution r (global average pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, WIDTH, 3, padding=1, stride=2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class DINOHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, BOTTLENECK))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(BOTTLENECK, OUT_DIM, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1)
        g.requires_grad = False                                      # norm_last_layer=True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        crops = x if isinstance(x, list) else [x]
        feats, start = [], 0
        while start < len(crops):                   # consecutive crops of one resolution: one pass
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(feats))


class DINOLoss(nn.Module):
    def __init__(self, ncrops: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.ncrops, self.student_temp, self.teacher_temp, self.center_momentum = \
            ncrops, student_temp, teacher_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, OUT_DIM))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        s = (student_output / self.student_temp).chunk(self.ncrops)
        t = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        terms = [torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                 for iq, q in enumerate(t) for v in range(len(s)) if v != iq]
        with torch.no_grad():
            self.center.mul_(self.center_momentum).add_(teacher_output.mean(0, keepdim=True),
                                                        alpha=1 - self.center_momentum)
        return sum(terms) / len(terms)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch < freeze_last_layer:
        for n, p in model.named_parameters():
            if "last_layer" in n:
                p.grad = None


def get_params_groups(model: nn.Module) -> list[dict[str, Any]]:
    reg = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias") and p.dim() > 1]
    not_reg = [p for n, p in model.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.dim() <= 1)]
    return [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]


def make_loader(seed: int):
    g = torch.Generator().manual_seed(seed)
    looks = torch.randn(CLASSES, 3, 1, 1, generator=g)

    def views() -> list[torch.Tensor]:  # 2 global crops, then N_LOCAL local ones
        cls = torch.randint(CLASSES, (BATCH,), generator=g)
        crop = lambda r: looks[cls] + 0.5 * torch.randn(BATCH, 3, r, r, generator=g)  # noqa: E731
        return [crop(GLOBAL_RES) for _ in range(2)] + [crop(LOCAL_RES) for _ in range(N_LOCAL)]
    return views


def train(epochs: int = 3, iters: int = 10, fault: Optional[str] = None, exp_dir: Optional[str] = None,
          freeze_last_layer: int = 1, use_fp16: bool = True, init_scale: float = 2.0 ** 16,
          **attach_options: Any):
    """Train; returns (hub, fp16_scaler). ``attach_options`` go to attach() (run=False, console=...)."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    torch.manual_seed(0)
    student = MultiCropWrapper(TinyConvNet(), DINOHead())
    teacher = student if fault == "teacher_alias" else MultiCropWrapper(TinyConvNet(), DINOHead())
    if teacher is not student:
        teacher.load_state_dict(student.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
    dino_loss = DINOLoss(ncrops=2 + N_LOCAL)
    groups = get_params_groups(student.backbone if fault == "head_not_in_optimizer" else student)
    optimizer = torch.optim.AdamW(groups)
    # (torch.cuda.amp.GradScaler() in DINO; its default init_scale is 2**16)
    fp16_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if use_fp16 else None

    # ---- the one line ----------------------------------------------------------------------------
    hub = attach(optimizer, student.head.last_layer, model=student, teacher=teacher,
                 freeze_steps=freeze_last_layer * iters, exp_dir=exp_dir, **attach_options)

    loader = make_loader(3)
    for epoch in range(epochs):
        for it in range(iters):
            step = epoch * iters + it
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = 5e-3 * min(1.0, (step + 1) / 5)
                if i == 0:
                    group["weight_decay"] = 0.04
            images = loader()
            teacher_output = teacher(images[:2])            # only the 2 global crops
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output)
            optimizer.zero_grad()
            frozen = teacher if fault == "freeze_teacher" else student
            if fp16_scaler is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
                cancel_gradients_last_layer(epoch, frozen, freeze_last_layer)
                optimizer.step()
            else:
                fp16_scaler.scale(loss).backward()
                fp16_scaler.unscale_(optimizer)             # before clipping, as DINO does
                torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
                cancel_gradients_last_layer(epoch, frozen, freeze_last_layer)
                fp16_scaler.step(optimizer)
                fp16_scaler.update()
            if fault != "no_ema":
                with torch.no_grad():
                    m = 0.996 + (1 - 0.996) * step / (epochs * iters)   # momentum schedule towards 1
                    for q, k in zip(student.parameters(), teacher.parameters()):
                        k.data.mul_(m).add_((1 - m) * q.detach().data)
        save_dict = {"student": student.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "dino_loss": dino_loss.state_dict()}
        if fp16_scaler is not None:
            save_dict["fp16_scaler"] = fp16_scaler.state_dict()
        # utils.save_on_master(save_dict, 'checkpoint.pth') as DINO does, then:
        hub.check_checkpoint(save_dict)
    hub.close()
    return hub, fp16_scaler


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10, help="iterations per epoch")
    ap.add_argument("--exp-dir", default="runs/examples/recipe_facebook_dino")
    ap.add_argument("--fault", choices=FAULTS, default=None, help="build one of the bugs the hub catches")
    ap.add_argument("--no-fp16", action="store_true", help="no GradScaler")
    args = ap.parse_args(argv)
    hub, _ = train(args.epochs, args.iters, fault=args.fault, exp_dir=args.exp_dir, use_fp16=not args.no_fp16)
    codes = sorted({f.code for f in hub.findings if f.severity != "info"})
    print(f"done: {args.epochs * args.iters} steps, findings above info: {codes or 'none'}")


if __name__ == "__main__":
    main()
