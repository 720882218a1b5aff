"""The built-in synthetic speaker corpus: speaker traits, source-filter synthesis of utterances,
trial lists, and :func:`ensure_synthetic_corpus` (generated once into a locked, cached root).

The WAVs are written with the stdlib ``wave`` module. Same seed and parameters give
byte-identical files: every random draw comes from a generator seeded by (seed, purpose,
speaker, utterance), in a fixed order.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import wave
from pathlib import Path

import numpy as np
from scipy.signal import istft, stft

from .audio import SAMPLE_RATE

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
    noise = colored_noise(rng, n_samples, exponent=float(rng.choice(_NOISE_EXPONENTS)))
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


def colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
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
