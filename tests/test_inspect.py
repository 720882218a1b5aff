"""``python -m monitors inspect`` over checkpoint series written by small loops shaped like the
trainers in use: 3D-Speaker's SDPN, WeSpeaker's DINO, facebookresearch/dino, Lightning, and this
project's own pipeline. Each acceptance case (prototypes never saved; saved but identical while
the backbone moved; a teacher that never moved; a healthy series) is asserted on the findings."""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, history_keys, wandb_records, wandb_summary
from monitors.__main__ import main as monitors_main
from monitors.audit.inspect import inspect_series

D_IN, D, K = 12, 16, 32


# ----------------------------------------------------------------------------------------------
# small networks and one loop
# ----------------------------------------------------------------------------------------------
class ProtoHead(nn.Module):
    """3D-Speaker-like: an MLP, then similarities to a ``prototypes`` parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D_IN, D), nn.GELU(), nn.Linear(D, D))
        self.prototypes = nn.Parameter(torch.empty(K, D).uniform_(-D ** -0.5, D ** -0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


class DINOHead(nn.Module):
    """A DINO head: MLP, L2-normalised bottleneck, weight-normalised ``last_layer`` (g fixed at 1)."""

    def __init__(self, parametrize: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D_IN, D), nn.GELU(), nn.Linear(D, D))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated; WeSpeaker uses it
            wn = nn.utils.parametrizations.weight_norm if parametrize else nn.utils.weight_norm
            self.last_layer = wn(nn.Linear(D, K, bias=False))
        g = self.last_layer.parametrizations.weight.original0 if parametrize else self.last_layer.weight_g
        g.data.fill_(1)
        g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class Net(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(D_IN, D_IN), nn.BatchNorm1d(D_IN), nn.ReLU())
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def train_epochs(student: nn.Module, teacher: Optional[nn.Module], optimizer: torch.optim.Optimizer, epochs: int,
                 save: Callable[[int], None], *, ema: bool = True, before_epoch: Callable[[int], None] = lambda e: None,
                 steps: int = 4) -> None:
    """A self-distillation loop: the student's assignments match the teacher's sharpened ones."""
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        before_epoch(epoch)
        for _ in range(steps):
            x = torch.randn(16, D_IN, generator=g)
            s = student(x + 0.1 * torch.randn(16, D_IN, generator=g))
            with torch.no_grad():
                t = (teacher or student)(x)
            loss = -(F.softmax(t / 0.04, dim=-1) * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if teacher is not None and ema:
                with torch.no_grad():
                    for pt, ps in zip(teacher.parameters(), student.parameters()):
                        pt.mul_(0.9).add_(ps.detach(), alpha=0.1)
        save(epoch)


def codes(report, severities=("warning", "error")) -> list[str]:
    return sorted(f.code for f in report.findings if f.severity in severities)


# ----------------------------------------------------------------------------------------------
# 3D-Speaker SDPN: checkpoint.pth and checkpoint<epoch:04>.pth with student, teacher, optimizer
# ----------------------------------------------------------------------------------------------
def sdpn_series(out: Path, *, save_prototypes: bool = True) -> None:
    torch.manual_seed(0)
    student = Net(ProtoHead())
    free = []
    if not save_prototypes:  # the original bug: a free tensor, outside every module's state_dict
        free = [student.head._parameters.pop("prototypes")]
        object.__setattr__(student.head, "prototypes", free[0])  # an attribute, not a registered parameter
    params = [*student.parameters(), *free]
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)

    def save(epoch: int) -> None:
        state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
                 "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "sdpn_loss": {"center": torch.zeros(1, K)}, "keleo_loss": {}}
        torch.save(state, out / "checkpoint.pth")
        torch.save(state, out / f"checkpoint{epoch:04}.pth")

    out.mkdir(parents=True, exist_ok=True)
    train_epochs(student, teacher, optimizer, 4, save)


def test_sdpn_series_healthy_finds_the_head_prototypes_and_the_teacher(tmp_path):
    sdpn_series(tmp_path)
    report = inspect_series([tmp_path])
    assert [r["label"] for r in report.rows] == ["epoch 0", "epoch 1", "epoch 2", "epoch 3"]
    assert any("checkpoint.pth: left out" in n for n in report.notes)  # the copy of the newest
    r = report.rows[-1]
    assert r["prototypes"] == "student/head.prototypes" and r["teacher"] == "teacher/head.prototypes"
    assert r["unchanged"] == 0.0 and r["delta_max"] > 0 and r["drift"] > 0
    assert r["rest_changed"] > 0 and r["teacher_changed"] > 0 and 0 < r["student_teacher"] < 1
    assert r["optimizer_state"] is True and r["shape"] == [K, D] and r["nonfinite"] == 0
    assert codes(report) == []


def test_sdpn_prototypes_never_saved_lists_the_candidates(tmp_path, capsys):
    sdpn_series(tmp_path, save_prototypes=False)
    assert monitors_main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "PROTO_NOT_IN_CHECKPOINT" in out and "none of the checkpoints hold the prototypes" in out
    assert "student/head.mlp.2.weight (16, 16)" in out and "--key" in out
    # the user names one of the listed tensors: it is inspected as the prototypes
    report = inspect_series([tmp_path], key="head.mlp.2.weight")
    assert report.rows[0]["prototypes"] == "student/head.mlp.2.weight"
    assert report.rows[0]["teacher"] == "teacher/head.mlp.2.weight"
    assert "PROTO_NOT_IN_CHECKPOINT" not in codes(report)
    with pytest.raises(ValueError, match="names no 2-D tensor.*student/head.mlp.2.weight"):
        inspect_series([tmp_path], key="nothing.here")
    with pytest.raises(ValueError, match="--key 'weight' matches 3 tensors .*name one of them in full"):
        inspect_series([tmp_path], key="weight")


# ----------------------------------------------------------------------------------------------
# WeSpeaker DINO: model_<epoch>.pt = {'model': s_model + t_model, 'optimizer'}, numpy float64 lr
# ----------------------------------------------------------------------------------------------
class WeSpeakerDINO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s_model = Net(DINOHead(parametrize=False))
        self.t_model = Net(DINOHead(parametrize=False)).requires_grad_(False)  # weight_norm cannot deepcopy
        self.t_model.load_state_dict(self.s_model.state_dict())


def wespeaker_series(out: Path, *, ema: bool) -> None:
    torch.manual_seed(0)
    model = WeSpeakerDINO()
    optimizer = torch.optim.SGD([p for p in model.s_model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    schedule = np.linspace(0.5, 0.1, 4)  # numpy schedules: the lr in the optimizer state is np.float64

    def before(epoch: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = schedule[epoch]

    def save(epoch: int) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / f"model_{epoch + 1}.pt")

    out.mkdir(parents=True, exist_ok=True)
    train_epochs(model.s_model, model.t_model, optimizer, 4, save, ema=ema, before_epoch=before)
    os.symlink("model_4.pt", out / "final_model.pt")


def test_wespeaker_series_with_numpy_lrs_loads_safely_and_is_healthy(tmp_path):
    wespeaker_series(tmp_path, ema=True)
    raw = torch.load(tmp_path / "model_2.pt", weights_only=False)
    assert isinstance(raw["optimizer"]["param_groups"][0]["lr"], np.float64)  # what plain weights_only refuses
    with pytest.raises(Exception, match="numpy"):
        torch.load(tmp_path / "model_2.pt", weights_only=True)
    report = inspect_series([tmp_path])
    assert [r["label"] for r in report.rows] == ["epoch 1", "epoch 2", "epoch 3", "epoch 4"]
    r = report.rows[-1]
    assert r["prototypes"] == "model/s_model.head.last_layer.weight_v"
    assert r["teacher"] == "model/t_model.head.last_layer.weight_v"
    assert r["norm_min"] == pytest.approx(1.0, abs=1e-5) and r["norm_max"] == pytest.approx(1.0, abs=1e-5)  # g = 1
    assert r["teacher_changed"] > 0 and r["optimizer_state"] is True
    assert codes(report) == []


def test_wespeaker_teacher_that_never_moved(tmp_path):
    wespeaker_series(tmp_path, ema=False)
    report = inspect_series([tmp_path])
    found = [f for f in report.findings if f.code == "TEACHER_NOT_UPDATING"]
    assert len(found) == 1 and found[0].severity == "warning" and found[0].step == 4
    assert "the teacher has not changed from epoch 1 to epoch 4 (4 checkpoints) while the student trained" \
        in found[0].message
    assert codes(report) == ["TEACHER_NOT_UPDATING"]


# ----------------------------------------------------------------------------------------------
# facebookresearch/dino: checkpoint.pth, checkpoint<epoch:04>.pth; DDP 'module.' keys; args
# ----------------------------------------------------------------------------------------------
def dino_series(out: Path, *, freeze_from: Optional[int]) -> None:
    torch.manual_seed(0)
    student = Net(DINOHead(parametrize=True))
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    args = argparse.Namespace(arch="tiny", out_dim=K, freeze_last_layer=1, lr=np.float64(1e-2))
    last = student.head.last_layer.parametrizations.weight.original1

    def before(epoch: int) -> None:
        if freeze_from is not None and epoch >= freeze_from:
            last.requires_grad_(False)  # a late freeze nobody meant: AdamW skips a None grad
            last.grad = None

    def save(epoch: int) -> None:
        state = {"student": {f"module.{k}": v for k, v in student.state_dict().items()},  # DDP-wrapped
                 "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "args": args, "dino_loss": {"center": torch.randn(1, K)}}
        torch.save(state, out / "checkpoint.pth")
        torch.save(state, out / f"checkpoint{epoch:04}.pth")

    out.mkdir(parents=True, exist_ok=True)
    train_epochs(student, teacher, optimizer, 6, save, before_epoch=before)


def test_dino_prototypes_identical_while_the_backbone_moved(tmp_path):
    dino_series(tmp_path, freeze_from=3)
    report = inspect_series([tmp_path])
    r = report.rows[-1]
    assert r["prototypes"] == "student/module.head.last_layer.parametrizations.weight.original1"
    assert r["teacher"] == "teacher/head.last_layer.parametrizations.weight.original1"
    assert [x.get("unchanged") for x in report.rows] == [None, 0.0, 0.0, 1.0, 1.0, 1.0]
    found = [f for f in report.findings if f.code == "PROTO_NOT_UPDATING"]
    assert len(found) == 1 and found[0].severity == "error" and found[0].step == 5
    assert found[0].message.startswith("the prototypes are identical from epoch 2 to epoch 5 (4 checkpoints) "
                                       "while the rest of the model moved")
    assert "error" in {f.severity for f in report.findings}


def test_dino_healthy_and_args_namespace_loads(tmp_path, capsys):
    dino_series(tmp_path, freeze_from=None)
    assert monitors_main(["inspect", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [f for f in out["findings"] if f["severity"] != "info"] == []
    assert len(out["checkpoints"]) == 6 and out["checkpoints"][-1]["student_teacher"] > 0


def test_a_file_passed_by_name_and_mtime_order(tmp_path):
    dino_series(tmp_path, freeze_from=None)
    a, b = tmp_path / "x.pth", tmp_path / "y.pth"  # no numbers: ordered by modification time
    b.write_bytes((tmp_path / "checkpoint0000.pth").read_bytes())
    a.write_bytes((tmp_path / "checkpoint0005.pth").read_bytes())
    os.utime(b, (time.time() - 100, time.time() - 100))
    report = inspect_series([a, b])
    assert [Path(r["file"]).name for r in report.rows] == ["y.pth", "x.pth"]
    assert report.rows[1]["unchanged"] == 0.0


# ----------------------------------------------------------------------------------------------
# Lightning: epoch=E-step=S.ckpt in Lightning's layout, SwAV-like prototypes.weight, last.ckpt
# ----------------------------------------------------------------------------------------------
def test_lightning_ckpt_series_swav_prototypes_healthy(tmp_path):
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(D_IN, D), nn.ReLU())
    model.prototypes = nn.Linear(D, K, bias=False)
    net = nn.Sequential(model.backbone, model.prototypes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def save(epoch: int) -> None:
        step = 4 * (epoch + 1)
        ckpt = {"epoch": epoch, "global_step": step, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": epoch}}}},
                "callbacks": {}, "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                "hparams_name": "kwargs", "hyper_parameters": {"lr": 1e-2, "num_proto": K}}
        torch.save(ckpt, tmp_path / f"epoch={epoch}-step={step}.ckpt")
        torch.save(ckpt, tmp_path / "last.ckpt")

    train_epochs(net, None, optimizer, 3, save)
    report = inspect_series([tmp_path])
    assert [r["label"] for r in report.rows] == ["step 4", "step 8", "step 12"]
    assert report.rows[-1]["prototypes"] == "state_dict/model.prototypes.weight"
    assert report.rows[-1]["teacher"] is None and report.rows[-1]["optimizer_state"] is True
    assert report.rows[-1]["rest_changed"] == 2 and codes(report) == []


# ----------------------------------------------------------------------------------------------
# this project's pipeline
# ----------------------------------------------------------------------------------------------
def _pipeline_run(micro, extra: list[str]) -> Path:
    from pipeline.config import load_config
    from pipeline.train import train

    cfg = load_config(ROOT / "experiments/sdpn_tiny.yaml",
                      micro + ["max_steps=8", "ckpt_every=2", "keep_checkpoints=10", "eval_data=",
                               "eval_at_init=false", "monitors=none", "wandb_mode=disabled", *extra])
    train(cfg)
    return Path(cfg.exp_dir)


def test_pipeline_series_healthy_with_its_freeze_as_info(micro, tmp_path):
    exp = _pipeline_run(micro, [])
    report = inspect_series([exp])
    assert [r["label"] for r in report.rows] == ["step 0", "step 2", "step 4", "step 6", "step 8"]
    assert report.rows[-1]["prototypes"] == "prototypes" and report.rows[-1]["teacher"] is None
    assert codes(report) == []
    # freeze_last_layer holds them for the first epoch (2 steps here): info, then they move
    assert [(f.code, f.severity) for f in report.findings] == [("PROTO_NOT_UPDATING", "info")]
    # and through --exp-dir: local records, an offline W&B run, and a dashboard with the curves
    out = tmp_path / "audit"
    assert monitors_main(["inspect", str(exp), "--exp-dir", str(out), "--quiet"]) == 0
    from monitors.formats.records import read_metrics

    metrics = read_metrics(out / "records")
    assert [s for s, _ in metrics["proto/norm/mean"]] == [0, 2, 4, 6, 8]
    assert [s for s, _ in metrics["proto/delta/drift"]] == [2, 4, 6, 8]
    run_dir = next((out / "wandb").glob("offline-run-*"))
    assert {"proto/norm/mean", "proto/delta/drift", "trainer/step"} <= history_keys(wandb_records(run_dir))
    summary = wandb_summary(run_dir)
    assert summary["health/errors"] == 0 and summary["inspect/checkpoints"] == 5
    assert monitors_main(["dashboard", str(out)]) == 0
    html = (out / "dashboard.html").read_text()
    assert "proto/delta/drift" in html and "<svg" in html


def test_pipeline_bugs_not_in_checkpoint_and_no_ema(micro):
    report = inspect_series([_pipeline_run(micro, ["bug_proto_not_in_checkpoint=true"])])
    assert codes(report) == ["PROTO_NOT_IN_CHECKPOINT"]
    msg = next(f.message for f in report.findings if f.code == "PROTO_NOT_IN_CHECKPOINT")
    assert "student/head.mlp" in msg and "--key" in msg


def test_pipeline_teacher_without_ema(micro):
    report = inspect_series([_pipeline_run(micro, ["bug_no_ema=true"])])
    assert codes(report) == ["TEACHER_NOT_UPDATING"]


# ----------------------------------------------------------------------------------------------
# statistics: non-finite values, duplicates, sampling at large K
# ----------------------------------------------------------------------------------------------
def test_nonfinite_and_duplicates_and_sampling(tmp_path):
    torch.manual_seed(0)
    P = torch.randn(20000, 8)
    torch.save({"model": {"head.prototypes": P, "fc.weight": torch.randn(8, 8)}, "step": 1}, tmp_path / "ckpt-1.pt")
    dup = P.clone()
    dup[: 4000] = dup[4000: 8000]  # 40% of the rows duplicated
    dup[5, 3] = float("nan")
    torch.save({"model": {"head.prototypes": dup, "fc.weight": torch.randn(8, 8)}, "step": 2}, tmp_path / "ckpt-2.pt")
    report = inspect_series([tmp_path])
    r0, r1 = report.rows
    assert r0["sampled"] and r0["dup_rows"] == 4096 and r0["duplicates"] == 0 and r0["max_cosine"] < 0.99
    assert r1["nonfinite"] == 1 and r1["duplicates"] > 0
    assert codes(report) == ["PROTO_DUPLICATES", "PROTO_NONFINITE"]
    msg = next(f.message for f in report.findings if f.code == "PROTO_NONFINITE")
    assert "in step 2 (1 values)" in msg and "resume from step 1" in msg
    assert "of a 4,096-row sample" in next(f.message for f in report.findings if f.code == "PROTO_DUPLICATES")


def test_bad_input_is_one_line(tmp_path, capsys):
    assert monitors_main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert monitors_main(["inspect", str(tmp_path)]) == 2
    assert "no checkpoint files" in capsys.readouterr().err


def test_truncated_file_left_out_and_a_pickled_module_with_trust_pickle(tmp_path, capsys):
    torch.manual_seed(0)
    net = Net(ProtoHead())
    torch.save({"model": net.state_dict(), "step": 1}, tmp_path / "ckpt-1.pt")
    with torch.no_grad():
        net.head.prototypes.add_(0.1)
    torch.save({"model": net.state_dict(), "step": 2}, tmp_path / "ckpt-2.pt")
    data = (tmp_path / "ckpt-2.pt").read_bytes()
    (tmp_path / "ckpt-3.pt").write_bytes(data[: len(data) // 2])  # killed while writing
    report = inspect_series([tmp_path])
    assert [r["label"] for r in report.rows] == ["step 1", "step 2"]
    assert any("ckpt-3.pt: left out, it could not be read" in n for n in report.notes)
    with pytest.raises(ValueError, match="none of the 1 checkpoint files could be read"):
        inspect_series([tmp_path / "ckpt-3.pt"])
    # torch.save(model): a whole pickled module needs --trust-pickle, and is then read like its state_dict
    torch.save(net, tmp_path / "whole.pt")
    assert monitors_main(["inspect", str(tmp_path / "whole.pt")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert monitors_main(["inspect", str(tmp_path / "whole.pt"), "--trust-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"][0]["prototypes"] == "head.prototypes"


def test_exp_dir_with_records_is_refused(tmp_path, capsys):
    torch.save({"model": {"prototypes": torch.randn(4, 3)}, "step": 1}, tmp_path / "ckpt-1.pt")
    (tmp_path / "out" / "records").mkdir(parents=True)
    (tmp_path / "out" / "records" / "metrics.jsonl").write_text('{"trainer/step": 0}\n')
    assert monitors_main(["inspect", str(tmp_path / "ckpt-1.pt"), "--exp-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "already holds records" in err and "pass a new directory" in err
    assert (tmp_path / "out" / "records" / "metrics.jsonl").read_text() == '{"trainer/step": 0}\n'


def test_checkpoints_written_by_lightnings_trainer(tmp_path):
    """The same through Lightning itself (ModelCheckpoint every epoch, save_last): its files load
    with weights_only=True and the allowlist, and last.ckpt is left out."""
    pl = pytest.importorskip("lightning.pytorch")

    class SwAVLike(pl.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.backbone = nn.Sequential(nn.Linear(D_IN, D), nn.ReLU())
            self.prototypes = nn.Linear(D, K, bias=False)

        def training_step(self, batch, batch_idx):
            s = self.prototypes(F.normalize(self.backbone(batch[0]), dim=-1))
            t = F.softmax(s.detach() / 0.05, dim=-1)
            return -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, D_IN)), batch_size=16)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=3, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu").fit(SwAVLike(), data)
    report = inspect_series([tmp_path])
    assert [r["label"] for r in report.rows] == ["step 4", "step 8", "step 12"]
    assert any("last.ckpt: left out" in n for n in report.notes)
    assert report.rows[-1]["prototypes"] == "state_dict/prototypes.weight"
    assert report.rows[-1]["unchanged"] == 0.0 and report.rows[-1]["optimizer_state"] is True
    assert codes(report) == []
