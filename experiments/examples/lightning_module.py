"""A SwAV-style LightningModule (an nn.Linear prototype layer, Sinkhorn-balanced swapped
targets) watched by protowatch with one callback. Runs on CPU in well under a minute and writes an
offline W&B run under --exp-dir:

    python experiments/examples/lightning_module.py --steps 200 --exp-dir runs/examples/lightning
    wandb leet inspect --summary --json runs/examples/lightning/wandb/latest-run
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn
import torch.nn.functional as F
import lightning.pytorch as L

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from monitors.integrations.lightning import PrototypeMonitorCallback  # noqa: E402


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """(B, K) scores -> (B, K) targets whose prototype marginals are uniform."""
    q = torch.exp((scores - scores.max()) / eps).T  # (K, B)
    q /= q.sum()
    K, B = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True) * K
        q /= q.sum(dim=0, keepdim=True) * B
    return (q * B).T


class SwAV(L.LightningModule):
    def __init__(self, in_dim: int = 40, dim: int = 32, num_proto: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Linear(in_dim, 128), nn.GELU(), nn.Linear(128, 64))
        self.projector = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, dim))
        self.prototypes = nn.Linear(dim, num_proto, bias=False)  # its weight (K, D) is watched

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=-1)  # (B, D)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():  # SwAV keeps the prototypes on the unit sphere
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=-1))
        v1, v2 = x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)
        z1, z2 = self.project(v1), self.project(v2)
        s1, s2 = self.prototypes(z1), self.prototypes(z2)          # (B, K) cosine scores
        q1, q2 = sinkhorn(s1.detach()), sinkhorn(s2.detach())      # swapped targets
        p1, p2 = torch.softmax(s1 / 0.1, dim=-1), torch.softmax(s2 / 0.1, dim=-1)
        loss = -0.5 * ((q2 * torch.log(p1 + 1e-8)).sum(1) + (q1 * torch.log(p2 + 1e-8)).sum(1)).mean()
        # what the monitors may see (all optional): StepOutputs fields by name
        return {"loss": loss, "student_probs": torch.cat([p1, p2]).detach(),
                "teacher_targets": torch.cat([q2, q1]), "projections": z1.detach(), "labels": y}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"projections": self.project(x), "labels": y}  # -> a t-SNE frame per validation

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def speakers(n: int, num_spk: int = 32, in_dim: int = 40, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_spk, in_dim, generator=torch.Generator().manual_seed(1234)) * 2.0
    y = torch.randint(num_spk, (n,), generator=g)
    return torch.utils.data.TensorDataset(means[y] + torch.randn(n, in_dim, generator=g), y)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--exp-dir", default="runs/examples/lightning", help="W&B run and local records go here")
    args = ap.parse_args(argv)
    L.seed_everything(0, verbose=False)
    train = torch.utils.data.DataLoader(speakers(4096), batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(speakers(256, seed=1), batch_size=128)

    # ---- the one line: watch the prototypes of this module --------------------------------------
    monitor = PrototypeMonitorCallback("prototypes", exp_dir=args.exp_dir, log_every=10)

    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=min(100, args.steps), check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, default_root_dir=args.exp_dir, callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(SwAV(), train, val)
    codes = sorted({f.code for f in monitor.findings if f.severity != "info"})
    print(f"done: {trainer.global_step} steps, findings: {codes or 'none'}")


if __name__ == "__main__":
    main()
