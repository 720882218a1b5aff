"""Kaldi-style data dirs: :func:`read_kaldi_dir` (wav.scp, utt2spk, trials; every file checked,
for evaluation and data preparation), :func:`read_train_list` (paths and labels only, streamed,
for training) and :func:`read_audio_list` (noise / RIR lists). Every problem raises a one-line
ValueError that names the file, the line and the fix.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import AudioReadError, audio_info

@dataclass
class KaldiDir:
    """A parsed Kaldi-style data dir."""
    path: Path
    wavs: dict[str, Path]  # utt -> wav path (wav.scp order)
    utt2spk: dict[str, str]
    trials: list[tuple[int, str, str]]  # (1 target / 0 nontarget, enroll, test); [] if no trials
    speakers: list[str]  # sorted unique speakers of the utterances in wav.scp


_LABELS = {"1": 1, "0": 0, "target": 1, "nontarget": 0}


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped line) of the non-blank lines of a text file."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: it must hold UTF-8 text lines") from None
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def _fields(path: Path, expected: str, maxsplit: int = -1) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line, lazily (the caller's checks keep line
    order); a line without as many fields as ``expected`` names raises a one-line ValueError."""
    n = len(expected.split())
    for no, ln in _lines(path):
        parts = ln.split(maxsplit=maxsplit)
        if len(parts) != n:
            raise ValueError(f"{path}:{no}: malformed line {ln!r}: expected '{expected}'")
        yield no, parts


def read_kaldi_dir(path: str | Path, require_trials: bool = False) -> KaldiDir:
    """Read ``wav.scp``, ``utt2spk`` and (optional) ``trials`` of a Kaldi data dir.

    ``wav.scp``: ``utt-id path`` (the path is the rest of the line; relative paths are taken
    relative to the data dir; Kaldi pipes are not supported). ``utt2spk``: ``utt-id spk-id``
    (lines for utterances not in wav.scp are ignored). ``trials``: ``label enroll test`` with
    label in {1, 0, target, nontarget}, or Kaldi's ``enroll test target|nontarget``. Every
    problem raises a one-line ValueError.
    """
    d = Path(path).expanduser()
    if not d.exists():
        raise ValueError(f"data dir {d} does not exist: pass a Kaldi data dir holding wav.scp and utt2spk")
    if not d.is_dir():
        raise ValueError(f"data dir {d} is not a directory: pass a Kaldi data dir holding wav.scp and utt2spk")
    scp = d / "wav.scp"
    if not scp.is_file():
        raise ValueError(f"{scp} is missing: add a wav.scp with lines 'utt-id /path/to.wav'")
    wavs: dict[str, Path] = {}
    for no, (utt, p) in _fields(scp, "utt-id /path/to.wav", maxsplit=1):
        if p.endswith("|"):
            raise ValueError(f"{scp}:{no}: Kaldi pipe commands are not supported: point utt {utt} to a .wav file")
        if utt in wavs:
            raise ValueError(f"{scp}:{no}: duplicate utterance id {utt!r}: utterance ids must be unique")
        wp = Path(p).expanduser()
        wp = wp if wp.is_absolute() else d / wp
        if not wp.is_file():
            raise ValueError(f"{scp}:{no}: wav file of utterance {utt!r} not found: {wp}: fix the path or remove the line")
        wavs[utt] = wp
    if not wavs:
        raise ValueError(f"{scp} has no utterances: add lines 'utt-id /path/to.wav'")

    u2s_path = d / "utt2spk"
    if not u2s_path.is_file():
        raise ValueError(f"{u2s_path} is missing: add an utt2spk with lines 'utt-id spk-id' for every utterance of wav.scp")
    utt2spk: dict[str, str] = {}
    for _, (utt, spk) in _fields(u2s_path, "utt-id spk-id"):
        if utt in wavs:
            utt2spk[utt] = spk
    missing = [u for u in wavs if u not in utt2spk]
    if missing:
        raise ValueError(f"{u2s_path} has no speaker for utterance {missing[0]!r} of wav.scp "
                         f"({len(missing)} missing): add a line '{missing[0]} spk-id'")
    utt2spk = {u: utt2spk[u] for u in wavs}

    trials: list[tuple[int, str, str]] = []
    tr_path = d / "trials"
    if tr_path.is_file():
        for no, parts in _fields(tr_path, "label enroll-utt test-utt"):
            lab, a, b = parts
            if lab.lower() not in _LABELS and parts[2].lower() in ("target", "nontarget"):
                a, b, lab = parts  # Kaldi's 'enroll-utt test-utt target|nontarget'
            if lab.lower() not in _LABELS:
                raise ValueError(f"{tr_path}:{no}: trial label {lab!r} is not one of 1, 0, target, nontarget: "
                                 f"lines must read 'label enroll-utt test-utt'")
            for u in (a, b):
                if u not in wavs:
                    raise ValueError(f"{tr_path}:{no}: utterance {u!r} is not in {scp}: add it to wav.scp or drop the trial")
            trials.append((_LABELS[lab.lower()], a, b))
    elif require_trials:
        raise ValueError(f"{tr_path} is missing: evaluation needs a trials file with lines 'label enroll-utt test-utt'")
    return KaldiDir(path=d, wavs=wavs, utt2spk=utt2spk, trials=trials,
                    speakers=sorted(set(utt2spk.values())))


