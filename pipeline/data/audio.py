"""Audio I/O with soundfile (libsndfile): WAV of any PCM depth or float, FLAC, and the other
formats libsndfile reads. Mono, 16 kHz. Two kinds of failure:

- :class:`AudioFormatError` (a ValueError): the file is readable but not usable as it is (wrong
  sample rate, several channels). A configuration problem: training stops with one line that
  names the file and the fix.
- :class:`AudioReadError` (a ValueError): the file cannot be read (missing, corrupt,
  truncated). In the middle of training such a file is skipped and counted (pipeline.loader).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000


class AudioFormatError(ValueError):
    """The file reads, but is not 16 kHz mono: a one-line message with the fix."""


class AudioReadError(ValueError):
    """The file cannot be read (missing, corrupt, truncated)."""


def _check_format(path: Path, f: sf.SoundFile) -> None:
    if f.samplerate != SAMPLE_RATE:
        raise AudioFormatError(
            f"audio file {path} has sample rate {f.samplerate} Hz, the models expect {SAMPLE_RATE} Hz: "
            f"resample the corpus, e.g. sox in.wav -r {SAMPLE_RATE} out.wav "
            f"(or ffmpeg -i in.wav -ar {SAMPLE_RATE} out.wav)")
    if f.channels != 1:
        raise AudioFormatError(f"audio file {path} has {f.channels} channels: it must be mono "
                               f"(e.g. sox in.wav -c 1 out.wav)")
    if f.frames == 0:
        raise AudioReadError(f"audio file {path} has no samples")


def _open(path: Path) -> sf.SoundFile:
    if not path.exists():  # libsndfile only says "System error"
        raise AudioReadError(f"audio file {path} not found")
    try:
        return sf.SoundFile(str(path))
    except FileNotFoundError:
        raise AudioReadError(f"audio file {path} not found") from None
    except (sf.SoundFileError, OSError, RuntimeError) as e:
        why = getattr(e, "error_string", None) or str(e).splitlines()[0]  # libsndfile's, without the path
        raise AudioReadError(f"audio file {path} cannot be read ({why})") from None


def audio_info(path: str | Path) -> int:
    """Number of samples of a 16 kHz mono file (reads the header only)."""
    p = Path(path)
    with _open(p) as f:
        _check_format(p, f)
        return int(f.frames)


def read_audio(path: str | Path) -> np.ndarray:
    """The whole file -> float32 (samples,) in [-1, 1] (16-bit PCM gives x / 32768)."""
    p = Path(path)
    with _open(p) as f:
        _check_format(p, f)
        return _read(p, f, f.frames)


def read_crops(path: str | Path, lengths: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """One random window of each length from one file, reading only those frames (one open,
    one seek + read per window). Files shorter than a window are read whole and wrap-padded.
    Window starts are drawn from ``rng`` (uniform over the valid starts)."""
    p = Path(path)
    out = []
    with _open(p) as f:
        _check_format(p, f)
        n = int(f.frames)
        whole = None
        for length in lengths:
            if n < length:
                if whole is None:
                    whole = _read(p, f, n, start=0)
                w = np.tile(whole, length // n + 1)
                start = int(rng.integers(0, len(w) - length + 1))
                out.append(w[start:start + length].copy())
            else:
                start = int(rng.integers(0, n - length + 1))
                out.append(_read(p, f, length, start=start))
    return out


def _read(p: Path, f: sf.SoundFile, frames: int, start: int = 0) -> np.ndarray:
    try:
        f.seek(start)
        x = f.read(frames, dtype="float32", always_2d=False)
    except (sf.SoundFileError, OSError, RuntimeError) as e:
        raise AudioReadError(f"audio file {p} cannot be read at sample {start} "
                             f"({str(e).splitlines()[0]})") from None
    if len(x) != frames:
        raise AudioReadError(f"audio file {p} is truncated: {len(x)} of {frames} samples read at {start}")
    if not np.isfinite(x).all():
        raise AudioReadError(f"audio file {p} holds non-finite samples")
    return x
