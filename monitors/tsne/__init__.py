"""t-SNE of the prototypes against speaker embeddings: the monitor that samples them in training
(:mod:`.monitor`), the frame it asks for (:mod:`.frame`) and the niced background process that
computes frames while training goes on (:mod:`.worker`)."""
from .monitor import TSNEMonitor

__all__ = ["TSNEMonitor"]
