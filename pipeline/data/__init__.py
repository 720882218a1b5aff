"""Data: a built-in synthetic speaker corpus, Kaldi-style data dirs, WAV I/O, the log-mel
filterbank and the SDPN training dataset (one global + several local augmented crops).

- :mod:`.audio`: audio files read with soundfile, 16 kHz mono (``AudioFormatError``, ``AudioReadError``);
- :mod:`.synthetic`: the built-in corpus (``ensure_synthetic_corpus``);
- :mod:`.kaldi`: Kaldi data dirs (``read_kaldi_dir``, ``read_train_list``, ``read_audio_list``);
- :mod:`.features`: ``load_wav`` and the ``Fbank`` filterbank;
- :mod:`.trainset`: ``SDPNTrainSet``, the streaming multi-crop training set.

Every name is importable from here.
"""
from .audio import SAMPLE_RATE, AudioFormatError, AudioReadError
from .features import Fbank, load_wav, num_samples_for_frames
from .kaldi import KaldiDir, PathTable, TrainList, read_audio_list, read_kaldi_dir, read_train_list
from .synthetic import colored_noise, ensure_synthetic_corpus
from .trainset import SDPNTrainSet

__all__ = [
    "SAMPLE_RATE", "AudioFormatError", "AudioReadError", "Fbank", "KaldiDir", "PathTable", "SDPNTrainSet",
    "TrainList", "colored_noise", "ensure_synthetic_corpus", "load_wav", "num_samples_for_frames",
    "read_audio_list", "read_kaldi_dir", "read_train_list",
]
