"""The SDPN training set: one item = ``glb_num`` global and ``local_num`` local augmented crops
of one utterance, as Fbank features. Items stream from disk (only the crop windows are read)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.signal import fftconvolve

from .audio import AudioFormatError, AudioReadError, audio_info, read_audio, read_crops
from .features import Fbank, num_samples_for_frames
from .kaldi import read_audio_list, read_train_list
from .synthetic import colored_noise

_MAX_TRIES = 8  # replacements tried for one item before the run is declared broken


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
            return colored_noise(rng, length, exponent=float(kind)).astype(np.float32)
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
