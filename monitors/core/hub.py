"""The hub: dispatches events to monitors at their cadence, batches what they return, and hands
it to the sinks at the log interval. It is the only place that moves numbers to the host."""
from __future__ import annotations

import sys
import time
import traceback
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from .base import Monitor, check_hook_names
from .events import COLLECTIVE_EVENTS, EVENTS, EXTRA_HOOKS, STEP_EVENTS, RunContext, StepOutputs
from .cadence import on_multiple
from .codes import MONITOR_FAILED, SINK_FAILED
from .finding import Finding
from .media import Histogram, VectorStat, reduce_rows
from .options import positive_int


def _print_console(line: str) -> None:
    print(f"protowatch: {line}", file=sys.stderr, flush=True)


class MonitorHub:
    """Runs monitors for one training run.

    Args:
        monitors: the monitor instances (see :func:`monitors.core.registry.build_monitors`).
        sinks: writers (W&B, local records); only rank 0 writes.
        log_every: optimizer steps between two log intervals. Per-step values are buffered on
            the device and moved to the host in one batch per interval.
        stop_on_error: set :attr:`should_stop` when a finding of severity ``error`` arrives, so
            the loop can checkpoint and stop cleanly.
        console: where findings and monitor failures are printed (None: silent).
    """

    #: the history keys the hub itself logs, besides the monitors' (``<severity>`` and ``<CODE>``
    #: are filled from each finding); the README's hub table is checked against these
    #: (tests/test_readme_tables.py)
    metrics: tuple[str, ...] = ("perf/monitor_ms", "health/<severity>/<CODE>")
    #: the run-summary keys of :meth:`health_summary`
    summary_keys: tuple[str, ...] = ("health/errors", "health/warnings", "health/codes")

    def __init__(
        self,
        monitors: Sequence[Monitor] = (),
        sinks: Sequence[Any] = (),
        log_every: int = 10,
        stop_on_error: bool = False,
        console: Optional[Callable[[str], None]] = _print_console,
    ) -> None:
        self.monitors: list[Monitor] = []
        self.sinks: list[Any] = list(sinks)
        self.log_every = positive_int("MonitorHub", "log_every", log_every)
        self.stop_on_error = stop_on_error
        self.console = console
        self.findings: list[Finding] = []
        self.should_stop = False
        self.disabled: dict[str, str] = {}     # monitor name -> error that switched it off
        self.failed_sinks: dict[int, str] = {}  # id(sink) -> error that switched it off
        self.last_values: dict[str, float] = {}  # latest host value of every scalar logged
        self.ctx: Optional[RunContext] = None
        self._rows: dict[int, dict[str, Any]] = defaultdict(dict)  # step -> buffered values
        self._seen: set[tuple[str, str]] = set()  # (code, key) reported
        self._monitor_seconds = 0.0
        self._last_flushed_step = -1
        self._summary: dict[str, Any] = {}
        self._closed = False
        self._by_hook: dict[str, list[Monitor]] = defaultdict(list)  # hook -> monitors overriding it
        for m in monitors:
            self.add(m)

    # -- registration -----------------------------------------------------------------------
    def add(self, monitor: Monitor) -> Monitor:
        """Register a monitor; hook names are checked now, so a typo fails at once."""
        if not isinstance(monitor, Monitor):
            raise TypeError(f"expected a monitors.Monitor instance, got {type(monitor).__name__}")
        check_hook_names(monitor)
        if any(m.state_key == monitor.state_key for m in self.monitors):
            raise ValueError(f"two monitors share the name {monitor.state_key!r}: give one another name")
        self.monitors.append(monitor)
        # the hooks it overrides: the base class's no-ops are never called (less per-step Python)
        for h in EVENTS + EXTRA_HOOKS:
            if getattr(type(monitor), h) is not getattr(Monitor, h):
                self._by_hook[h].append(monitor)
        return monitor

    def get(self, name: str) -> Optional[Monitor]:
        """The registered monitor called ``name`` (None if there is none)."""
        return next((m for m in self.monitors if m.name == name), None)

    # -- events -----------------------------------------------------------------------------
    def emit(self, event: str, ctx: RunContext) -> None:
        """Call ``event`` on every active monitor whose cadence includes ``ctx.step``."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; events are {', '.join(EVENTS)}")
        self.ctx = ctx
        t0 = time.perf_counter()
        ctx.proto_stats.next_event()
        per_step = event in STEP_EVENTS
        if event in COLLECTIVE_EVENTS:
            # every rank, every step, switched-off monitors included: a rank that skipped a
            # collective would leave the others waiting in it
            for m in self._by_hook.get("on_collective", ()):
                self._call(m, "on_collective", ctx)
        for m in self._by_hook.get(event, ()):
            if m.name in self.disabled:
                continue
            if per_step and not on_multiple(ctx.step, m.every_n_steps):
                continue
            self._call(m, event, ctx)
        self._monitor_seconds += time.perf_counter() - t0
        if event == "on_step_end":
            self.log({"perf/monitor_ms": 1000.0 * self._monitor_seconds}, step=ctx.step)
            self._monitor_seconds = 0.0
            if on_multiple(ctx.step + 1, self.log_every):  # the last step of an interval
                self.flush()
        elif event in ("on_save_checkpoint", "on_train_end"):
            self.flush()

    def emit_with(self, event: str, ctx: RunContext, **payload: Any) -> None:
        """Emit ``event`` with ``ctx.<name> = value`` set for each payload entry (``checkpoint=``,
        ``embeddings=``, ``outputs=``, ...) and cleared again afterwards, even if the emit raised."""
        for k, v in payload.items():
            setattr(ctx, k, v)
        try:
            self.emit(event, ctx)
        finally:
            for k in payload:
                setattr(ctx, k, None)

    # -- driving a step: the one vocabulary of the pipeline's loop and the attached hub -------
    def after_backward(self, ctx: Optional[RunContext] = None) -> None:
        """Gradients are accumulated (and unscaled, under AMP): ``on_after_backward``."""
        self.emit("on_after_backward", ctx or self.ctx)

    def before_step(self, ctx: Optional[RunContext] = None) -> None:
        """Right before ``optimizer.step()``, after clipping and cancelling: ``on_before_optimizer_step``."""
        self.emit("on_before_optimizer_step", ctx or self.ctx)

    def after_step(self, ctx: Optional[RunContext] = None) -> None:
        """Right after ``optimizer.step()``, parameters new: ``on_after_optimizer_step``."""
        self.emit("on_after_optimizer_step", ctx or self.ctx)

    def end_step(self, outputs: Optional[StepOutputs] = None, ctx: Optional[RunContext] = None,
                 **values: Any) -> None:
        """The end of a step: ``train/loss``, ``train/<term>`` and ``train/<schedule>`` of
        ``outputs`` (and ``train/<name>`` of each keyword, e.g. ``epoch=``) are buffered, then
        ``on_step_end`` runs with ``ctx.outputs = outputs``, cleared again afterwards."""
        ctx = ctx or self.ctx
        if outputs is not None:
            loss = outputs.loss if isinstance(outputs.loss, torch.Tensor) else None
            self.log_train(loss, {**dict(outputs.terms or {}), **dict(outputs.schedules or {})},
                           step=ctx.step, **values)
        self.emit_with("on_step_end", ctx, outputs=outputs)

    def log_train(self, loss: Any = None, terms: Optional[Mapping[str, Any]] = None,
                  step: Optional[int] = None, **values: Any) -> None:
        """Buffer the loop's own values: ``train/loss``, ``train/<term>`` for each loss term and
        ``train/<name>`` for each keyword (lr, wd, momentum, epoch, ...). Scalar tensors stay on
        the device until the log interval; other entries (non-scalar tensors, bools) are skipped."""
        row: dict[str, Any] = {}
        for k, v in [("loss", loss), *dict(terms or {}).items(), *values.items()]:
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                row["train/" + k] = v.detach().reshape(())
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                row["train/" + k] = v
        if row:
            self.log(row, step=step)

    def _call(self, m: Monitor, hook: str, ctx: RunContext) -> None:
        try:
            out = getattr(m, hook)(ctx)
            if out:
                self.log(out, step=ctx.step)
        except Exception as exc:  # a monitor must never stop training
            self.disabled[m.name] = f"{type(exc).__name__}: {exc}"
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            self.report(Finding(
                MONITOR_FAILED, "warning", int(ctx.step),
                f"monitor {m.name!r} raised in {hook} ({detail}) and was switched off; "
                "training goes on. Fix the monitor or remove it from the monitors list.",
            ))
        for f, key in m.pop_reports():
            self.report(f, key)

    # -- values -----------------------------------------------------------------------------
    def log(self, values: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Buffer values for ``step`` (default: the current step). Tensors may stay on the device."""
        if step is None:
            step = self.ctx.step if self.ctx is not None else 0
        self._rows[int(step)].update(values)

    def set_summary(self, values: Mapping[str, Any]) -> None:
        """Values for the run summary (written at the next flush)."""
        self._summary.update(values)

    def flush(self) -> None:
        """Move buffered values to the host (one transfer per device), run ``on_log``, write to
        the sinks. Called at each log interval, at checkpoints and at the end."""
        ctx = self.ctx
        if ctx is not None:
            ctx.proto_stats.next_event()
            for m in self._by_hook.get("on_log", ()):
                if m.name not in self.disabled:
                    self._call(m, "on_log", ctx)
        rows = sorted(self._rows.items())
        self._rows = defaultdict(dict)
        host_rows = _to_host(rows)
        for _, row in host_rows:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self.last_values[k] = v
        if host_rows:
            self._last_flushed_step = max(self._last_flushed_step, host_rows[-1][0])
        self._summary.update(self.health_summary())
        if self._writes():
            for sink in self.sinks:
                if host_rows:
                    self.call_sink(sink, "log_rows", host_rows)
                self.call_sink(sink, "set_summary", dict(self._summary))

    def _writes(self) -> bool:
        return self.ctx is None or self.ctx.is_main_process

    def sink_active(self, sink: Any) -> bool:
        """False once ``sink`` raised and was switched off."""
        return id(sink) not in self.failed_sinks

    def call_sink(self, sink: Any, method: str, *args: Any) -> None:
        """Call a sink method; a sink that raises never stops training. A sink may recover
        (``sink.recover(exc) -> str | None``, e.g. W&B falling back to an offline run): the call
        is then retried once. Either way the failure is reported once (``SINK_FAILED``)."""
        if id(sink) in self.failed_sinks:
            return
        try:
            getattr(sink, method)(*args)
            return
        except Exception as exc:  # W&B init timeout, CommError, a full disk, ...
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines()[0]
        name = type(sink).__name__
        recovered: Optional[str] = None
        recover = getattr(sink, "recover", None)
        if recover is not None:
            try:
                recovered = recover(detail)
            except Exception as exc2:
                detail += f"; recovering failed too ({type(exc2).__name__}: {exc2})"
        if recovered is not None:
            try:
                getattr(sink, method)(*args)
            except Exception as exc3:
                recovered = None
                detail += f"; after recovering: {type(exc3).__name__}: {exc3}"
        if recovered is None:
            self.failed_sinks[id(sink)] = detail
            what = "was switched off; training and the other sinks go on"
        else:
            what = recovered
        step = int(self.ctx.step) if self.ctx is not None else max(self._last_flushed_step, 0)
        self.report(Finding(SINK_FAILED, "warning", step, f"sink {name} raised in {method} ({detail}) and {what}."))

    # -- findings ---------------------------------------------------------------------------
    def report(self, f: Finding, key: Any = None) -> None:
        """Record ``f`` and hand it to the console and the sinks, once per code and ``key``
        (default: its severity): the one deduplication of findings. Monitors' reports end here,
        as do the hub's own codes and findings from outside a monitor (attach-time checks)."""
        seen = (f.code, f.severity if key is None else str(key))
        if seen in self._seen:
            return
        self._seen.add(seen)
        self.findings.append(f)
        metric = "health/<severity>/<CODE>".replace("<severity>", f.severity).replace("<CODE>", f.code)
        self.log({metric: 1.0}, step=f.step)
        if self._writes():
            if self.console is not None:
                self.console(str(f))
            for sink in self.sinks:
                self.call_sink(sink, "alert", f)
        if f.severity == "error" and self.stop_on_error:
            self.should_stop = True

    def health_summary(self) -> dict[str, Any]:
        """``health/errors``, ``health/warnings`` and ``health/codes``: the counts by severity and
        the sorted codes raised at warning or error."""
        errors = {f.code for f in self.findings if f.severity == "error"}
        warnings = {f.code for f in self.findings if f.severity == "warning"}
        return {
            "health/errors": sum(f.severity == "error" for f in self.findings),
            "health/warnings": sum(f.severity == "warning" for f in self.findings),
            "health/codes": sorted(errors | warnings),
        }

    def codes(self, severity: Optional[str] = None) -> set[str]:
        """The codes found so far (of one severity, if given)."""
        return {f.code for f in self.findings if severity is None or f.severity == severity}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitors": {m.state_key: m.state_dict() for m in self.monitors},
            "findings": [f.to_dict() for f in self.findings],
            "disabled": dict(self.disabled),
            "reported": sorted([c, k] for c, k in self._seen),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for m in self.monitors:
            if m.state_key in state.get("monitors", {}):
                m.load_state_dict(state["monitors"][m.state_key])
        self.findings = [Finding.from_dict(d) for d in state.get("findings", [])]
        self._seen = {(f.code, f.severity) for f in self.findings}
        self._seen.update((c, k) for c, k in state.get("reported", []))
        self.disabled.update(state.get("disabled", {}))

    # -- end --------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Flush, finish monitors' background work (t-SNE), flush again and close the sinks."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        for m in self.monitors:
            try:
                out = m.close()
                if isinstance(out, list):  # (step, metrics) pairs, e.g. t-SNE frames taken earlier
                    for step, metrics in out:
                        self.log(metrics, step=step)
                elif out:
                    self.log(out, step=max(self._last_flushed_step, 0))
            except Exception as exc:
                _print_console(f"monitor {m.name!r} failed to close: {exc}")
        self.flush()
        for sink in self.sinks:
            self.call_sink(sink, "close")


