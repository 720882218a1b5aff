"""A series of checkpoint files: found in the paths given, ordered by the step or epoch in their
names (else by modification time), and the label of each (``step 200``, ``epoch 3``)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["CHECKPOINT_SUFFIXES", "SeriesFile", "find_series", "label_of"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")
_STEP = re.compile(r"step[=_-]?(\d+)", re.I)
_EPOCH = re.compile(r"(?<![a-z])(?:epoch|ep)[=_-]?(\d+)", re.I)
_EPOCH_NAMES = re.compile(r"^(model|checkpoint)_?(\d+)$", re.I)  # WeSpeaker model_<epoch>, DINO checkpoint0003
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class SeriesFile:
    """One file of the series: its path, the number in its name (None: none) and that number's
    unit from the name (``step``, ``epoch`` or None: decided from the file's contents)."""

    path: Path
    number: Optional[int]
    unit: Optional[str]


def _parse(path: Path) -> SeriesFile:
    stem = path.name
    for suffix in CHECKPOINT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    if m := _STEP.search(stem):
        return SeriesFile(path, int(m.group(1)), "step")
    if m := _EPOCH.search(stem):
        return SeriesFile(path, int(m.group(1)), "epoch")
    if m := _EPOCH_NAMES.match(stem):
        return SeriesFile(path, int(m.group(2)), "epoch")
    m = _NUMBER.search(stem)
    return SeriesFile(path, int(m.group(1)) if m else None, None)


def _is_checkpoint(p: Path) -> bool:
    return p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".")


def find_series(paths: Sequence[str | os.PathLike]) -> tuple[list[SeriesFile], list[str]]:
    """(the files in order, notes on the files left out). A directory contributes its checkpoint
    files (not recursively); where some carry a number, the unnumbered ones (``checkpoint.pt``,
    ``last.ckpt``: copies or links of the newest) are left out. Files passed by name are all kept.
    The same file reached twice (a hard link, a symlink) is read once. Raises FileNotFoundError."""
    files: list[SeriesFile] = []
    notes: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = [_parse(f) for f in sorted(p.iterdir()) if _is_checkpoint(f)]
            if not found:
                raise FileNotFoundError(f"no checkpoint files ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) "
                                        f"in {p}: pass the files, or the directory that holds them")
            if any(f.number is not None for f in found):
                left = [f for f in found if f.number is None]
                notes += [f"{f.path}: left out, no step or epoch in its name (pass it by name to include it)"
                          for f in left]
                found = [f for f in found if f.number is not None]
            files += found
        elif p.is_file():
            files.append(_parse(p))
        else:
            raise FileNotFoundError(f"{p} does not exist: pass checkpoint files or a directory of them")
    unique: list[SeriesFile] = []
    seen: dict[tuple[int, int], Path] = {}
    for f in files:
        st = f.path.stat()
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            notes.append(f"{f.path}: the same file as {seen[ident]} (read once)")
            continue
        seen[ident] = f.path
        unique.append(f)
    if all(f.number is not None for f in unique):
        unique.sort(key=lambda f: (f.number, f.path.stat().st_mtime))
    else:
        unique.sort(key=lambda f: f.path.stat().st_mtime)
    return unique, notes


def label_of(f: SeriesFile, checkpoint: Any, index: int) -> tuple[str, int]:
    """("epoch 3", 3): how a finding names the checkpoint, and the number used as its step. The
    name's number first; its unit from the name, else from the keys saved (``step`` or
    ``global_step``: step; ``epoch``: epoch); a file with no number is named by its position."""
    if isinstance(checkpoint, Mapping):
        for key, unit in (("global_step", "step"), ("step", "step"), ("epoch", "epoch")):
            value = checkpoint.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                if f.number is None:
                    return f"{unit} {value}", value
                return f"{f.unit or unit} {f.number}", f.number
    if f.number is not None:
        return f"{f.unit or 'checkpoint'} {f.number}", f.number
    return f"checkpoint #{index + 1} ({f.path.name})", index
