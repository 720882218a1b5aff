"""The Monitor base class: one no-op method per event, state that resumes."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .events import EVENTS, EXTRA_HOOKS, RunContext
from .finding import Finding
from .options import positive_int

#: What a hook returns: metric name -> value (0-dim tensor on any device, number, or media).
Metrics = Optional[Mapping[str, Any]]


class Monitor:
    """Base class of all monitors.

    Subclasses override only the hooks they need. A hook returns a dict of metrics (0-dim
    tensors may stay on the device: the hub moves them to the host at the log interval) or
    None, and reports diagnoses with :meth:`report`. Per-step hooks must not synchronise with
    the device (no ``.item()``, ``.tolist()``, ``bool(tensor)``); :meth:`on_log` is the one place
    where reading device values is allowed.
    """

    #: name used in configs and as the key of this monitor's state in checkpoints
    name: str = "monitor"
    #: run the per-step hooks every n optimizer steps (other events always run)
    every_n_steps: int = 1
    #: every metric name this monitor can log, as literals (``<group>`` marks a part that comes
    #: from the run); the README's metric table is checked against these (tests/test_readme_tables.py)
    metrics: tuple[str, ...] = ()

    def __init__(self, every_n_steps: Optional[int] = None) -> None:
        if every_n_steps is not None:
            self.every_n_steps = positive_int(type(self).__name__, "every_n_steps", every_n_steps)
        self._pending_findings: list[tuple[Finding, Any]] = []

    # -- findings ---------------------------------------------------------------------------
    def report(self, ctx: RunContext, code: str, severity: str, message: str, key: Any = None) -> None:
        """Report a finding at the current step. It is reported once per ``code`` and ``key``
        (default: the severity, so an ``info`` may still be followed by an ``error`` of the same
        code): the hub collects it after the hook returns and drops repeats, its one
        deduplication (:meth:`MonitorHub.report <monitors.core.hub.MonitorHub.report>`)."""
        self._pending_findings.append((Finding(code, severity, int(ctx.step), message), key))

    def pop_findings(self) -> list[Finding]:
        """The findings reported since the last call (repeats not yet dropped)."""
        return [f for f, _ in self.pop_reports()]

    def pop_reports(self) -> list[tuple[Finding, Any]]:
        """The (finding, key) pairs reported since the last call: what the hub collects."""
        out, self._pending_findings = self._pending_findings, []
        return out

    # -- state ------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self.name

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this monitor's curves after a resume."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def close(self) -> Any:
        """Finish background work (called by the hub on close). May return metrics, logged at
        the last flushed step, or a list of (step, metrics) pairs, each logged at its step."""

    # -- hooks (no-ops) ---------------------------------------------------------------------
    def on_train_start(self, ctx: RunContext) -> Metrics:
        """Called once before the first step."""

    def on_after_backward(self, ctx: RunContext) -> Metrics:
        """Called when gradients are accumulated (prototypes.grad valid)."""

    def on_before_optimizer_step(self, ctx: RunContext) -> Metrics:
        """Called after gradient clipping/cancelling, right before optimizer.step()."""

    def on_after_optimizer_step(self, ctx: RunContext) -> Metrics:
        """Called right after optimizer.step(): parameters hold their new values."""

    def on_step_end(self, ctx: RunContext) -> Metrics:
        """Called at the end of a step; ctx.outputs holds the step outputs."""

    def on_embeddings(self, ctx: RunContext) -> Metrics:
        """Called when labelled embeddings are available (ctx.embeddings, ctx.labels)."""

    def on_save_checkpoint(self, ctx: RunContext) -> Metrics:
        """Called with ctx.checkpoint, the dict about to be written."""

    def on_load_checkpoint(self, ctx: RunContext) -> Metrics:
        """Called with ctx.checkpoint, the dict just read."""

    def on_train_end(self, ctx: RunContext) -> Metrics:
        """Called once at the end of training."""

    def on_log(self, ctx: RunContext) -> Metrics:
        """Called at each log interval; the only hook that may read device values."""

    def on_collective(self, ctx: RunContext) -> Metrics:
        """Under torch.distributed: called on every rank at train start and right after
        ``optimizer.step()`` (before that event's other hooks), every step, and still after the
        monitor was switched off for raising elsewhere, so that no rank waits forever for one that
        stopped calling. Put the monitor's collectives here, and nothing that can fail on one rank
        only. At train start it may read device values; after a step it must not."""


_BASE_HOOKS = set(EVENTS) | set(EXTRA_HOOKS)


def check_hook_names(monitor: Monitor) -> None:
    """Fail at registration on a misspelled hook (``on_after_backwrd``) instead of never running it."""
    for attr in dir(type(monitor)):
        if attr.startswith("on_") and callable(getattr(type(monitor), attr)) and attr not in _BASE_HOOKS:
            import difflib

            close = difflib.get_close_matches(attr, sorted(_BASE_HOOKS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{type(monitor).__name__} defines hook {attr!r}, which is not an event."
                f"{hint} Valid hooks: {', '.join(EVENTS + EXTRA_HOOKS)}"
            )
