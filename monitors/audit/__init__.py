"""Audit of saved checkpoints (``python -m monitors inspect``): what the runs that already happened
did to their prototypes. This wing owns the series
reader (checkpoint files ordered by the step or epoch in their names, read one at a time), the
discovery of the prototypes (and a teacher copy) by name and shape in any trainer's layout, the
per-checkpoint and between-checkpoint statistics, the findings they lead to (the codes and
:class:`~monitors.core.finding.Finding` of a live run) and the output (a table, JSON, and the local
records plus an offline W&B run of an ``--exp-dir`` for the dashboard). Files are read with the safe
loader of :mod:`monitors.formats.checkpoints`. It imports torch, numpy, the core and the formats
of ``monitors``; never ``pipeline/``.
"""
from __future__ import annotations

from ..formats.checkpoints import UnsafeCheckpointError, load_checkpoint

__all__ = ["UnsafeCheckpointError", "load_checkpoint"]
