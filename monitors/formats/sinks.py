"""Sinks write what the hub hands them. :class:`WandbSink` is the only code that talks to W&B;
:class:`LocalSink` (defined in :mod:`monitors.formats.records`, the owner of the local records format,
and re-exported here) keeps plain local records (JSON lines, PNGs) that the dashboard reads."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ..core.finding import Finding
from ..core.media import Histogram, Image, Table
from .records import RECORDS_DIR, STEP_KEY, LocalSink

__all__ = ["WandbSink", "LocalSink", "check_online_credentials", "SHARED_RUN_GLOBS", "STEP_KEY"]

#: the namespaces put on STEP_KEY in a run the hub does not own (a run passed in, a Lightning
#: WandbLogger's): the user's own metrics keep the axis they have (Lightning: "*" on
#: trainer/global_step)
SHARED_RUN_GLOBS: tuple[str, ...] = ("proto/*", "health/*", "perf/*", "grad/*")


class WandbSink:
    """Writes rows to one W&B run, with every metric on the shared ``trainer/step`` axis (in a
    run passed in, the monitors' namespaces :data:`SHARED_RUN_GLOBS` only).

    ``run=None`` opens a run lazily on first use, offline unless ``mode`` says otherwise (no
    account, no network). Pass ``run_id`` with ``resume=True`` to continue a run. The run id is
    chosen here (``run_id`` or a new one), so it is known before the run opens and survives a
    fallback. In online mode ``wandb.init`` waits at most ``init_timeout`` seconds; if it fails,
    :meth:`recover` (called by the hub) opens an offline run with the same id in the same
    directory, to upload later with ``wandb sync``.
    """

    def __init__(self, run: Any = None, *, project: str = "protowatch", dir: Optional[str] = None,
                 mode: str = "offline", config: Optional[Mapping[str, Any]] = None,
                 run_id: Optional[str] = None, resume: bool = False, name: Optional[str] = None,
                 group: Optional[str] = None, tags: Optional[list[str]] = None,
                 init_timeout: Optional[float] = None) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb mode {mode!r} is not one of offline, online, disabled")
        self._run = run
        self._owns_run = run is None
        if run is None and run_id is None:
            from wandb.sdk.lib.runid import generate_id

            run_id = generate_id()
        self._init_kwargs = dict(project=project, dir=dir, mode=mode, config=dict(config or {}),
                                 id=run_id, resume="allow" if resume else None, name=name,
                                 group=group, tags=tags)
        self._init_timeout = init_timeout
        self._defined = False

    @property
    def run(self) -> Any:
        """The W&B run, opened on first use, with the step axis defined."""
        if self._run is None:
            import wandb

            kwargs = {k: v for k, v in self._init_kwargs.items() if v is not None}
            if kwargs.get("dir"):
                os.makedirs(kwargs["dir"], exist_ok=True)
            extra = {"init_timeout": self._init_timeout} if self._init_timeout else {}
            self._run = wandb.init(**kwargs, settings=wandb.Settings(silent=True, console="off", **extra))
        if not self._defined:
            self._run.define_metric(STEP_KEY)
            for glob in ("*",) if self._owns_run else SHARED_RUN_GLOBS:
                self._run.define_metric(glob, step_metric=STEP_KEY)
            self._defined = True
        return self._run

    @property
    def run_id(self) -> str:
        """The run's id; known before the run opens (no network needed to read it)."""
        if self._run is None and self._init_kwargs.get("id"):
            return self._init_kwargs["id"]
        return self.run.id

    def recover(self, error: str) -> Optional[str]:
        """Called by the hub after a call raised. If an online run could not open (server
        unreachable, init timeout), open an offline run with the same id in the same directory
        and say how to upload it; None (switch this sink off) in any other case."""
        if not self._owns_run or self._run is not None or self._init_kwargs.get("mode") != "online":
            return None
        import wandb

        # the failed init left the id registered with this process's W&B service; tearing it
        # down also ends other runs of this process (the trainer has only this one)
        wandb.teardown()
        self._init_kwargs["mode"] = "offline"
        self._init_timeout = None
        run_dir = self.run_dir
        msg = (f"W&B could not be reached ({error}): logging to the offline run {run_dir} "
               f"instead; upload it later with: wandb sync {run_dir}")
        print(f"protowatch: {msg}", file=sys.stderr, flush=True)
        return f"fell back to the offline run {run_dir} (upload it later with: wandb sync {run_dir})"

    @property
    def run_dir(self) -> str:
        """The run's local directory (…/wandb/offline-run-…), which holds the .wandb log."""
        return str(Path(self.run.dir).parent)

    def watch(self, model: Any, log: str = "gradients", log_freq: int = 100) -> None:
        """W&B's own parameter/gradient hooks (``wandb.watch``), e.g. to compare their cost."""
        self.run.watch(model, log=log, log_freq=log_freq)

    def log_rows(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """Log each ``(step, row)`` as one ``run.log`` call, media turned into W&B objects."""
        import wandb

        for step, row in rows:
            out: dict[str, Any] = {STEP_KEY: step}
            for k, v in row.items():
                if isinstance(v, Histogram):
                    vals = v.numpy()
                    vals = vals[np.isfinite(vals)]
                    if vals.size:
                        out[k] = wandb.Histogram(vals, num_bins=min(v.num_bins, 512))
                elif isinstance(v, Image):
                    out[k] = wandb.Image(v.array(), caption=v.caption)
                elif isinstance(v, Table):
                    out[k] = wandb.Table(columns=list(v.columns), data=[list(r) for r in v.rows])
                else:  # numbers (W&B accepts nan/inf scalars)
                    out[k] = v
            self.run.log(out)

    def set_summary(self, values: Mapping[str, Any]) -> None:
        """Write ``values`` into the run summary."""
        for k, v in values.items():
            self.run.summary[k] = v

    def alert(self, finding: Finding) -> None:
        """Findings always reach the summary (via the hub) and the console; alerts where online."""
        if finding.severity == "info":
            return
        run = self.run
        if self._init_kwargs.get("mode") == "online" or not self._owns_run:
            try:
                import wandb

                level = wandb.AlertLevel.ERROR if finding.severity == "error" else wandb.AlertLevel.WARN
                run.alert(title=finding.code, text=finding.message, level=level)
            except Exception:  # offline runs and old clients may not support alerts
                pass
        run.summary[f"health/finding/{finding.code}"] = f"{finding.severity}: {finding.message}"

    def close(self) -> None:
        """Finish the run if this sink opened it."""
        if self._run is not None and self._owns_run:
            self._run.finish()


def check_online_credentials() -> None:
    """Raise ValueError (one line, with the fix) if W&B online mode has no API key: not in
    ``WANDB_API_KEY``, not in ``~/.netrc`` (``wandb login``), not in W&B's settings."""
    import wandb
    from wandb.sdk.lib.wbauth import authenticate_session

    host = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    try:
        auth = authenticate_session(host=host, source="protowatch", prompt=False, update_session=False)
    except Exception as exc:  # a malformed key
        raise ValueError(f"wandb_mode=online but the W&B credentials for {host} are invalid "
                         f"({str(exc).splitlines()[0]}): run `wandb login`, or use wandb_mode=offline") from None
    if auth is None:
        raise ValueError(f"wandb_mode=online but no W&B API key is configured for {host}: run `wandb login` "
                         "or set WANDB_API_KEY, or use wandb_mode=offline (wandb sync the run later)")


def build_sinks(rank: int = 0, *, exp_dir: Any = None, run: Any = None,
                wandb_options: Optional[Mapping[str, Any]] = None,
                extra: Any = ()) -> tuple[list[Any], Optional[WandbSink]]:
    """The sinks of a run, for the pipeline and for ``attach()`` alike. Only rank 0 writes: other
    ranks get none. On rank 0: W&B (the existing run ``run``, or a new one opened with
    ``wandb_options``, see :class:`WandbSink`; none when ``run is False``), the local records
    under ``exp_dir/records`` when ``exp_dir`` is given, then the ``extra`` sinks. Returns (the
    sinks, the W&B sink or None)."""
    if rank != 0:
        return [], None
    sinks: list[Any] = []
    wandb_sink: Optional[WandbSink] = None
    if run is not False:
        wandb_sink = WandbSink(run) if run is not None else WandbSink(**dict(wandb_options or {}))
        sinks.append(wandb_sink)
    if exp_dir is not None:
        sinks.append(LocalSink(Path(exp_dir) / RECORDS_DIR))
    sinks.extend(extra or ())
    return sinks, wandb_sink
