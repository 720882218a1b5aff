"""Data: a built-in synthetic speaker corpus, Kaldi-style data dirs, WAV I/O, the log-mel
filterbank and the SDPN training dataset (one global + several local augmented crops).

Audio is read with soundfile (pipeline/audio.py); the synthetic corpus is written with the
stdlib ``wave`` module; the filterbank is framing + ``torch.fft.rfft`` + a triangular mel
matrix. The training set streams: each item reads only its crop windows from disk.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.signal import fftconvolve, istft, stft

from .audio import SAMPLE_RATE, AudioFormatError, AudioReadError, audio_info, read_audio, read_crops


# =============================================================================================
# Synthetic corpus
# =============================================================================================

#: bump when the synthesiser changes so that cached corpora are regenerated
_GENERATOR_VERSION = 1
_MANIFEST = "corpus.json"
_MARKER = ".synthetic_corpus"  # present in every split dir this module wrote (safe to replace)

# Reference (adult, neutral vocal-tract length) formant targets F1-F3 in Hz.
_VOWELS = np.array([
    [280, 2250, 2900], [400, 1900, 2550], [450, 2050, 2650], [550, 1800, 2500],
    [700, 1650, 2450], [750, 1200, 2500], [550, 850, 2450], [450, 850, 2400],
    [450, 1050, 2300], [320, 850, 2250], [620, 1200, 2550], [500, 1450, 2500],
], dtype=np.float64)
_NASAL = np.array([250.0, 1100.0, 2300.0])
_BASE_BW = np.array([60.0, 80.0, 120.0, 180.0, 250.0])  # formant bandwidths, Hz
# Fricative noise shapes: (centre Hz, bandwidth Hz) of a broad resonance; 0 = flat ("f").
_FRICATIVES = np.array([[6000.0, 2500.0], [3200.0, 1500.0], [0.0, 0.0]])

_N_FFT, _HOP = 512, 256  # synthesis STFT: 32 ms frames, 16 ms hop (= control rate)

# Difficulty knobs (tuned so that mean-log-mel cosine scoring gives roughly 20-30 % EER).
_SPK_SPREAD = 2.0  # scales the between-speaker spread of VTL, idiolect, F4/F5, spectral dips, tilt
_F0_SD, _F0_RANGE_ST, _F0_UTT_SD = 0.22, (1.0, 3.0), 0.03  # speaker log-F0 sd, intonation, per-take shift
_P_PAUSE, _P_NASAL, _P_FRIC = 0.05, 0.12, 0.12  # segment probabilities (the rest are vowels)
# Session (per-utterance) variability: channel EQ sd (dB), vocal-effort tilt sd (dB/oct),
# probability of a band-limited (5-8 kHz low-pass) channel, background noise SNR and colour.
_CHANNEL_DB, _TILT_UTT_SD, _LOWPASS_PROB = 1.5, 0.5, 0.25
_SNR_DB = (20.0, 45.0)
_NOISE_EXPONENTS = (1.0, 1.5, 2.0)  # 1/f**e: pink .. brown (room-like)
_LEVEL_DB = (-28.0, -18.0)  # speech RMS, dBFS


def _resonance(f: np.ndarray, fc: np.ndarray, bw: np.ndarray) -> np.ndarray:
    """|H(f)| of a 2-pole resonator at fc with bandwidth bw, unit gain at DC (broadcasts)."""
    b2 = (bw / 2.0) ** 2
    return (fc ** 2 + b2) / np.sqrt(((f - fc) ** 2 + b2) * ((f + fc) ** 2 + b2))


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Hann-kernel moving average along axis 0 (edge-padded), for smooth transitions."""
    if width <= 1:
        return x
    k = np.hanning(width + 2)[1:-1]
    k /= k.sum()
    pad = width // 2
    xp = np.pad(x, [(pad, width - 1 - pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    if x.ndim == 1:
        return np.convolve(xp, k, mode="valid")
    return np.stack([np.convolve(xp[:, j], k, mode="valid") for j in range(x.shape[1])], axis=1)


def _speaker_traits(seed: int, spk_index: int) -> dict:
    """Voice traits of one speaker. Two loose 'voice groups' give overlapping F0 ranges."""
    rng = np.random.default_rng([seed, 1, spk_index])
    s = _SPK_SPREAD
    high = rng.random() < 0.5
    f0 = float(np.exp(rng.normal(np.log(205.0 if high else 120.0), _F0_SD)))
    vtl = float(np.exp(rng.normal(np.log(1.14 if high else 1.0), 0.05 * s)))  # formant scaling
    return {
        "f0": f0,
        "f0_range_st": float(rng.uniform(*_F0_RANGE_ST)),  # intonation spread, semitones
        "vtl": vtl,
        "vowel_offsets": np.exp(rng.normal(0.0, 0.05 * s, size=_VOWELS.shape)),  # idiolect
        "f45": np.array([3500.0, 4500.0]) * vtl * np.exp(rng.normal(0.0, 0.05 * s, size=2)),
        # spectral dips (side-cavity anti-resonances): (centre Hz, width Hz, depth dB)
        "zeros": np.stack([rng.uniform(1200.0, 6000.0, 2), rng.uniform(150.0, 500.0, 2),
                           rng.uniform(3.0, 8.0, 2) * s], axis=1),
        "bw_scale": float(rng.uniform(0.8, 1.5)),
        "tilt_db_oct": float(rng.uniform(-3.0 * s - 1, 1.0 * s + 1)),
        "oq": float(rng.uniform(0.45, 0.8)),  # open quotient of the glottal pulse
        "breath": float(rng.uniform(0.02, 0.25)),  # aspiration noise / voiced ratio
        "jitter": float(rng.uniform(0.003, 0.02)),
        "shimmer": float(rng.uniform(0.02, 0.08)),
        "rate": float(rng.uniform(0.8, 1.25)),  # segment-duration factor
        "fric_db": float(rng.uniform(4.0, 14.0)),  # fricatives this much below vowels
    }


def _segments(rng: np.random.Generator, n_frames: int, rate: float) -> list[tuple[str, int, int]]:
    """Random phone sequence as (kind, index, frames) covering n_frames control frames."""
    ms = 1000.0 * _HOP / SAMPLE_RATE  # one control frame in ms

    def frames(lo_ms: float, hi_ms: float, scale: float = 1.0) -> int:
        return max(2, int(round(rng.uniform(lo_ms, hi_ms) * scale / ms)))

    segs: list[tuple[str, int, int]] = [("pause", 0, frames(30, 250))]
    total = segs[0][2]
    while total < n_frames:
        u = rng.random()
        if u < _P_PAUSE:
            seg = ("pause", 0, frames(100, 360))
        elif u < 1.0 - _P_NASAL - _P_FRIC:
            seg = ("vowel", int(rng.integers(len(_VOWELS))), frames(70, 220, rate))
        elif u < 1.0 - _P_FRIC:
            seg = ("nasal", 0, frames(45, 100, rate))
        else:
            seg = ("fric", int(rng.integers(len(_FRICATIVES))), frames(55, 145, rate))
        segs.append(seg)
        total += seg[2]
    return segs


def _synth_utterance(traits: dict, rng: np.random.Generator, n_samples: int) -> np.ndarray:
    """Source-filter synthesis of one utterance -> float64 waveform in [-1, 1]."""
    sr = SAMPLE_RATE
    n_frames = n_samples // _HOP + 1  # scipy.stft(boundary='zeros') frame k is centred at k*HOP
    vtl = traits["vtl"]

    # ---- per-frame control tracks from the phone sequence ------------------------------------
    formants = np.empty((n_frames, 3))
    voice_amp = np.zeros(n_frames)
    fric_w = np.zeros((n_frames, len(_FRICATIVES)))
    stress = np.zeros(n_frames)
    pos, prev_f = 0, _VOWELS[11] * vtl
    group_start = [0]
    for kind, idx, length in _segments(rng, n_frames, traits["rate"]):
        sl = slice(pos, min(pos + length, n_frames))
        if kind == "vowel":
            prev_f = _VOWELS[idx] * traits["vowel_offsets"][idx] * vtl
            voice_amp[sl] = 1.0
            stress[sl] = rng.normal(0.0, 0.25)
        elif kind == "nasal":
            prev_f = _NASAL * vtl
            voice_amp[sl] = 0.35
        elif kind == "fric":
            fric_w[sl, idx] = 1.0
        else:
            group_start.append(pos)
        formants[sl] = prev_f  # pauses/fricatives keep the last articulation
        pos += length
        if pos >= n_frames:
            break
    formants = _smooth(formants, 3)  # ~50 ms coarticulation
    voice_amp = _smooth(voice_amp * np.exp(_smooth(stress, 3)), 2)
    fric_w = _smooth(fric_w, 2)

    # ---- F0 contour: declination per breath group + smooth random wander ---------------------
    st = traits["f0_range_st"]
    decl = np.zeros(n_frames)
    bounds = sorted(set(group_start)) + [n_frames]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            decl[a:b] = np.linspace(1.0, -1.0, b - a) * rng.uniform(0.3, 1.0)
    wander = _smooth(rng.normal(size=n_frames), 13)
    wander /= wander.std() + 1e-9
    utt_f0 = traits["f0"] * np.exp(rng.normal(0.0, _F0_UTT_SD))
    lf0 = np.log(utt_f0) + (st / 12 * np.log(2)) * (0.6 * wander + 0.8 * decl)
    f0_frames = np.clip(np.exp(lf0), 60.0, 420.0)

    # ---- glottal source: Rosenberg pulse derivative with jitter and shimmer ------------------
    t_frames = np.arange(n_frames) * _HOP
    f0 = np.interp(np.arange(n_samples), t_frames, f0_frames)
    per0 = np.floor(np.cumsum(f0 / sr)).astype(np.int64)
    f0 = f0 * (1.0 + traits["jitter"] * rng.standard_normal(per0[-1] + 2))[per0]
    phase = np.cumsum(f0 / sr)
    period, frac = np.floor(phase).astype(np.int64), phase % 1.0
    tp, tn = 0.65 * traits["oq"], 0.35 * traits["oq"]
    g = np.where(frac < tp, 0.5 * (1 - np.cos(np.pi * frac / tp)),
                 np.where(frac < tp + tn, np.cos(0.5 * np.pi * (frac - tp) / tn), 0.0))
    src = np.diff(g, prepend=0.0) * (1.0 + traits["shimmer"] * rng.standard_normal(period[-1] + 2))[period]
    src /= src.std() + 1e-9
    open_phase = frac < tp + tn
    src += traits["breath"] * rng.standard_normal(n_samples) * (0.4 + 0.6 * open_phase)
    src *= np.interp(np.arange(n_samples), t_frames, voice_amp)
    noise_src = rng.standard_normal(n_samples) * np.interp(np.arange(n_samples), t_frames, fric_w.sum(1))

    # ---- filters in the STFT domain -----------------------------------------------------------
    kw = dict(fs=sr, nperseg=_N_FFT, noverlap=_N_FFT - _HOP, boundary="zeros", padded=True)
    freqs, _, sv = stft(src, **kw)  # (F, T')
    _, _, sf = stft(noise_src, **kw)
    nt = min(sv.shape[1], n_frames)
    f = freqs[:, None]  # (F, 1)
    fc = np.concatenate([formants[:nt], np.broadcast_to(traits["f45"], (nt, 2))], axis=1)  # (T, 5)
    bw = _BASE_BW * traits["bw_scale"] * (1.0 + 0.5 * traits["breath"])
    h_vt = np.prod(_resonance(f[:, :, None].astype(np.float32), fc[None].astype(np.float32),
                                  bw.astype(np.float32)), axis=2)  # (F, T)
    tilt = traits["tilt_db_oct"] + rng.normal(0.0, _TILT_UTT_SD)  # speaker + vocal effort of this take
    gain_db = tilt * np.log2(np.maximum(freqs, 200.0) / 1000.0)
    for fz, wz, dz in traits["zeros"]:
        gain_db -= dz * np.exp(-0.5 * ((freqs - fz) / wz) ** 2)
    h_tilt = 10 ** (gain_db / 20)[:, None]
    fric_shapes = np.stack([np.ones_like(freqs) if c == 0 else
                            _resonance(freqs, c * vtl ** 0.5, b) * (freqs / (c * vtl ** 0.5)) ** 2
                            for c, b in _FRICATIVES])  # (3, F), high-pass-ish resonances
    fric_shapes /= np.sqrt((fric_shapes ** 2).mean(1, keepdims=True))
    h_fric = (fric_w[:nt] @ fric_shapes).T  # (F, T)

    y_v = istft(sv[:, :nt] * h_vt * h_tilt, **{k: kw[k] for k in ("fs", "nperseg", "noverlap")})[1]
    y_f = istft(sf[:, :nt] * h_fric, **{k: kw[k] for k in ("fs", "nperseg", "noverlap")})[1]
    y_v, y_f = y_v[:n_samples], y_f[:n_samples]
    if len(y_v) < n_samples:
        y_v = np.pad(y_v, (0, n_samples - len(y_v)))
        y_f = np.pad(y_f, (0, n_samples - len(y_f)))
    voiced = np.interp(np.arange(n_samples), t_frames, voice_amp) > 0.5
    fric = np.interp(np.arange(n_samples), t_frames, fric_w.sum(1)) > 0.5
    y_v /= np.sqrt(np.mean(y_v[voiced] ** 2)) if voiced.any() else 1.0
    if fric.any():
        y_f *= 10 ** (-traits["fric_db"] / 20) / (np.sqrt(np.mean(y_f[fric] ** 2)) + 1e-9)
    y = y_v + y_f

    # ---- session: random smooth channel EQ, level, background noise ---------------------------
    y = _random_channel(y, rng)
    y *= 10 ** (rng.uniform(*_LEVEL_DB) / 20) / (np.sqrt(np.mean(y ** 2)) + 1e-12)
    noise = _colored_noise(rng, n_samples, exponent=float(rng.choice(_NOISE_EXPONENTS)))
    snr = rng.uniform(*_SNR_DB)
    y += noise * np.sqrt(np.mean(y ** 2) / 10 ** (snr / 10))
    peak = np.abs(y).max()
    return y * (0.95 / peak) if peak > 0.95 else y


def _random_channel(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply a random smooth EQ (+-dB at log-spaced anchors) and band limits: session variability."""
    spec = np.fft.rfft(y)
    freqs = np.fft.rfftfreq(len(y), 1.0 / SAMPLE_RATE)
    anchors = np.geomspace(100.0, 8000.0, 8)
    gains_db = rng.normal(0.0, _CHANNEL_DB, size=len(anchors))
    eq_db = np.interp(np.log(np.maximum(freqs, 50.0)), np.log(anchors), gains_db)
    lo = rng.uniform(50.0, 250.0)
    hi = rng.uniform(5000.0, 8000.0) if rng.random() < _LOWPASS_PROB else 9000.0
    band = 1.0 / np.sqrt(1.0 + (lo / np.maximum(freqs, 1.0)) ** 4) / np.sqrt(1.0 + (freqs / hi) ** 8)
    return np.fft.irfft(spec * 10 ** (eq_db / 20) * band, n=len(y))


def _colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Unit-RMS noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown)."""
    w = rng.standard_normal(n)
    if exponent:
        spec = np.fft.rfft(w)
        fr = np.arange(len(spec), dtype=np.float64)
        fr[0] = 1.0
        w = np.fft.irfft(spec / fr ** (exponent / 2), n=n)
    return w / (w.std() + 1e-12)


def _write_wav(path: Path, y: np.ndarray) -> None:
    pcm = np.clip(np.round(y * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def _make_trials(rng: np.random.Generator, utts: list[str], spk: dict[str, str],
                 max_target: int) -> list[tuple[int, str, str]]:
    """All (or max_target sampled) same-speaker pairs, plus as many different-speaker pairs."""
    pairs_t = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1:] if spk[a] == spk[b]]
    pairs_n = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1:] if spk[a] != spk[b]]
    n = min(len(pairs_t), max_target, len(pairs_n))
    pick_t = sorted(rng.choice(len(pairs_t), size=n, replace=False).tolist())
    pick_n = sorted(rng.choice(len(pairs_n), size=n, replace=False).tolist())
    trials = [(1, *pairs_t[i]) for i in pick_t] + [(0, *pairs_n[i]) for i in pick_n]
    order = rng.permutation(len(trials))
    return [trials[i] for i in order]


def ensure_synthetic_corpus(root: str | Path, seed: int = 0, num_train_speakers: int = 40,
                            num_eval_speakers: int = 20, utts_per_speaker: int = 8,
                            utt_seconds: float = 3.0) -> dict[str, Path]:
    """Generate (once; cached) the built-in synthetic corpus under root; return {"train", "eval"} dirs.

    Layout: ``root/train`` and ``root/eval`` are Kaldi data dirs (``wav.scp`` with absolute
    paths, ``utt2spk``, ``trials``; WAVs in ``<split>/wav/``), 16 kHz 16-bit mono. Speakers
    ``spk0000..`` go to train, the following ``num_eval_speakers`` to eval (disjoint).
    Utterance lengths vary uniformly in [0.75, 1.25] x ``utt_seconds``. Trials: every
    same-speaker pair (at most 1000) plus as many sampled different-speaker pairs.

    Caching: ``root/corpus.json`` (parameters + generator version) is written last. If it
    matches, nothing is touched. If the parameters differ, the corpus is regenerated *in the
    same root* (the old train/eval dirs are replaced; they are only deleted if they carry the
    ``.synthetic_corpus`` marker this function writes, otherwise a ValueError asks for an
    empty root). Same seed and parameters -> byte-identical WAV files. Concurrent callers
    serialise on ``root/.lock`` (the first generates, the others then find the cache).

    Speakers are synthesised by a source-filter model with per-speaker F0 level and range
    (overlapping between speakers), vocal-tract length (formant scaling), per-vowel formant
    idiolect, F4/F5, bandwidths, spectral tilt, open quotient, breathiness, jitter, shimmer,
    speaking rate; utterances by random vowel/nasal/fricative sequences with coarticulation,
    pauses, intonation, plus a random channel EQ and background noise at 20-45 dB SNR.
    """
    if num_train_speakers < 2 or num_eval_speakers < 2:
        raise ValueError(f"need at least 2 train and 2 eval speakers, got {num_train_speakers} and "
                         f"{num_eval_speakers}: raise num_train_speakers/num_eval_speakers")
    if utts_per_speaker < 2:
        raise ValueError(f"utts_per_speaker must be >= 2 to form target trials, got {utts_per_speaker}")
    if not utt_seconds >= 0.2:
        raise ValueError(f"utt_seconds must be >= 0.2 s, got {utt_seconds}")
    root = Path(root).expanduser().resolve()
    params = {"version": _GENERATOR_VERSION, "seed": int(seed), "num_train_speakers": int(num_train_speakers),
              "num_eval_speakers": int(num_eval_speakers), "utts_per_speaker": int(utts_per_speaker),
              "utt_seconds": float(utt_seconds), "sample_rate": SAMPLE_RATE}
    dirs = {"train": root / "train", "eval": root / "eval"}
    if _is_cached(root, dirs, params):  # fast path, works on a read-only root
        return dirs
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # concurrent callers (e.g. DDP ranks) wait here
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _ensure_locked(root, dirs, params)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_cached(root: Path, dirs: dict[str, Path], params: dict) -> bool:
    try:
        old = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return old == params and all((d / "wav.scp").is_file() for d in dirs.values())


def _ensure_locked(root: Path, dirs: dict[str, Path], params: dict) -> dict[str, Path]:
    manifest = root / _MANIFEST
    if _is_cached(root, dirs, params):  # another process generated it while we waited
        return dirs
    for d in dirs.values():
        if d.exists() and not (d / _MARKER).exists():
            raise ValueError(f"{d} exists and was not written by ensure_synthetic_corpus: "
                             f"use an empty or dedicated root for the synthetic corpus")

    seed, n_utt, secs = params["seed"], params["utts_per_speaker"], params["utt_seconds"]
    manifest.unlink(missing_ok=True)
    build = root / f".build-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    spk_offset = {"train": 0, "eval": params["num_train_speakers"]}
    n_spk = {"train": params["num_train_speakers"], "eval": params["num_eval_speakers"]}
    for split_i, (split, final_dir) in enumerate(dirs.items()):
        tmp = build / split
        (tmp / "wav").mkdir(parents=True)
        utts, spk_of = [], {}
        for s in range(spk_offset[split], spk_offset[split] + n_spk[split]):
            traits = _speaker_traits(seed, s)
            spk_id = f"spk{s:04d}"
            for u in range(n_utt):
                rng = np.random.default_rng([seed, 2, s, u])
                n = int(round(secs * rng.uniform(0.75, 1.25) * SAMPLE_RATE))
                utt = f"{spk_id}-utt{u:03d}"
                _write_wav(tmp / "wav" / f"{utt}.wav", _synth_utterance(traits, rng, n))
                utts.append(utt)
                spk_of[utt] = spk_id
        trials = _make_trials(np.random.default_rng([seed, 3, split_i]), utts, spk_of, max_target=1000)
        (tmp / "wav.scp").write_text("".join(f"{u} {final_dir / 'wav' / (u + '.wav')}\n" for u in utts))
        (tmp / "utt2spk").write_text("".join(f"{u} {spk_of[u]}\n" for u in utts))
        (tmp / "trials").write_text("".join(f"{lab} {a} {b}\n" for lab, a, b in trials))
        (tmp / _MARKER).write_text(json.dumps(params) + "\n")
    for split, final_dir in dirs.items():
        shutil.rmtree(final_dir, ignore_errors=True)
        (build / split).rename(final_dir)
    shutil.rmtree(build, ignore_errors=True)
    manifest.write_text(json.dumps(params, indent=1) + "\n")
    return dirs


# =============================================================================================
# Kaldi data dirs and WAV I/O
# =============================================================================================

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
    for no, ln in _lines(scp):
        parts = ln.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{scp}:{no}: malformed line {ln!r}: expected 'utt-id /path/to.wav'")
        utt, p = parts
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
    for no, ln in _lines(u2s_path):
        parts = ln.split()
        if len(parts) != 2:
            raise ValueError(f"{u2s_path}:{no}: malformed line {ln!r}: expected 'utt-id spk-id'")
        if parts[0] in wavs:
            utt2spk[parts[0]] = parts[1]
    missing = [u for u in wavs if u not in utt2spk]
    if missing:
        raise ValueError(f"{u2s_path} has no speaker for utterance {missing[0]!r} of wav.scp "
                         f"({len(missing)} missing): add a line '{missing[0]} spk-id'")
    utt2spk = {u: utt2spk[u] for u in wavs}

    trials: list[tuple[int, str, str]] = []
    tr_path = d / "trials"
    if tr_path.is_file():
        for no, ln in _lines(tr_path):
            parts = ln.split()
            if len(parts) != 3:
                raise ValueError(f"{tr_path}:{no}: malformed line {ln!r}: expected 'label enroll-utt test-utt'")
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


def load_wav(path: str | Path) -> torch.Tensor:
    """Read a whole mono 16 kHz file (WAV of any PCM depth or float, FLAC, ... via soundfile)
    -> float32 tensor (samples,) in [-1, 1]. Problems raise a one-line ValueError."""
    return torch.from_numpy(read_audio(path))


# =============================================================================================
# Features
# =============================================================================================

def _mel_matrix(n_mels: int, n_fft: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """(n_fft//2+1, n_mels) triangular filters on the HTK mel scale, unnormalised."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)
    pts = 700.0 * (10 ** (np.linspace(mel(f_min), mel(f_max), n_mels + 2) / 2595.0) - 1.0)
    fft_f = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)[:, None]
    lo, ce, hi = pts[None, :-2], pts[None, 1:-1], pts[None, 2:]
    fb = np.maximum(0.0, np.minimum((fft_f - lo) / (ce - lo), (hi - fft_f) / (hi - ce)))
    return torch.from_numpy(fb.astype(np.float32))


class Fbank(torch.nn.Module):
    """80-dim log-mel filterbank with per-utterance mean normalisation.

    Kaldi-style framing (no centre padding): frames of ``win_length`` samples every
    ``hop_length``, so T = 1 + (samples - win_length) // hop_length (use
    :func:`num_samples_for_frames` to size crops). Each frame: hamming window, zero-padded
    rFFT of ``n_fft``, power spectrum, HTK-mel triangles over 0-sample_rate/2, log(mel + 1e-6),
    then the mean over time is subtracted (``mean_norm``). Input in [-1, 1].
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000, n_fft: int = 512,
                 win_length: int = 400, hop_length: int = 160, mean_norm: bool = True) -> None:
        super().__init__()
        if win_length > n_fft:
            raise ValueError(f"win_length {win_length} > n_fft {n_fft}: use n_fft >= win_length")
        self.n_mels, self.n_fft, self.win_length, self.hop_length = n_mels, n_fft, win_length, hop_length
        self.mean_norm = mean_norm
        self.register_buffer("window", torch.hamming_window(win_length, periodic=False), persistent=False)
        self.register_buffer("mel", _mel_matrix(n_mels, n_fft, sample_rate, 0.0, sample_rate / 2),
                             persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return 1 + (num_samples - self.win_length) // self.hop_length

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, samples) or (samples,) -> (B, T, n_mels) or (T, n_mels)."""
        squeeze = wav.dim() == 1
        x = wav[None] if squeeze else wav
        if x.dim() != 2:
            raise ValueError(f"Fbank expects (samples,) or (B, samples), got shape {tuple(wav.shape)}")
        if x.shape[-1] < self.win_length:
            raise ValueError(f"Fbank needs at least {self.win_length} samples, got {x.shape[-1]}: "
                             f"pad or drop utterances shorter than {self.win_length / 16000:.3f} s")
        x = x.to(self.window.dtype)
        frames = x.unfold(-1, self.win_length, self.hop_length) * self.window  # (B, T, win)
        spec = torch.fft.rfft(frames, n=self.n_fft)  # (B, T, n_fft//2+1)
        power = spec.real.square() + spec.imag.square()
        feats = torch.log(power @ self.mel + 1e-6)  # (B, T, n_mels)
        if self.mean_norm:
            feats = feats - feats.mean(dim=1, keepdim=True)
        return feats[0] if squeeze else feats


def num_samples_for_frames(frames: int, win_length: int = 400, hop_length: int = 160) -> int:
    """Samples that give exactly ``frames`` Fbank frames: (frames - 1) * hop + win."""
    return (frames - 1) * hop_length + win_length


# =============================================================================================
# SDPN training set
# =============================================================================================


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


class SDPNTrainSet(torch.utils.data.Dataset):
    """Multi-crop views for SDPN: ``glb_num`` global crops of ``max_frames`` frames (teacher) and
    ``local_num`` local crops of ``max_frames // 2`` frames (student), each augmented
    independently with probability ``aug_prob``, then Fbank.

    Augmentation (as 3D-Speaker): additive noise at an SNR drawn from ``snr_range`` dB, from
    ``noise_data`` (a Kaldi dir or a wav.scp of MUSAN-like noise; a random window of a random
    file) or, without it, synthetic white/pink noise or babble of 3-6 corpus crops; and, with
    ``rir_data`` (room impulse responses), reverberation by convolution with a random RIR. One
    of the available kinds per augmented crop, then a random gain of +-6 dB.

    Streaming: an item opens its file once and reads only its crop windows; per utterance only
    the path and the label are held (:class:`TrainList`). Keys are ``(epoch, index)`` (or an
    index, epoch 0); all randomness of an item comes from ``(seed, epoch, index)``, so an item
    is the same in any DataLoader worker, with any number of workers, and after a resume.

    A file that cannot be read (missing, corrupt, truncated) is replaced by another utterance
    drawn from the same generator and reported in the item's ``bad_files``; a file with the
    wrong sample rate or several channels is a configuration error, reported in ``error``
    (pipeline.loader turns both into counts and one-line errors in the training process).
    """

    def __init__(self, data_dir: str | Path, max_frames: int = 400, glb_num: int = 1, local_num: int = 4,
                 aug_prob: float = 0.6, snr_range: tuple[float, float] = (5.0, 20.0), seed: int = 0,
                 noise_data: str | Path | None = None, rir_data: str | Path | None = None) -> None:
        if max_frames < 2:
            raise ValueError(f"max_frames must be >= 2 (local crops have max_frames // 2 frames), got {max_frames}")
        if glb_num < 1 or local_num < 0:
            raise ValueError(f"need glb_num >= 1 and local_num >= 0, got {glb_num} and {local_num}")
        if not 0.0 <= aug_prob <= 1.0:
            raise ValueError(f"aug_prob must be in [0, 1], got {aug_prob}")
        if snr_range[0] > snr_range[1]:
            raise ValueError(f"snr_range must be (low, high) in dB with low <= high, got {snr_range}")
        self.data = read_train_list(data_dir)
        self.max_frames, self.glb_num, self.local_num = max_frames, glb_num, local_num
        self.aug_prob, self.snr_range, self.seed = aug_prob, (float(snr_range[0]), float(snr_range[1])), seed
        self.noises = read_audio_list(noise_data, "noise_data") if noise_data else None
        self.rirs = read_audio_list(rir_data, "rir_data") if rir_data else None
        self.fbank = Fbank()
        self.glb_len = num_samples_for_frames(max_frames)
        self.loc_len = num_samples_for_frames(max_frames // 2)

    def check_first_file(self) -> None:
        """Open the first training file (header only): a wrong sample rate fails before step 1."""
        try:
            audio_info(self.data.paths[0])
        except AudioReadError:
            pass  # found again, skipped and counted, when an item reads it

    @property
    def speakers(self) -> list[str]:
        return self.data.speakers

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels

    def __len__(self) -> int:
        return len(self.data.paths)

    def _noise(self, rng: np.random.Generator, length: int, bad: list) -> np.ndarray:
        if self.noises is not None:
            p = self.noises[int(rng.integers(len(self.noises)))]
            try:
                return read_crops(p, [length], rng)[0]
            except AudioReadError as e:
                bad.append((p, str(e)))  # counted; synthetic noise instead
        kind = rng.integers(3)
        if kind < 2:  # white or pink
            return _colored_noise(rng, length, exponent=float(kind)).astype(np.float32)
        # babble: sum of 3-6 random corpus crops
        b = np.zeros(length, dtype=np.float32)
        for j in rng.integers(len(self), size=int(rng.integers(3, 7))):
            p = self.data.paths[int(j)]
            try:
                b += read_crops(p, [length], rng)[0]
            except AudioReadError as e:
                bad.append((p, str(e)))
        return (b / (b.std() + 1e-8)).astype(np.float32)

    def _reverb(self, rng: np.random.Generator, x: np.ndarray, bad: list) -> np.ndarray:
        p = self.rirs[int(rng.integers(len(self.rirs)))]
        try:
            rir = read_audio(p)
        except AudioReadError as e:
            bad.append((p, str(e)))
            return x
        rir = rir / (np.sqrt(np.sum(rir ** 2)) + 1e-8)
        return fftconvolve(x, rir)[:len(x)].astype(np.float32)  # as 3D-Speaker: full, then cut

    def _augment(self, rng: np.random.Generator, x: np.ndarray, bad: list) -> np.ndarray:
        if rng.random() >= self.aug_prob:
            return x
        if self.rirs is not None and rng.random() < 0.5:
            x = self._reverb(rng, x, bad)
        else:
            snr = rng.uniform(*self.snr_range)
            p_sig = max(float(np.mean(x ** 2)), 1e-8)
            n = self._noise(rng, len(x), bad)
            p_noise = max(float(np.mean(n ** 2)), 1e-8)
            x = x + n * np.float32(np.sqrt(p_sig / (p_noise * 10 ** (snr / 10))))
        return x * np.float32(10 ** (rng.uniform(-6.0, 6.0) / 20))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, int(epoch), int(i)])
        bad: list[tuple[str, str]] = []
        lengths = [self.glb_len] * self.glb_num + [self.loc_len] * self.local_num
        j = int(i)
        for _ in range(_MAX_TRIES):
            p = self.data.paths[j]
            try:
                crops = read_crops(p, lengths, rng)
                break
            except AudioFormatError as e:
                return {"error": str(e)}
            except AudioReadError as e:
                bad.append((p, str(e)))
                j = int(rng.integers(len(self)))  # a replacement from the same generator
        else:
            return {"error": f"{_MAX_TRIES} unreadable audio files in a row, the last {p} ({bad[-1][1]}): "
                             f"check that the paths of {self.data.path}/wav.scp exist and hold audio"}
        try:
            crops = [self._augment(rng, c, bad) for c in crops]
        except AudioFormatError as e:
            return {"error": str(e)}
        glb = np.stack(crops[:self.glb_num])
        out = {"global": self.fbank(torch.from_numpy(glb))}  # (glb_num, max_frames, 80)
        if self.local_num:
            out["local"] = self.fbank(torch.from_numpy(np.stack(crops[self.glb_num:])))  # (local_num, max_frames // 2, 80)
        else:
            out["local"] = torch.zeros(0, self.max_frames // 2, self.fbank.n_mels)
        out["speaker"] = int(self.data.labels[j])
        out["bad_files"] = bad
        return out


_MAX_TRIES = 8  # replacements tried for one item before the run is declared broken


def read_audio_list(spec: str | Path, key: str) -> PathTable:
    """Paths of a Kaldi dir (its wav.scp) or of a wav.scp file, for noise_data / rir_data.
    Only the first file is opened here (its sample rate is checked)."""
    p = Path(spec).expanduser()
    scp = p / "wav.scp" if p.is_dir() else p
    if not scp.is_file():
        raise ValueError(f"{key}={spec}: no such Kaldi dir or wav.scp: pass a dir holding wav.scp "
                         f"('id /path/to.wav' lines) or the wav.scp itself")
    paths = []
    for no, ln in _lines(scp):
        parts = ln.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{scp}:{no}: malformed line {ln!r}: expected 'id /path/to.wav'")
        q = Path(parts[1]).expanduser()
        paths.append(str(q if q.is_absolute() else scp.parent / q).encode())
    if not paths:
        raise ValueError(f"{key}={spec}: {scp} lists no files: add lines 'id /path/to.wav'")
    table = PathTable(paths)
    try:
        audio_info(table[0])
    except AudioReadError as e:
        raise ValueError(f"{key}={spec}: {e}: fix the path in {scp}") from None
    return table
