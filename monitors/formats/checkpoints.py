"""The one way this project reads a checkpoint: ``torch.load(weights_only=True)``, so no pickle
code inside a file runs, with an explicit allowlist of the plain non-tensor values real trainers
save (numpy scalars, arrays and dtypes as in WeSpeaker's optimizer state and old RNG states,
``argparse.Namespace`` as DINO saves its args). A file that needs anything else raises
:class:`UnsafeCheckpointError`, one line naming the file and ``--trust-pickle``; with
``trust_pickle=True`` it is loaded as plain pickle (only for files from a trusted source)."""
from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

__all__ = ["SAFE_GLOBALS", "UnsafeCheckpointError", "load_checkpoint", "tensor_paths"]


def _numpy_globals() -> list[Any]:
    """numpy's scalar and array reconstructors and its dtypes, under both module names (numpy 1
    pickles say ``numpy.core.multiarray``, numpy 2 ``numpy._core.multiarray``). Arrays of dtype
    object stay safe: their items go through the same restricted unpickler."""
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 / numpy 1
    out: list[Any] = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(core.multiarray, name)
        out += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


#: every global a checkpoint may name besides tensors and plain containers
SAFE_GLOBALS: list[Any] = [*_numpy_globals(), argparse.Namespace]


class UnsafeCheckpointError(ValueError):
    """A checkpoint that ``weights_only=True`` with the allowlist cannot load: it names a global
    (a class or function) that unpickling would have to import and call."""


def _refused_global(exc: BaseException) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"Unsupported operand (\d+)", str(exc))
    return m.group(1) if m else type(exc).__name__


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False, mmap: bool = True,
                    map_location: Any = "cpu") -> Any:
    """The object saved in ``path``, loaded on the CPU without running pickle code.

    ``mmap=True`` maps the file's tensors instead of reading them (zip files, torch >= 2.1; the
    legacy format is read whole), so a large file costs memory only where its tensors are read.
    ``trust_pickle=True`` loads any pickle (``weights_only=False``): code in the file runs.
    Raises FileNotFoundError, :class:`UnsafeCheckpointError` (needs arbitrary pickle), or the
    loader's own error for a truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass the path of an existing checkpoint file")
    if trust_pickle:
        return _load(path, mmap=mmap, weights_only=False, map_location=map_location)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return _load(path, mmap=mmap, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as exc:
        # only a named global (a class or function to import and call) makes a file unsafe; an
        # unsupported opcode alone is a corrupt or foreign file, reported as unreadable
        if "GLOBAL" not in str(exc) and "weights only" not in str(exc).lower():
            raise
        if "GLOBAL" not in str(exc) and re.search(r"Unsupported operand \d+", str(exc)):
            raise
        raise UnsafeCheckpointError(
            f"checkpoint {path} was not loaded: it needs arbitrary pickle ({_refused_global(exc)} is not a "
            "plain type), and unpickling it could run code; if you trust its source, pass --trust-pickle "
            "(trust_pickle=true, or trust_pickle=True in Python)") from None


def _load(path: Path, *, mmap: bool, weights_only: bool, map_location: Any) -> Any:
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be mapped: read it whole
            if "mmap" not in str(exc) and "zipfile" not in str(exc).lower():
                raise
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def tensor_paths(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in a checkpoint: nested mappings, lists, tuples, modules
    (their parameters as they are: ``state_dict(keep_vars=True)``) and optimizers, keys joined by
    ``/`` (``model/head.prototypes``, ``optimizer/state/3/exp_avg``). An object reached twice is
    walked once."""
    yield from _walk(obj, "", set(), 0)


def _walk(obj: Any, path: str, seen: set, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
    if depth > 32:
        return
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict(keep_vars=True)
    elif isinstance(obj, torch.optim.Optimizer):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield from _walk(v, f"{path}/{k}" if path else str(k), seen, depth + 1)
