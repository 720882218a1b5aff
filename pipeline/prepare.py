"""Corpus preparation: Kaldi data dirs (``wav.scp``, ``utt2spk``, ``spk2utt``, ``trials``) from
an audio tree, without opening the audio (seconds for a million files on a local disk).

- ``voxceleb``: the standard VoxCeleb tree ``idNNNNN/<video>/NNNNN.wav`` (at ROOT, ROOT/wav or
  ROOT/dev/wav); utterance ids ``idNNNNN-<video>-NNNNN``. The official trial lists
  (``veri_test2.txt``: ``1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav``) are
  converted into ``trials`` with ``--trials FILE`` (VoxCeleb1-O/E/H: veri_test2.txt,
  list_test_all2.txt, list_test_hard2.txt).
- ``tree``: any ``speaker/.../*.wav|flac`` tree; the speaker is the first directory; utterance
  ids are the path without extension, ``/`` replaced by ``-``.

    python -m pipeline prepare voxceleb ROOT OUT [--trials veri_test2.txt]
    python -m pipeline prepare tree ROOT OUT [--trials FILE]
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

AUDIO_EXTS = (".wav", ".flac")
_VOX_SPK = re.compile(r"^id\d+$")


def _walk(root: Path, top: list[str]) -> tuple[dict[str, Path], int]:
    """{relative path without extension: file} of the audio under root/<each of top>, and the
    number of .m4a files seen (VoxCeleb2 ships AAC)."""
    files: dict[str, Path] = {}
    m4a = 0
    for spk in top:
        for dirpath, dirnames, filenames in os.walk(root / spk):
            dirnames.sort()
            for name in sorted(filenames):
                stem, ext = os.path.splitext(name)
                ext = ext.lower()
                if ext == ".m4a":
                    m4a += 1
                if ext not in AUDIO_EXTS:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, stem), root).replace(os.sep, "/")
                if rel in files:
                    raise ValueError(f"{root}: {rel} exists as both {files[rel].name} and {name}: keep one of them")
                files[rel] = Path(dirpath, name).resolve()
    return files, m4a


def _utt_id(rel: str) -> str:
    return rel.replace("/", "-")


def _no_audio(root: Path, m4a: int, layout: str) -> ValueError:
    if m4a:
        return ValueError(f"{root} holds {m4a} .m4a files and no .wav/.flac: convert them first, e.g. "
                          f"ffmpeg -i in.m4a -ac 1 -ar 16000 out.wav (VoxCeleb2 ships AAC)")
    return ValueError(f"{root} holds no .wav or .flac files under {layout}: point ROOT at the corpus")


def prepare_voxceleb(root: str | Path, out: str | Path, trials: Optional[str | Path] = None) -> dict[str, int]:
    """Kaldi dir from a VoxCeleb tree; returns counts (utterances, speakers, trials)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"VoxCeleb root {root} is not a directory: pass the folder holding id10001/, id10002/, ... "
                         f"(or its parent with wav/)")
    base = next((c for c in (root, root / "wav", root / "dev" / "wav", root / "test" / "wav", root / "dev" / "aac")
                 if c.is_dir() and any(_VOX_SPK.match(p.name) and p.is_dir() for p in c.iterdir())), None)
    if base is None:
        raise ValueError(f"{root} has no speaker folders idNNNNN/ (nor wav/idNNNNN/): expected the VoxCeleb "
                         f"layout idNNNNN/<video>/NNNNN.wav")
    spks = sorted(p.name for p in base.iterdir() if p.is_dir() and _VOX_SPK.match(p.name))
    files, m4a = _walk(base, spks)
    if not files:
        raise _no_audio(base, m4a, "idNNNNN/<video>/")
    bad = next((r for r in files if r.count("/") != 2), None)
    if bad is not None:
        raise ValueError(f"{base}: {files[bad]} is not at idNNNNN/<video>/NNNNN.wav: "
                         f"use `prepare tree` for other layouts")
    return _write(Path(out), files, lambda rel: rel.split("/", 1)[0], trials, base)


def prepare_tree(root: str | Path, out: str | Path, trials: Optional[str | Path] = None) -> dict[str, int]:
    """Kaldi dir from ``speaker/.../*.wav|flac``; returns counts."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"root {root} is not a directory: pass the folder holding one folder per speaker")
    spks = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not spks:
        raise ValueError(f"{root} has no speaker folders: expected speaker/.../*.wav or *.flac")
    if any(" " in s for s in spks):
        raise ValueError(f"{root}: speaker folder names must not hold spaces (Kaldi ids), e.g. {next(s for s in spks if ' ' in s)!r}")
    files, m4a = _walk(root, spks)
    if not files:
        raise _no_audio(root, m4a, "speaker/.../")
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTS]
    if loose:
        raise ValueError(f"{loose[0]} lies at the top of {root}: every file must be inside its speaker's folder")
    return _write(Path(out), files, lambda rel: rel.split("/", 1)[0], trials, root)


def _write(out: Path, files: dict[str, Path], speaker_of, trials: Optional[str | Path], base: Path) -> dict[str, int]:
    utts: dict[str, tuple[str, Path]] = {}
    for rel, path in files.items():
        if any(c.isspace() for c in rel):
            raise ValueError(f"{path}: file and folder names must not hold whitespace (Kaldi ids): rename it")
        u = _utt_id(rel)
        if u in utts:
            raise ValueError(f"utterance id {u!r} is made by two files ({utts[u][1]} and {path}): rename one")
        utts[u] = (speaker_of(rel), path)
    trial_lines = _convert_trials(Path(trials), files, base) if trials is not None else None
    out.mkdir(parents=True, exist_ok=True)
    order = sorted(utts)
    spk2utt: dict[str, list[str]] = {}
    for u in order:
        spk2utt.setdefault(utts[u][0], []).append(u)
    _atomic_write(out / "wav.scp", "".join(f"{u} {utts[u][1]}\n" for u in order))
    _atomic_write(out / "utt2spk", "".join(f"{u} {utts[u][0]}\n" for u in order))
    _atomic_write(out / "spk2utt", "".join(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items())))
    if trial_lines is not None:
        _atomic_write(out / "trials", "".join(trial_lines))
    return {"utterances": len(utts), "speakers": len(spk2utt), "trials": len(trial_lines or [])}


def _convert_trials(path: Path, files: dict[str, str], base: Path) -> list[str]:
    """``label a/b/c.wav a/b/d.wav`` (official lists) -> ``label utt-a utt-b``."""
    if not path.is_file():
        raise ValueError(f"trial list {path} does not exist: pass --trials veri_test2.txt (lines "
                         f"'1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav')")
    out = []
    for no, ln in enumerate(path.read_text().splitlines(), 1):
        parts = ln.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise ValueError(f"{path}:{no}: malformed trial {ln.strip()!r}: expected '1 id10270/x6uYqmx31kE/00001.wav "
                             f"id10270/8jEAjG6SegY/00008.wav' (label 1 or 0, two paths)")
        ids = []
        for p in parts[1:]:
            rel = os.path.splitext(p)[0]
            if rel not in files:
                raise ValueError(f"{path}:{no}: {p} is not under {base}: is this the trial list of this corpus? "
                                 f"(veri_test2.txt goes with the VoxCeleb1 test or full set)")
            ids.append(_utt_id(rel))
        out.append(f"{parts[0]} {ids[0]} {ids[1]}\n")
    if not out:
        raise ValueError(f"trial list {path} has no trials")
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
