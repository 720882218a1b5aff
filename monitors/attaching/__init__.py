"""``attach()``: the one line that puts the monitors on a foreign trainer. :func:`.api.attach`
resolves the prototypes and teacher (:mod:`.resolve`), builds the hub and its sinks, and returns
an :class:`~.attached_hub.AttachedHub` that drives the hub's step from PyTorch hooks on the
model and the optimizer; the automatic capture of projections and assignments lives in
:mod:`.capture`; the loop's GradScaler (unscaled gradients, skipped steps) is found and
followed by a part the hub owns (:mod:`.scaled_steps`)."""
from .api import attach

__all__ = ["attach"]