class PathTable:
    """Many file paths in two numpy arrays (utf-8 bytes + offsets): no Python object per path,
    so DataLoader workers forked from the trainer do not copy it page by page (refcounts)."""

    def __init__(self, paths: list[bytes]) -> None:
        self._offsets = np.zeros(len(paths) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in paths], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(paths), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes().decode()


@dataclass
class TrainList:
    """What the training set keeps per utterance: its path and speaker label, nothing else."""
    path: Path                # the data dir
    paths: PathTable          # wav.scp order
    labels: np.ndarray        # (N,) int32 index into speakers
    speakers: list[str]       # sorted unique speakers


def read_train_list(path: str | Path) -> TrainList:
    """Read ``wav.scp`` + ``utt2spk`` for training without opening (or stat-ing) the audio files:
    a missing or unreadable file is found when an item first reads it, and is then skipped and
    counted. Line errors raise the same one-line ValueErrors as :func:`read_kaldi_dir`. Both
    files are streamed line by line (a million lines take a few seconds, see README)."""
    d = Path(path).expanduser()
    if not d.is_dir():
        what = "is not a directory" if d.exists() else "does not exist"
        raise ValueError(f"data dir {d} {what}: pass a Kaldi data dir holding wav.scp and utt2spk")
    scp, u2s_path = d / "wav.scp", d / "utt2spk"
    if not scp.is_file():
        raise ValueError(f"{scp} is missing: add a wav.scp with lines 'utt-id /path/to.wav'")
    if not u2s_path.is_file():
        raise ValueError(f"{u2s_path} is missing: add an utt2spk with lines 'utt-id spk-id' for every utterance of wav.scp")
    spk_ids: dict[str, int] = {}
    utt2spk: dict[str, int] = {}
    with open(u2s_path, encoding="utf-8", errors="strict") as f:
        try:
            for no, ln in enumerate(f, 1):
                parts = ln.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ValueError(f"{u2s_path}:{no}: malformed line {ln.strip()!r}: expected 'utt-id spk-id'")
                utt2spk[parts[0]] = spk_ids.setdefault(parts[1], len(spk_ids))
        except UnicodeDecodeError:
            raise ValueError(f"{u2s_path} is not a text file: it must hold UTF-8 text lines") from None
    paths: list[bytes] = []
    labels: list[int] = []
    base = str(d) + os.sep
    with open(scp, encoding="utf-8", errors="strict") as f:
        try:
            for no, ln in enumerate(f, 1):
                parts = ln.strip().split(maxsplit=1)
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ValueError(f"{scp}:{no}: malformed line {ln.strip()!r}: expected 'utt-id /path/to.wav'")
                utt, p = parts
                if p.endswith("|"):
                    raise ValueError(f"{scp}:{no}: Kaldi pipe commands are not supported: point utt {utt} to a .wav file")
                spk = utt2spk.get(utt)
                if spk is None:
                    raise ValueError(f"{u2s_path} has no speaker for utterance {utt!r} of wav.scp: add a line '{utt} spk-id'")
                if spk < 0:
                    raise ValueError(f"{scp}:{no}: duplicate utterance id {utt!r}: utterance ids must be unique")
                utt2spk[utt] = -1 - spk  # seen (negative), keeps the speaker
                if p.startswith("~"):
                    p = os.path.expanduser(p)
                paths.append((p if os.path.isabs(p) else base + p).encode())
                labels.append(spk)
        except UnicodeDecodeError:
            raise ValueError(f"{scp} is not a text file: it must hold UTF-8 text lines") from None
    if not paths:
        raise ValueError(f"{scp} has no utterances: add lines 'utt-id /path/to.wav'")
    del utt2spk
    names = sorted(spk_ids, key=lambda s: spk_ids[s])
    used = np.unique(np.asarray(labels, dtype=np.int32))
    speakers = sorted(names[i] for i in used)
    remap = np.full(len(names), -1, dtype=np.int32)
    remap[[spk_ids[s] for s in speakers]] = np.arange(len(speakers), dtype=np.int32)
    return TrainList(path=d, paths=PathTable(paths), labels=remap[np.asarray(labels, dtype=np.int32)],
                     speakers=speakers)


def read_audio_list(spec: str | Path, key: str) -> PathTable:
    """Paths of a Kaldi dir (its wav.scp) or of a wav.scp file, for noise_data / rir_data.
    Only the first file is opened here (its sample rate is checked)."""
    p = Path(spec).expanduser()
    scp = p / "wav.scp" if p.is_dir() else p
    if not scp.is_file():
        raise ValueError(f"{key}={spec}: no such Kaldi dir or wav.scp: pass a dir holding wav.scp "
                         f"('id /path/to.wav' lines) or the wav.scp itself")
    paths = []
    for _, (_, path) in _fields(scp, "id /path/to.wav", maxsplit=1):
        q = Path(path).expanduser()
        paths.append(str(q if q.is_absolute() else scp.parent / q).encode())
    if not paths:
        raise ValueError(f"{key}={spec}: {scp} lists no files: add lines 'id /path/to.wav'")
    table = PathTable(paths)
    try:
        audio_info(table[0])
    except AudioReadError as e:
        raise ValueError(f"{key}={spec}: {e}: fix the path in {scp}") from None
    return table
