"""WeSpeaker's DINO recipe (``wespeaker/ssl/bin/train_dino.py`` and ``dino_executor.run_epoch``) in
miniature, watched with one line.

The structure of its loop, written here from scratch on random "fbank" features (CPU, seconds):
a speaker model that returns a tuple (its last element the embedding) and holds a
squeeze-excitation layer as wide as the projection; a ``DINO`` wrapper that deep-copies it into
``s_model`` and ``t_model``, adds a ``projection_head`` (an MLP, L2 normalisation, a
weight-normalised ``last_layer`` whose direction is the prototypes) to each, and in its
``forward`` calls ``s_model(x)`` and then ``s_model.projection_head(...)`` *outside* ``s_model``'s
forward; the DINO loss with a centred, sharpened teacher; ``run_epoch``'s update under a
``GradScaler`` (``scaler.scale(loss).backward(); scaler.unscale_(optimizer); clip;
cancel_gradients_last_layer(epoch, model.s_model, freeze_last_layer); scaler.step(optimizer);
scaler.update()``), then ``model.ema_update(m)``; a checkpoint per epoch.

    python experiments/examples/recipe_wespeaker_dino.py --epochs 3 --exp-dir runs/examples/wespeaker_dino

The one line, after the optimizer is built::

    hub = attach(optimizer, model.s_model.projection_head.last_layer, model=model.s_model,
                 teacher=model.t_model, freeze_steps=freeze_last_layer * epoch_iter)

(``model.module.s_model...`` under DDP). ``fault=`` builds one of the bugs the hub must catch.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from monitors import attach  # noqa: E402

N_MELS, FRAMES, CHANNELS, EMBED, HIDDEN, BOTTLENECK, OUT_DIM = 20, 40, 32, 48, 64, 32, 64
SPEAKERS, BATCH, GLOBAL_NUM, LOCAL_NUM = 8, 8, 2, 2
FAULTS = ("teacher_alias", "no_ema", "freeze_teacher", "head_not_in_optimizer")


class TinyECAPA(nn.Module):
    """(N, T, n_mels) -> (pooled stats, embedding): its SE layer is BOTTLENECK wide, as the
    projection is (the trap of the issue: an inner activation of the projection's width)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(N_MELS, CHANNELS, 3, padding=1)
        self.se = nn.ModuleDict({"linear1": nn.Linear(CHANNELS, 8), "linear2": nn.Linear(8, CHANNELS)})
        self.pool_fc = nn.Linear(CHANNELS, EMBED)

    def forward(self, x: torch.Tensor):
        h = F.relu(self.conv(x.transpose(1, 2)))                     # (N, C, T)
        w = torch.sigmoid(self.se["linear2"](F.relu(self.se["linear1"](h.mean(-1)))))
        stats = (h * w.unsqueeze(-1)).mean(-1)
        return stats, self.pool_fc(stats)                            # a tuple: the embedding last


class DINOHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(EMBED, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, BOTTLENECK))
        with warnings.catch_warnings():  # WeSpeaker uses the old weight_norm API: weight_g, weight_v
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(BOTTLENECK, OUT_DIM, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        self.last_layer.weight_g.requires_grad = False               # norm_last_layer=True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINOLoss(nn.Module):
    def __init__(self, n_scrops: int, n_tcrops: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.n_scrops, self.n_tcrops = n_scrops, n_tcrops
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, OUT_DIM))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        s = (student_output / self.student_temp).chunk(self.n_scrops)
        t = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(self.n_tcrops)
        terms = [torch.sum(-ti * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                 for i, ti in enumerate(t) for v in range(len(s)) if v != i]
        with torch.no_grad():
            self.center.mul_(self.center_momentum).add_(teacher_output.mean(0, keepdim=True),
                                                        alpha=1 - self.center_momentum)
        return sum(terms) / len(terms)


class DINO(nn.Module):
    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.s_model = base_model
        self.t_model = copy.deepcopy(base_model)
        self.s_model.add_module("projection_head", DINOHead())
        self.t_model.add_module("projection_head", DINOHead())
        self.t_model.projection_head.load_state_dict(self.s_model.projection_head.state_dict())
        for p in self.t_model.parameters():
            p.requires_grad = False
        self.loss = DINOLoss(GLOBAL_NUM + LOCAL_NUM, GLOBAL_NUM)

    @torch.no_grad()
    def ema_update(self, m: float) -> None:
        for q, k in zip(self.s_model.parameters(), self.t_model.parameters()):
            k.data.mul_(m).add_((1 - m) * q.detach().data)

    def forward(self, local_feats: torch.Tensor, global_feats: torch.Tensor) -> torch.Tensor:
        g, l_ = self.s_model(global_feats), self.s_model(local_feats)
        g, l_ = (g[-1] if isinstance(g, tuple) else g), (l_[-1] if isinstance(l_, tuple) else l_)
        s_output = self.s_model.projection_head(torch.cat([g, l_]))   # the head, outside s_model's forward
        with torch.no_grad():
            t = self.t_model(global_feats)
            t_output = self.t_model.projection_head(t[-1] if isinstance(t, tuple) else t)
        return self.loss(s_output, t_output)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch < freeze_last_layer:
        for n, p in model.named_parameters():
            if "last_layer" in n:
                p.grad = None


def params_groups(model: nn.Module) -> list[dict[str, Any]]:
    reg = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias") and p.dim() > 1]
    not_reg = [p for n, p in model.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.dim() <= 1)]
    return [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]


