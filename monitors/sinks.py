"""Sinks write what the hub hands them. :class:`WandbSink` is the only code that talks to W&B;
:class:`LocalSink` keeps plain local records (JSON lines, PNGs) that the dashboard reads."""
from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .finding import Finding
from .media import Histogram, Image, Table

STEP_KEY = "trainer/step"
#: the namespaces put on STEP_KEY in a run the hub does not own (a run passed in, a Lightning
#: WandbLogger's): the user's own metrics keep the axis they have (Lightning: "*" on
#: trainer/global_step)
SHARED_RUN_GLOBS: tuple[str, ...] = ("proto/*", "health/*", "perf/*", "grad/*")


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


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
        if self._run is not None and self._owns_run:
            self._run.finish()


def _end_line(path: Path) -> None:
    """Append a newline to ``path`` if its last line is unfinished."""
    try:
        with open(path, "rb+") as f:
            if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


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


class LocalSink:
    """Plain records under ``directory``: ``metrics.jsonl`` (one line per step, scalars),
    ``media/`` (PNG images, histogram and table JSON), ``media.jsonl`` (an index of media),
    ``findings.jsonl`` and ``summary.json``. Reading them needs no W&B."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        (self.dir / "media").mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "media.jsonl", "findings.jsonl"):
            _end_line(self.dir / name)  # a run killed mid-line: the next row starts a line of its own
        self._summary: dict[str, Any] = {}
        p = self.dir / "summary.json"
        if p.exists():
            try:
                self._summary = json.loads(p.read_text())
            except ValueError:
                self._summary = {}

    def log_rows(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        with open(self.dir / "metrics.jsonl", "a") as fm, open(self.dir / "media.jsonl", "a") as fx:
            for step, row in rows:
                scalars: dict[str, Any] = {STEP_KEY: step}
                for k, v in row.items():
                    if isinstance(v, (int, float)):
                        scalars[k] = v if math.isfinite(v) else str(v)
                    elif isinstance(v, (Histogram, Image, Table)):
                        path = self._write_media(k, step, v)
                        fx.write(json.dumps({STEP_KEY: step, "key": k, "type": type(v).__name__.lower(),
                                             "path": path}) + "\n")
                fm.write(json.dumps(scalars) + "\n")

    def _write_media(self, key: str, step: int, v: Any) -> str:
        stem = f"{_safe_name(key)}_{step:07d}"
        if isinstance(v, Image):
            import matplotlib.image as mpimg

            rel = f"media/{stem}.png"
            mpimg.imsave(self.dir / rel, v.array())
        elif isinstance(v, Histogram):
            rel = f"media/{stem}.hist.json"
            vals = v.numpy()
            vals = vals[np.isfinite(vals)]
            counts, edges = np.histogram(vals, bins=v.num_bins) if vals.size else ([], [])
            (self.dir / rel).write_text(json.dumps({"counts": list(map(int, counts)),
                                                    "edges": list(map(float, edges))}))
        else:
            rel = f"media/{stem}.table.json"
            (self.dir / rel).write_text(json.dumps({"columns": list(v.columns),
                                                    "rows": [list(r) for r in v.rows]}, default=float))
        return rel

    def set_summary(self, values: Mapping[str, Any]) -> None:
        self._summary.update(values)
        tmp = self.dir / "summary.json.tmp"
        tmp.write_text(json.dumps(self._summary, indent=1, default=str))
        os.replace(tmp, self.dir / "summary.json")

    def alert(self, finding: Finding) -> None:
        with open(self.dir / "findings.jsonl", "a") as f:
            f.write(json.dumps(finding.to_dict()) + "\n")

    def close(self) -> None:
        pass
