"""Atomic checkpoints: written to a temporary file in the same directory, then renamed, so a
crash or a kill never leaves a half-written file. :class:`CheckpointManager` keeps the last N
good (finite) ones as step-numbered files with ``checkpoint.pt`` pointing at the newest;
:class:`ExpDirLock` keeps a second run out of an ``exp_dir`` a live run holds."""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from monitors.formats.checkpoints import UnsafeCheckpointError, load_checkpoint

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Any]:
    """The checkpoint dict in ``path``, loaded without running pickle code (``weights_only=True``
    and the allowlist of :mod:`monitors.formats.checkpoints`); ``trust_pickle=True`` loads any pickle.
    Raises FileNotFoundError, UnsafeCheckpointError (it needs arbitrary pickle: the message names
    ``--trust-pickle``) or ValueError (unreadable, e.g. truncated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: train first, or pass the path of an existing checkpoint.pt")
    try:
        return load_checkpoint(path, trust_pickle=trust_pickle, mmap=False)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        others = [p.name for _, p in CheckpointManager(path.parent).step_files() if not _same_file(p, path)]
        hint = f" ({', '.join(others)} in the same directory)" if others else ""
        raise ValueError(f"checkpoint {path} could not be read ({type(exc).__name__}); it may be truncated: "
                         f"use an earlier checkpoint{hint}") from None


def rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain values only, so the checkpoint loads with
    ``weights_only=True``: numpy's MT19937 keys and Python's Mersenne state as int64 tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states; also the previous format (numpy's state tuple, Python's
    tuple), so checkpoints written before it still resume."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    if isinstance(npst, Mapping):
        npst = (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                npst["cached_gaussian"])
    np.random.set_state(npst)
    pyst = state["python"]
    if isinstance(pyst, Mapping):
        pyst = (pyst["version"], tuple(int(x) for x in pyst["internal"].tolist()), pyst["gauss_next"])
    random.setstate(pyst)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# keeping the last N good checkpoints
# ----------------------------------------------------------------------------------------------
_STEP_FILE = re.compile(r"^checkpoint-(\d+)\.pt$")


def nonfinite_tensors(state: Mapping[str, Any], keys: Sequence[str] = ("prototypes", "student", "teacher", "optimizer")) -> list[str]:
    """Names of the floating-point tensors under ``keys`` of a checkpoint dict that hold NaN or
    Inf ([] when all are finite). One device-to-host transfer per device, not one per tensor."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.numel():
                found.append((path, obj))
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{path}/{k}" if path else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")

    for key in keys:
        if key in state:
            walk(state[key], key)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (_, t) in enumerate(found):
        groups.setdefault((t.device, t.dtype), []).append(i)
    bad: list[str] = []
    for idx in groups.values():
        # the max-abs norm is NaN/Inf iff some element is; one batched call per (device, dtype)
        norms = torch._foreach_norm([found[i][1].detach() for i in idx], float("inf"))
        ok = torch.isfinite(torch.stack(norms)).cpu().tolist()  # note: one CPU-GPU sync per group
        bad += [found[i][0] for i, good in zip(idx, ok) if not good]
    return bad


