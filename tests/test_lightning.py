"""PrototypeMonitorCallback on a tiny SwAV-style LightningModule (CPU): the same faults as the
plain loop, and the callback's state round-trips through a Lightning checkpoint."""
from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from monitors.integrations.lightning import PrototypeMonitorCallback  # noqa: E402
from conftest import RecordingSink as RecSink, Recorder, sinkhorn

K, D, IN, B = 16, 8, 12, 32


class SwAVLike(L.LightningModule):
    """A backbone, an nn.Linear prototype layer, swapped-assignment-style targets."""

    def __init__(self, proto_in_optimizer: bool = True, identical: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, 32), nn.GELU(), nn.Linear(32, D))
        self.prototypes = nn.Linear(D, K, bias=False)
        self.proto_in_optimizer = proto_in_optimizer
        self.identical = identical

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.identical:
            x = torch.ones_like(x)
        noise = 0.0 if self.identical else 0.1 * torch.randn_like(x)
        z = F.normalize(self.backbone(x + noise), dim=-1)                 # (B, D)
        p = torch.softmax(self.prototypes(z) / 0.1, dim=-1)               # (B, K)
        with torch.no_grad():
            s = self.prototypes(F.normalize(self.backbone(x), dim=-1)) / 0.05
            q = sinkhorn(torch.exp(s - s.max()))
        loss = -(q * torch.log(p + 1e-8)).sum(1).mean()
        return {"loss": loss, "student_probs": p.detach(), "teacher_targets": q, "projections": z.detach(),
                "labels": y, "entropy": -(p * torch.log(p + 1e-8)).sum(1).mean().detach()}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"projections": F.normalize(self.backbone(x), dim=-1), "labels": y}

    def configure_optimizers(self):
        params = self.parameters() if self.proto_in_optimizer else self.backbone.parameters()
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def loader(n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(8, IN, generator=g) * 2
    y = torch.randint(8, (n,), generator=g)
    x = means[y] + torch.randn(n, IN, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=B)


def fit(model, callbacks, max_steps: int = 30, ckpt_path=None, val: bool = False, root=None, **kw: Any):
    kw.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=2 if val else 0, default_root_dir=root, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and logging
        trainer.fit(model, loader(), loader(64, seed=1) if val else None, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def callback(**kw: Any) -> PrototypeMonitorCallback:
    kw.setdefault("tsne", {"background": False})
    return PrototypeMonitorCallback("prototypes", run=False, sinks=[RecSink()], console=False, log_every=5, **kw)


def bad_codes(cb) -> set[str]:
    return {f.code for f in cb.findings if f.severity in ("warning", "error")}


def test_healthy_module_raises_nothing_and_events_are_in_order(tmp_path):
    rec = Recorder()
    cb = callback(monitors=["default", rec])
    fit(SwAVLike(), [cb], max_steps=12, val=True, val_check_interval=6, root=tmp_path)
    assert bad_codes(cb) == set(), [str(f) for f in cb.findings]
    assert cb.hub.ctx.prototypes is cb.hub.ctx.model.prototypes.weight
    step = ["on_after_backward", "on_before_optimizer_step", "on_after_optimizer_step", "on_step_end"]
    events = [e for e in rec.events if e[0] != "on_embeddings"]
    assert events == [("on_train_start", 0)] + [(e, s) for s in range(12) for e in step] + [("on_train_end", 12)]
    # validation outputs -> on_embeddings after each validation epoch
    assert [e for e in rec.events if e[0] == "on_embeddings"] == [("on_embeddings", 6)]
    assert rec.embeddings[0][0] == (2 * B, D) and len(rec.embeddings[0][1]) == 2 * B
    keys = {k for _, r in cb.hub.sinks[0].rows for k in r}
    assert {"proto/norm/mean", "proto/usage/entropy_teacher", "proto/grad/norm"} <= keys


def test_prototypes_not_in_optimizer():
    cb = callback()
    fit(SwAVLike(proto_in_optimizer=False), [cb])
    assert {"PROTO_NOT_IN_OPTIMIZER", "PROTO_NOT_UPDATING"} <= bad_codes(cb)


def test_collapse():
    cb = callback()
    fit(SwAVLike(identical=True), [cb], max_steps=15)
    assert "PROTO_COLLAPSE" in bad_codes(cb)


class NonLeafPrototypes(SwAVLike):
    """The original SDPN's trap inside Lightning: a Parameter copied by .to(), a non-leaf."""

    def __init__(self) -> None:
        super().__init__()
        del self.prototypes
        self.prototypes = nn.Parameter(torch.randn(K, D)).to("cpu", copy=True)   # (K, D) non-leaf

    def training_step(self, batch, batch_idx):
        x, _ = batch
        z = F.normalize(self.backbone(x + 0.1 * torch.randn_like(x)), dim=-1)
        p = torch.softmax(z @ F.normalize(self.prototypes, dim=-1).T / 0.1, dim=-1)
        with torch.no_grad():
            s = F.normalize(self.backbone(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T / 0.05
            q = sinkhorn(torch.exp(s - s.max()))
        return -(q * torch.log(p + 1e-8)).sum(1).mean()


class WarmupFromZero(SwAVLike):
    """Every group's lr is 0 for the first 8 steps: an intended freeze, info only."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s < 8 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_non_leaf_prototypes():
    cb = callback()
    fit(NonLeafPrototypes(), [cb], max_steps=10)
    assert "PROTO_NOT_LEAF" in bad_codes(cb)


def test_intentional_lr_zero_warmup_is_info_only():
    cb = callback()
    fit(WarmupFromZero(), [cb], max_steps=30)
    assert bad_codes(cb) == set(), [str(f) for f in cb.findings]
    assert "PROTO_LR_ZERO" in {f.code for f in cb.findings if f.severity == "info"}


def test_gradient_accumulation_one_event_per_optimizer_step():
    rec = Recorder()
    cb = callback(monitors=[rec])
    fit(SwAVLike(), [cb], max_steps=3, accumulate_grad_batches=2)
    names = [e for e, _ in rec.events]
    assert names.count("on_after_backward") == 3 and names.count("on_step_end") == 3
    assert [s for e, s in rec.events if e == "on_step_end"] == [0, 1, 2]


def test_state_round_trips_through_a_lightning_checkpoint(tmp_path):
    cb = callback(monitors=["health", "usage", "deltas"])
    trainer = fit(SwAVLike(), [cb], max_steps=10, root=tmp_path)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)  # after fit: the closed hub still answers state_dict()
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt["callbacks"][cb.state_key]
    assert state["step"] == 10 and state["monitors"]["usage"]["steps_seen"] == 10
    rec = Recorder()
    cb2 = callback(monitors=["health", "usage", "deltas", rec])
    fit(SwAVLike(), [cb2], max_steps=15, ckpt_path=str(path), root=tmp_path)
    assert cb2.hub.get("usage").steps_seen == 15  # the counter continued
    assert rec.events[:2] == [("on_load_checkpoint", 10), ("on_train_start", 10)]
    assert [s for e, s in rec.events if e == "on_step_end"] == list(range(10, 15))
    assert bad_codes(cb2) == set(), [str(f) for f in cb2.findings]  # prototypes restored from the ckpt


class FreeProtos(SwAVLike):
    """SDPN's checkpoint bug: the prototypes are a bare tensor attribute, trained but not in the
    module's state_dict, so Lightning's checkpoints do not hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.free = torch.empty(K, D).uniform_(-0.3, 0.3).requires_grad_(True)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        z = F.normalize(self.backbone(x + 0.1 * torch.randn_like(x)), dim=-1)
        p = torch.softmax(z @ F.normalize(self.free, dim=-1).T / 0.1, dim=-1)
        with torch.no_grad():
            s = F.normalize(self.backbone(x), dim=-1) @ F.normalize(self.free, dim=-1).T / 0.05
            q = sinkhorn(torch.exp(s - s.max()))
        return -(q * torch.log(p + 1e-8)).sum(1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.backbone.parameters()}, {"params": [self.free]}], lr=0.1)


def test_checkpoint_without_prototypes_is_reported(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    rec = Recorder()
    cb = PrototypeMonitorCallback("free", monitors=["health", rec], run=False, console=False)
    fit(FreeProtos(), [cb, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)], max_steps=6,
        enable_checkpointing=True)
    assert bad_codes(cb) == {"PROTO_NOT_IN_CHECKPOINT"}, [str(f) for f in cb.findings]
    assert ("on_save_checkpoint", 3) in rec.events
    # the same check on a file, after the run
    ckpt = next(tmp_path.glob("*.ckpt"))
    assert [f.code for f in cb.hub.check_checkpoint(str(ckpt))] == ["PROTO_NOT_IN_CHECKPOINT"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown option 'log_evry'"):
        PrototypeMonitorCallback("prototypes", log_evry=3)
    with pytest.raises(TypeError, match="attribute path"):
        PrototypeMonitorCallback(torch.randn(K, D))


class Logging(SwAVLike):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train_loss", out["loss"])
        return out


def test_shared_wandb_logger_run_keeps_its_own_step_axis(tmp_path):
    """With a WandbLogger the callback writes into the logger's run (real W&B, offline, read back):
    the monitors' metrics go on trainer/step, the user's own keep Lightning's axis."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from conftest import history_keys, wandb_records

    logger = WandbLogger(project="protowatch-test", save_dir=str(tmp_path), offline=True)
    cb = PrototypeMonitorCallback("prototypes", console=False, log_every=5, tsne={"background": False})
    trainer = L.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=logger, callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Logging(), loader())
    run_dir = next((tmp_path / "wandb").glob(f"offline-run-*-{logger.experiment.id}"))
    logger.experiment.finish()
    records = wandb_records(run_dir)
    axes = {(m.get("glob_name") or m.get("name")): m.get("step_metric")
            for m in (r["metric"] for r in records if r.get("type") == "metric")}
    assert axes["*"] == "trainer/global_step", axes          # Lightning's own definition stands
    for glob in ("proto/*", "health/*", "perf/*", "grad/*"):
        assert axes[glob] == "trainer/step", axes
    keys = history_keys(records)
    assert {"train_loss", "trainer/global_step", "proto/norm/mean", "trainer/step"} <= keys
    assert bad_codes(cb) == set()


# -- teacher= and freeze_steps through the callback (issue 11) --------------------------------------
class WithTeacher(SwAVLike):
    """A student and an EMA teacher in one LightningModule (DINO-style), found by attribute path."""

    def __init__(self, ema: bool = True, alias: bool = False, freeze: int = 0) -> None:
        super().__init__()
        import copy

        self.student = nn.Sequential(self.backbone, nn.Linear(D, D))
        self.teacher = self.student if alias else copy.deepcopy(self.student).requires_grad_(False)
        self.ema, self.freeze = ema, freeze

    def on_after_backward(self):
        if self.global_step < self.freeze:  # the student's prototype layer, by name
            for n, p in self.named_parameters():
                if n.startswith("prototypes"):
                    p.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema and self.teacher is not self.student:
            with torch.no_grad():
                for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                    t.mul_(0.99).add_(s.detach(), alpha=0.01)


@pytest.mark.parametrize("kind, expected", [
    ("healthy", set()), ("healthy_freeze", set()),
    ("no_ema", {"TEACHER_NOT_UPDATING"}), ("alias", {"TEACHER_SHARES_STUDENT"}),
])
def test_callback_teacher_path_and_freeze(kind, expected):
    model = WithTeacher(ema=kind != "no_ema", alias=kind == "alias", freeze=6 if kind == "healthy_freeze" else 0)
    cb = callback(teacher="teacher", freeze_steps=6 if kind == "healthy_freeze" else 0)
    fit(model, [cb], max_steps=20)
    assert cb.hub.ctx.teacher is model.teacher
    assert bad_codes(cb) == expected, [str(f) for f in cb.findings]