def make_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    voices = torch.randn(SPEAKERS, 1, N_MELS, generator=g) * 1.5

    def chunks(spk: torch.Tensor, num: int, frames: int) -> torch.Tensor:  # (B, num, T, F)
        return voices[spk].unsqueeze(1) + 0.4 * torch.randn(len(spk), num, frames, N_MELS, generator=g)

    def batch() -> dict[str, torch.Tensor]:
        spk = torch.randint(SPEAKERS, (BATCH,), generator=g)
        return {"local_chunks": chunks(spk, LOCAL_NUM, FRAMES // 2), "global_chunks": chunks(spk, GLOBAL_NUM, FRAMES)}
    return batch


def train(epochs: int = 3, epoch_iter: int = 10, fault: Optional[str] = None, exp_dir: Optional[str] = None,
          freeze_last_layer: int = 1, enable_amp: bool = True, init_scale: float = 2.0 ** 16,
          **attach_options: Any):
    """Train; returns (hub, scaler). ``attach_options`` go to attach() (run=False, console=...)."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    torch.manual_seed(0)
    model = DINO(TinyECAPA())
    if fault == "teacher_alias":  # the teacher is the student's own tensors
        model.t_model = model.s_model
    groups = params_groups(model)
    if fault == "head_not_in_optimizer":  # built from the backbone before the head was added
        groups = params_groups(nn.ModuleList([model.s_model.conv, model.s_model.se, model.s_model.pool_fc]))
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=enable_amp)

    # ---- the one line ----------------------------------------------------------------------------
    hub = attach(optimizer, model.s_model.projection_head.last_layer, model=model.s_model, teacher=model.t_model,
                 freeze_steps=freeze_last_layer * epoch_iter, exp_dir=exp_dir, **attach_options)

    batch = make_batches(2)
    base_lr = 0.1
    for epoch in range(1, epochs + 1):                      # WeSpeaker counts epochs from 1
        model.train()
        for i in range(epoch_iter):
            cur_iter = (epoch - 1) * epoch_iter + i
            for k, group in enumerate(optimizer.param_groups):
                group["lr"] = base_lr * min(1.0, (cur_iter + 1) / 5)
                if k == 0:
                    group["weight_decay"] = 5e-5
            b = batch()
            local_feats = b["local_chunks"].transpose(0, 1).reshape(-1, FRAMES // 2, N_MELS)
            global_feats = b["global_chunks"].transpose(0, 1).reshape(-1, FRAMES, N_MELS)
            with torch.autocast("cpu", enabled=False):       # (cuda autocast in WeSpeaker)
                loss = model(local_feats, global_feats)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.s_model.parameters(), 3.0)
            target = model.t_model if fault == "freeze_teacher" else model.s_model
            cancel_gradients_last_layer(epoch - 1, target, freeze_last_layer)
            scaler.step(optimizer)
            scaler.update()
            if fault != "no_ema":
                model.ema_update(0.996)
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        # save_checkpoint(model, optimizer, path) as WeSpeaker does, then:
        hub.check_checkpoint(checkpoint)
    hub.close()
    return hub, scaler


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--epoch-iter", type=int, default=10)
    ap.add_argument("--exp-dir", default="runs/examples/recipe_wespeaker_dino")
    ap.add_argument("--fault", choices=FAULTS, default=None, help="build one of the bugs the hub catches")
    args = ap.parse_args(argv)
    hub, _ = train(args.epochs, args.epoch_iter, fault=args.fault, exp_dir=args.exp_dir)
    codes = sorted({f.code for f in hub.findings if f.severity != "info"})
    print(f"done: {args.epochs * args.epoch_iter} steps, findings above info: {codes or 'none'}")


if __name__ == "__main__":
    main()
