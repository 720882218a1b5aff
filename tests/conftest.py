"""Shared fixtures: a micro SDPN configuration that trains in seconds on CPU, and a reader of
real W&B offline runs (``wandb leet inspect --json``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from monitors import Monitor

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One built-in micro corpus for the whole session."""
    return str(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def micro(data_cache, tmp_path) -> list[str]:
    """key=value overrides that shrink sdpn_tiny to a few seconds of training."""
    return [
        f"data_cache={data_cache}", "num_train_speakers=4", "num_eval_speakers=4",
        "utts_per_speaker=4", "utt_seconds=1.0", "channels=16", "scale=4", "embed_dim=32",
        "hidden_dim=32", "output_dim=16", "num_proto=16", "batch_size=8", "max_frames=40",
        "epochs=4", "warmup_epochs=1", "log_every=2", "ckpt_every=100", "progress=false",
        "threads=1", f"exp_dir={tmp_path / 'run'}",
        "monitors={tsne: {frame_every: 4, background: false}, norms: {}, gradients: {}, "
        "deltas: {}, usage: {}, similarity: {every_n_steps: 2}, evolution: {}, health: {}}",
    ]


@torch.no_grad()
def sinkhorn(scores: "torch.Tensor", iters: int = 3) -> "torch.Tensor":
    """Balanced targets for the foreign test loops: (N, K) non-negative scores -> (N, K) rows
    summing to 1 with uniform prototype marginals (Sinkhorn-Knopp, as SwAV/SDPN)."""
    q = scores.T / scores.sum()  # (K, N)
    k, n = q.shape
    for _ in range(iters):
        q = q / (q.sum(dim=1, keepdim=True) * k)
        q = q / (q.sum(dim=0, keepdim=True) * n)
    return (q * n).T


class RecordingSink:
    """A sink that keeps what the hub hands it, for unit tests of monitors (the real W&B sink is
    tested end to end)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.alerts: list[Any] = []
        self.summary: dict[str, Any] = {}
        self.closed = False

    def log_rows(self, rows) -> None:
        self.rows.extend(rows)

    def set_summary(self, values) -> None:
        self.summary.update(values)

    def alert(self, finding) -> None:
        self.alerts.append(finding)

    def close(self) -> None:
        self.closed = True

    def keys(self) -> set[str]:
        return {k for _, r in self.rows for k in r}


class Recorder(Monitor):
    """Records (event, step) of every hook call, and what the context held: the step outputs,
    the embeddings' shape and labels, the prototypes at train start."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__(1)
        self.events: list[tuple[str, int]] = []
        self.embeddings: list[tuple[tuple, Any]] = []
        self.outputs: list[Any] = []
        self.start_prototypes = None

    def _rec(self, event: str, ctx) -> None:
        self.events.append((event, ctx.step))

    def on_train_start(self, ctx):
        self._rec("on_train_start", ctx)
        self.start_prototypes = ctx.prototypes.detach().cpu().clone()

    def on_after_backward(self, ctx): self._rec("on_after_backward", ctx)
    def on_before_optimizer_step(self, ctx): self._rec("on_before_optimizer_step", ctx)
    def on_after_optimizer_step(self, ctx): self._rec("on_after_optimizer_step", ctx)

    def on_step_end(self, ctx):
        self._rec("on_step_end", ctx)
        self.outputs.append(ctx.outputs)

    def on_embeddings(self, ctx):
        self._rec("on_embeddings", ctx)
        self.embeddings.append((tuple(ctx.embeddings.shape), ctx.labels))

    def on_save_checkpoint(self, ctx): self._rec("on_save_checkpoint", ctx)
    def on_load_checkpoint(self, ctx): self._rec("on_load_checkpoint", ctx)
    def on_train_end(self, ctx): self._rec("on_train_end", ctx)


def wandb_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a real offline run, read back with ``wandb leet inspect --json``."""
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(exe), "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def wandb_summary(run_dir: str | Path) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(exe), "leet", "inspect", "--summary", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)["summary"]


def history_keys(records: list[dict[str, Any]]) -> set[str]:
    keys: set[str] = set()
    for r in records:
        if r.get("type") == "history":
            keys.update(r["history"]["item"].keys())
    return keys
