"""The findings of a checkpoint series, with the codes, severities and wording of a live run's:
``PROTO_NOT_IN_CHECKPOINT``, ``PROTO_NONFINITE``, ``PROTO_NOT_UPDATING`` (identical across
checkpoints while the rest of the model moved), ``TEACHER_NOT_UPDATING``, ``PROTO_DUPLICATES``,
``PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT``. Info, as in a live run, for what is not a fault:
prototypes still at the start of the series and moving later (an intended freeze, such as
``freeze_last_layer``), or a stretch where nothing in the model moved (the run did not train)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from ..core.codes import (PROTO_DUPLICATES, PROTO_NONFINITE, PROTO_NOT_IN_CHECKPOINT, PROTO_NOT_UPDATING,
                     PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT, TEACHER_NOT_UPDATING, fix_of)
from ..core.finding import Finding
from ..health.trainer_checks import EMA_NOT_APPLIED

__all__ = ["judge"]

Row = dict[str, Any]


def _runs(rows: Sequence[Row], same: Callable[[Row], bool]) -> list[tuple[int, int]]:
    """(first, last) checkpoint indices of each maximal stretch over which ``same(row)`` held for
    every checkpoint after the first (``same`` compares a row with its predecessor)."""
    out, start = [], None
    for i in range(1, len(rows) + 1):
        if i < len(rows) and same(rows[i]):
            start = i - 1 if start is None else start
        elif start is not None:
            out.append((start, i - 1))
            start = None
    return out


def _span(rows: Sequence[Row], a: int, b: int) -> str:
    return f"from {rows[a]['label']} to {rows[b]['label']} ({b - a + 1} checkpoints)"


def judge(rows: Sequence[Row], *, dup_cosine: float = 0.99, dup_fraction: float = 0.1) -> list[Finding]:
    """The findings of the rows :func:`monitors.audit.inspect.inspect_series` took."""
    out: list[Finding] = []
    missing = [r for r in rows if r.get("prototypes") is None]
    if missing:
        r = missing[0]
        shown = ", ".join(f"{p} {tuple(s)}" for p, s in r.get("candidates", [])[:12]) or "none"
        which = "none of the checkpoints" if len(missing) == len(rows) else \
            f"{len(missing)} of the {len(rows)} checkpoints (first: {r['label']})"
        out.append(Finding(PROTO_NOT_IN_CHECKPOINT, "error", r["number"], (
            f"{which} hold the prototypes (no tensor named prototypes, prototypes.weight, last_layer.weight, "
            f"weight_v/weight_g or parametrizations.weight.original0/1): a resumed run would restart them "
            f"from random. The 2-D tensors in {r['file']}: {shown}; if one of them is the prototypes, "
            f"pass --key NAME. Fix: {fix_of(PROTO_NOT_IN_CHECKPOINT)}.")))
    bad = [r for r in rows if r.get("nonfinite")]
    if bad:
        r = bad[0]
        good = [g for g in rows[: rows.index(r)] if g.get("prototypes") and not g.get("nonfinite")]
        back = f"resume from {good[-1]['label']} ({good[-1]['file']})" if good else "no earlier checkpoint is finite"
        out.append(Finding(PROTO_NONFINITE, "error", r["number"], (
            f"the prototypes hold NaN/Inf in {r['label']} ({r['nonfinite']} values): training of the "
            f"prototypes is lost from there on; {back}. Fix: {fix_of(PROTO_NONFINITE)}.")))
    for a, b in _runs(rows, lambda r: r.get("unchanged") == 1.0):
        moved = [r["rest_changed"] for r in rows[a + 1: b + 1] if r.get("rest_changed") is not None]
        if any(moved) and a == 0 and b < len(rows) - 1:  # still at the start, moving after: a freeze
            out.append(Finding(PROTO_NOT_UPDATING, "info", rows[b]["number"], (
                f"the prototypes are identical {_span(rows, a, b)} while the rest of the model moved, and "
                f"move after {rows[b]['label']}: an intended freeze at the start (freeze_last_layer, a "
                "warm-up with lr 0) looks like this.")))
        elif any(moved):
            out.append(Finding(PROTO_NOT_UPDATING, "error", rows[b]["number"], (
                f"the prototypes are identical {_span(rows, a, b)} while the rest of the model moved "
                f"({max(moved)} of {rows[b]['rest_tensors']} tensors changed): the optimizer that steps "
                f"does not update them. Fix: {fix_of(PROTO_NOT_UPDATING)}.")))
        elif moved:
            out.append(Finding(PROTO_NOT_UPDATING, "info", rows[b]["number"], (
                f"nothing in the model changed {_span(rows, a, b)}: the run did not train between these "
                "checkpoints (or they are copies of one another); the prototypes are not singled out.")))
        else:
            out.append(Finding(PROTO_NOT_UPDATING, "info", rows[b]["number"], (
                f"the prototypes are identical {_span(rows, a, b)}; the checkpoints hold no other model "
                "tensors to tell a frozen prototype table from a run that did not train.")))

    def student_moved(r: Row) -> bool:
        return bool(r.get("rest_changed")) or (r.get("unchanged") is not None and r["unchanged"] < 1.0)

    for a, b in _runs(rows, lambda r: r.get("teacher_tensors", 0) > 0 and r.get("teacher_changed") == 0):
        if any(student_moved(r) for r in rows[a + 1: b + 1]):
            out.append(Finding(TEACHER_NOT_UPDATING, "warning", rows[b]["number"], (
                f"the teacher has not changed {_span(rows, a, b)} while the student trained: {EMA_NOT_APPLIED}")))
    dups = [r for r in rows if r.get("dup_rows") and r["duplicates"] / r["dup_rows"] > dup_fraction]
    if dups:
        r = dups[0]
        of = f" (of a {r['dup_rows']:,}-row sample)" if r.get("sampled") else ""
        out.append(Finding(PROTO_DUPLICATES, "warning", r["number"], (
            f"{100 * r['duplicates'] / r['dup_rows']:.0f}% of the prototypes{of} have a near-duplicate (cosine > "
            f"{dup_cosine}) at {r['label']}: they waste capacity. Fix: {fix_of(PROTO_DUPLICATES)}.")))
    last = next((r for r in reversed(rows) if r.get("prototypes") is not None), None)
    if last is not None and last.get("optimizer_state") is False:
        out.append(Finding(PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT, "warning", last["number"], (
            f"the saved optimizer state in {last['label']} holds momentum / moments for other parameters but "
            f"none of the prototypes' shape {tuple(last['shape'])}: they are not in the optimizer, or their "
            f"state was not saved, so a resumed run restarts it. Fix: "
            f"{fix_of(PROTO_OPTIMIZER_STATE_NOT_IN_CHECKPOINT)}.")))
    return out