def _to_host(rows: Iterable[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """Replace 0-dim tensors and :class:`VectorStat` values by floats and histogram tensors by
    arrays: the vector statistics of all rows are reduced in one batched call per (device, shape,
    dtype, statistic), then every value of a device crosses to the host in one transfer."""
    rows = [(s, dict(r)) for s, r in rows]
    scalars: dict[tuple, list[tuple[dict, str, torch.Tensor]]] = defaultdict(list)
    vectors: dict[tuple, list[tuple[dict, str, torch.Tensor]]] = defaultdict(list)
    for _, row in rows:
        for k, v in row.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"metric {k!r} is a tensor of shape {tuple(v.shape)}; return a 0-dim "
                                     "tensor, or wrap values in media.VectorStat or media.Histogram")
                scalars[(v.device, v.dtype)].append((row, k, v.detach().reshape(1)))
            elif isinstance(v, VectorStat):
                x = v.values.detach().reshape(-1)
                if not x.is_floating_point():  # counts, masks
                    x = x.double()
                vectors[(x.device, x.numel(), x.dtype, v.stat)].append((row, k, x))
    # per device: the 1-D pieces to concatenate and, in order, the (row, key) slots they fill
    pieces: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    slots: dict[torch.device, list[tuple[dict, str]]] = defaultdict(list)
    for (dev, _), items in scalars.items():
        pieces[dev].append(torch.cat([x for _, _, x in items]).double())
        slots[dev].extend((row, k) for row, k, _ in items)
    for (dev, _, _, stat), items in vectors.items():
        pieces[dev].append(reduce_rows(torch.stack([x for _, _, x in items]), stat).double())
        slots[dev].extend((row, k) for row, k, _ in items)
    for dev, parts in pieces.items():
        # note: this is the one CPU-GPU sync point of the interval
        values = torch.cat(parts).cpu().tolist()
        for (row, k), x in zip(slots[dev], values):
            row[k] = x
    for _, row in rows:
        for k, v in row.items():
            if isinstance(v, Histogram) and isinstance(v.values, torch.Tensor):
                row[k] = Histogram(v.numpy(), v.num_bins)
    return rows
