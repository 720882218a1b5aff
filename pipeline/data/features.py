"""Waveforms to features: :func:`load_wav` (a whole file as a tensor) and :class:`Fbank`, the
80-dim log-mel filterbank (framing + ``torch.fft.rfft`` + a triangular mel matrix)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .audio import read_audio

def load_wav(path: str | Path) -> torch.Tensor:
    """Read a whole mono 16 kHz file (WAV of any PCM depth or float, FLAC, ... via soundfile)
    -> float32 tensor (samples,) in [-1, 1]. Problems raise a one-line ValueError."""
    return torch.from_numpy(read_audio(path))



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
