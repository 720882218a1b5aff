"""Audit of saved checkpoints (``python -m monitors inspect``): what the runs that already happened
did to their prototypes. This wing owns the safe checkpoint loader that every ``torch.load`` of the
project goes through (``weights_only=True`` plus an explicit allowlist of plain types, and a
one-line error naming ``--trust-pickle`` for a file that would need arbitrary pickle), the series
reader (checkpoint files ordered by the step or epoch in their names, read one at a time), the
discovery of the prototypes (and a teacher copy) by name and shape in any trainer's layout, the
per-checkpoint and between-checkpoint statistics, the findings they lead to (the codes and
:class:`~monitors.finding.Finding` of a live run) and the output (a table, JSON, and the local
records plus an offline W&B run of an ``--exp-dir`` for the dashboard). It imports torch, numpy and
the core of ``monitors`` (codes, finding, records, sinks); never ``pipeline/``.
"""
from __future__ import annotations

from .loading import UnsafeCheckpointError, load_checkpoint

__all__ = ["UnsafeCheckpointError", "load_checkpoint"]
