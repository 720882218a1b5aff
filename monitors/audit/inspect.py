"""Read a series of checkpoints one at a time and say what happened to the prototypes.

:func:`inspect_series` loads each file (safely, memory-mapped), finds the prototypes and a teacher
copy, takes the statistics of :mod:`monitors.audit.stats` per checkpoint and against the previous
one, keeps only what the next comparison needs (the previous and the first prototypes, digests of
the other tensors), and judges the series (:mod:`monitors.audit.judge`).
"""
from __future__ import annotations

import gc
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..core.finding import Finding
from .discovery import effective_weight, flatten, locate, model_tensors, optimizer_state_for
from .judge import judge
from ..formats.checkpoints import load_checkpoint
from .series import find_series, label_of
from .stats import changed, fingerprints, movement, relative_distance, table_stats

__all__ = ["Report", "inspect_series"]


@dataclass
class Report:
    """What ``inspect`` found: one row per checkpoint, the findings, the files left out."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoints": self.rows, "findings": [f.to_dict() for f in self.findings], "notes": self.notes}


def inspect_series(paths: Sequence[str | os.PathLike], *, key: Optional[str] = None, trust_pickle: bool = False,
                   dup_cosine: float = 0.99, dup_fraction: float = 0.1,
                   progress: Optional[Callable[[int, int, str], None]] = None) -> Report:
    """Inspect the checkpoints in ``paths`` (files, or directories of them) in series order.
    Raises FileNotFoundError, UnsafeCheckpointError (a file needs arbitrary pickle and
    ``trust_pickle`` is False), or ValueError (``key`` names no tensor: the message lists the 2-D
    tensors seen)."""
    files, notes = find_series(paths)
    report = Report(notes=notes)
    first: Optional[torch.Tensor] = None
    P: Optional[torch.Tensor] = None
    prev: Optional[torch.Tensor] = None
    prev_rest: Optional[dict[str, bytes]] = None
    prev_teacher: Optional[dict[str, bytes]] = None
    for i, f in enumerate(files):
        if progress is not None:
            progress(i, len(files), str(f.path))
        t0 = time.perf_counter()
        try:
            checkpoint = load_checkpoint(f.path, trust_pickle=trust_pickle, mmap=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # truncated, not a checkpoint
            report.notes.append(f"{f.path}: left out, it could not be read ({type(exc).__name__}; truncated?)")
            continue
        label, number = label_of(f, checkpoint, i)
        flat = flatten(checkpoint)
        where = locate(flat, key)
        if key is not None and where.student is None:
            shown = ", ".join(f"{p} {tuple(s)}" for p, s in where.candidates[:12]) or "none"
            raise ValueError(f"--key {key!r} names no 2-D tensor in {f.path}; its 2-D tensors: {shown}")
        row: dict[str, Any] = {"file": str(f.path), "label": label, "number": number,
                               "prototypes": where.student, "teacher": where.teacher}
        rest = model_tensors(flat, where, teacher=False)
        rest_fp = fingerprints(rest)
        teacher_fp = fingerprints(model_tensors(flat, where, teacher=True))
        rest_change = changed(rest_fp, prev_rest)
        teacher_change = changed(teacher_fp, prev_teacher)
        row["rest_tensors"] = len(rest_fp)
        row["rest_changed"] = None if rest_change is None else rest_change[0]
        row["teacher_tensors"] = len(teacher_fp)
        row["teacher_changed"] = None if teacher_change is None else teacher_change[0]
        if where.student is None:
            row["candidates"] = [[p, list(s)] for p, s in where.candidates[:20]]
            prev = None
        else:
            P = effective_weight(flat, where.student)  # (K, D) float32; a view of the mapped file when it can be
            row["shape"] = list(P.shape)
            row.update(table_stats(P, dup_cosine))
            row["optimizer_state"] = optimizer_state_for(flat, tuple(flat[where.student].shape), rest)
            if prev is not None and prev.shape == P.shape:
                row.update(movement(P, prev))
            if first is not None and first.shape == P.shape:
                row["drift"] = relative_distance(P, first)
            if where.teacher is not None:
                row["student_teacher"] = relative_distance(P, effective_weight(flat, where.teacher))
            # keep two (K, D) copies in all: the first checkpoint's and the previous one's (refilled in place)
            if prev is not None and prev is not first and prev.shape == P.shape:
                prev.copy_(P)
            else:
                prev = P.clone() if P.data_ptr() == flat[where.student].data_ptr() else P  # not a view of the file
            if first is None:
                first = prev
        prev_rest, prev_teacher = rest_fp, teacher_fp
        row["seconds"] = round(time.perf_counter() - t0, 3)
        report.rows.append(row)
        del checkpoint, flat, rest, where
        P = None  # a view of the mapped file: the mapping must go before the next file is mapped
        gc.collect()  # drop the file's mapping before the next one is mapped
    if progress is not None:
        progress(len(files), len(files), "")
    if not report.rows:
        raise ValueError(f"none of the {len(files)} checkpoint files could be read: {'; '.join(report.notes)}")
    report.findings = judge(report.rows, dup_cosine=dup_cosine, dup_fraction=dup_fraction)
    return report