class CheckpointManager:
    """Step-numbered checkpoints ``checkpoint-<step>.pt`` in ``directory``, the last ``keep`` of
    them kept, and ``checkpoint.pt``: a hard link to the newest good one (a copy where the file
    system has no hard links), so existing paths keep working and pruning never breaks it.

    Write order: the step file (temporary file, fsync, rename), then the pointer (a link made
    under a temporary name, then renamed over ``checkpoint.pt``), then the pruning of old files.
    A kill at any point leaves the previous state or the new one, never a mix.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.dir = Path(directory)
        self.keep = keep
        self.pointer = self.dir / CHECKPOINT_NAME

    def step_path(self, step: int) -> Path:
        return self.dir / f"checkpoint-{step}.pt"

    def step_files(self) -> list[tuple[int, Path]]:
        """(step, path) of every step-numbered checkpoint, newest first."""
        if not self.dir.is_dir():
            return []
        out = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_FILE.match(p.name))]
        return sorted(out, reverse=True)

    def clean_temporaries(self) -> None:
        """Remove temporary files left by a process killed while writing (not by a live one)."""
        if not self.dir.is_dir():
            return
        for p in self.dir.glob(".checkpoint*.tmp.*"):
            pid = p.name.rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            p.unlink(missing_ok=True)

    def save(self, state: dict[str, Any], step: int) -> Optional[Path]:
        """Write ``state`` as the checkpoint of ``step`` if it is finite; return its path, or
        None (and print why) if it holds NaN/Inf: a non-finite state never replaces a good one."""
        bad = nonfinite_tensors(state)
        if bad:
            newest = self.step_files()
            last = f"the last good checkpoint is {newest[0][1]} (step {newest[0][0]})" if newest else \
                "no good checkpoint exists yet"
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            print(f"checkpoint of step {step} NOT written: {shown} hold NaN/Inf; {last}",
                  file=sys.stderr, flush=True)
            return None
        path = save_atomic(state, self.step_path(step))
        _fsync_dir(self.dir)
        self._point_to(path)
        for _, old in self.step_files()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def _point_to(self, path: Path) -> None:
        tmp = self.dir / f".{CHECKPOINT_NAME}.tmp.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # no hard links here (some network and FUSE file systems): copy
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.pointer)
        _fsync_dir(self.dir)

    def load_newest_good(self, log: Any = None, repoint: bool = True,
                         trust_pickle: bool = False) -> Optional[tuple[dict[str, Any], Path]]:
        """The newest checkpoint that loads and is finite, with its path; None if there is no
        checkpoint at all. Each one skipped is reported through ``log`` (default: stderr).
        With ``repoint``, ``checkpoint.pt`` is made to name the one chosen.
        Raises ValueError if checkpoints exist but none is usable, and UnsafeCheckpointError (not
        skipped: an earlier file would silently resume an older state) for one that needs
        arbitrary pickle without ``trust_pickle``."""
        log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        candidates = [p for _, p in self.step_files()]
        if not candidates and self.pointer.is_file():  # a run from before step-numbered files
            candidates = [self.pointer]
        skipped: list[str] = []
        for path in candidates:
            try:
                state = load(path, trust_pickle=trust_pickle)
            except UnsafeCheckpointError as exc:
                raise UnsafeCheckpointError(f"cannot resume: {exc}") from None
            except ValueError:
                skipped.append(f"{path.name} (unreadable)")
                log(f"skipping checkpoint {path}: it could not be read (truncated?); trying an earlier one")
                continue
            bad = nonfinite_tensors(state)
            if bad:
                skipped.append(f"{path.name} (NaN/Inf)")
                log(f"skipping checkpoint {path}: {', '.join(bad[:3])} hold NaN/Inf; trying an earlier one")
                continue
            if repoint and path != self.pointer and not _same_file(path, self.pointer):
                self._point_to(path)  # checkpoint.pt names the checkpoint actually resumed from
            return state, path
        if skipped:
            raise ValueError(f"no usable checkpoint in {self.dir}: {', '.join(skipped)}; "
                             "start a new run (resume=false, or another exp_dir)")
        return None


#: config keys that fix the shapes of saved tensors: a resume must use the checkpoint's values
SHAPE_KEYS: tuple[str, ...] = ("num_proto", "output_dim", "embed_dim", "channels", "scale", "hidden_dim",
                               "head_layers")


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raise ValueError (one line listing each key with both values) if a shape key differs."""
    diff = [f"{k}: checkpoint {saved[k]!r}, now {current.get(k)!r}"
            for k in SHAPE_KEYS if k in saved and saved[k] != current.get(k)]
    if diff:
        fix = " ".join(f"{k}={saved[k]}" for k in SHAPE_KEYS if k in saved and saved[k] != current.get(k))
        raise ValueError(f"cannot resume from {path}: the tensor shapes differ ({'; '.join(diff)}): "
                         f"resume with {fix}, or start a new run in another exp_dir")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# one run per exp_dir
# ----------------------------------------------------------------------------------------------
class ExpDirLock:
    """An exclusive ``flock`` on ``exp_dir/.lock``, held while a run trains. The kernel drops it
    when the process dies (SIGKILL included), so a lock left by a killed run never blocks a resume."""

    def __init__(self, exp_dir: str | os.PathLike) -> None:
        self.path = Path(exp_dir) / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> "ExpDirLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"exp_dir {self.path.parent} is in use by a running training (pid {holder}): "
                             "wait for it to finish, or pass another exp_dir=...") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "ExpDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
