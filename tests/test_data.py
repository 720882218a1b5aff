"""Tests of pipeline.data: synthetic corpus, Kaldi dir parsing, WAV I/O, Fbank, SDPNTrainSet."""
from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import (SAMPLE_RATE, Fbank, KaldiDir, SDPNTrainSet, ensure_synthetic_corpus,
                           load_wav, num_samples_for_frames, read_kaldi_dir)

TINY = dict(num_train_speakers=3, num_eval_speakers=2, utts_per_speaker=2, utt_seconds=1.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return ensure_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=0, **TINY)


def _scp_rel(d: Path) -> str:
    """wav.scp with the (absolute, root-dependent) paths made relative to the data dir."""
    return (d / "wav.scp").read_text().replace(str(d) + os.sep, "")


def _write_wav(path: Path, data: np.ndarray, rate: int = SAMPLE_RATE, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def _make_dir(root: Path, scp: str | None = "a {wav}\nb {wav}\n", utt2spk: str | None = "a s1\nb s2\n",
              trials: str | None = None) -> Path:
    """A small Kaldi dir whose utterances all point to one valid WAV."""
    root.mkdir(parents=True, exist_ok=True)
    wav = _write_wav(root / "x.wav", (np.sin(np.arange(8000) / 5) * 3000).astype("<i2"))
    if scp is not None:
        (root / "wav.scp").write_text(scp.format(wav=wav))
    if utt2spk is not None:
        (root / "utt2spk").write_text(utt2spk)
    if trials is not None:
        (root / "trials").write_text(trials)
    return root


# ------------------------------------------------------------------------------ corpus

def test_corpus_layout_and_format(corpus):
    tr, ev = read_kaldi_dir(corpus["train"], require_trials=True), read_kaldi_dir(corpus["eval"], require_trials=True)
    assert isinstance(tr, KaldiDir) and len(tr.wavs) == 6 and len(ev.wavs) == 4
    assert len(tr.speakers) == 3 and len(ev.speakers) == 2
    assert not set(tr.speakers) & set(ev.speakers), "train and eval speakers must be disjoint"
    for kd in (tr, ev):
        assert all(p.is_absolute() for p in kd.wavs.values())
        labels = [t[0] for t in kd.trials]
        assert 0 < sum(labels) < len(labels)  # both classes, balanced
        assert sum(labels) * 2 == len(labels)
        for lab, a, b in kd.trials:
            assert (kd.utt2spk[a] == kd.utt2spk[b]) == bool(lab)
    with wave.open(str(next(iter(ev.wavs.values())))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert 0.75 * 16000 <= w.getnframes() <= 1.25 * 16000
    x = load_wav(next(iter(ev.wavs.values())))
    assert x.dtype == torch.float32 and x.dim() == 1 and x.abs().max() <= 1.0 and x.std() > 1e-3


def test_corpus_deterministic_and_seed_dependent(corpus, tmp_path):
    again = ensure_synthetic_corpus(tmp_path / "again", seed=0, **TINY)
    other = ensure_synthetic_corpus(tmp_path / "other", seed=1, **TINY)
    for split in ("train", "eval"):
        a, b = corpus[split], again[split]
        assert _scp_rel(a) == _scp_rel(b)
        for name in ("utt2spk", "trials"):
            assert (a / name).read_text() == (b / name).read_text()
        for wav in sorted((a / "wav").iterdir()):
            assert wav.read_bytes() == (b / "wav" / wav.name).read_bytes()
    wav = sorted((corpus["eval"] / "wav").iterdir())[0]
    assert wav.read_bytes() != (other["eval"] / "wav" / wav.name).read_bytes()


def test_corpus_cached_and_regenerated_on_new_params(tmp_path):
    dirs = ensure_synthetic_corpus(tmp_path, seed=0, **TINY)
    wav = sorted((dirs["eval"] / "wav").iterdir())[0]
    stamps = (os.stat(tmp_path / "corpus.json").st_mtime_ns, os.stat(wav).st_mtime_ns)
    assert ensure_synthetic_corpus(tmp_path, seed=0, **TINY) == dirs
    assert (os.stat(tmp_path / "corpus.json").st_mtime_ns, os.stat(wav).st_mtime_ns) == stamps
    dirs2 = ensure_synthetic_corpus(tmp_path, seed=0, **{**TINY, "utts_per_speaker": 3})
    assert dirs2 == dirs and len(read_kaldi_dir(dirs2["eval"]).wavs) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build")]


def test_corpus_refuses_foreign_dirs_and_bad_params(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not written by ensure_synthetic_corpus"):
        ensure_synthetic_corpus(tmp_path, **TINY)
    assert (tmp_path / "eval" / "precious.txt").exists()
    with pytest.raises(ValueError, match="utts_per_speaker"):
        ensure_synthetic_corpus(tmp_path / "new", **{**TINY, "utts_per_speaker": 1})


# ------------------------------------------------------------------------------ Fbank

@pytest.mark.parametrize("n", [400, 559, 560, 16000, 16123])
def test_fbank_shapes(n):
    fb = Fbank()
    x = torch.randn(n) * 0.1
    f = fb(x)
    assert f.shape == (1 + (n - 400) // 160, 80) == (fb.num_frames(n), 80)
    assert fb(torch.stack([x, x * 0.5])).shape == (2, f.shape[0], 80)
    assert torch.isfinite(f).all()
    assert f.mean(0).abs().max() < 1e-4  # per-utterance mean normalisation


def test_fbank_crop_size_formula_and_errors():
    fb = Fbank()
    for frames in (1, 100, 200):
        assert fb(torch.randn(num_samples_for_frames(frames))).shape[0] == frames
    assert (fb.mel.sum(0) > 0).all(), "every mel filter must cover at least one FFT bin"
    with pytest.raises(ValueError, match="at least 400 samples"):
        fb(torch.randn(399))
    raw = Fbank(mean_norm=False)(torch.randn(4000))
    assert raw.mean() != pytest.approx(0.0, abs=1e-3)


# ------------------------------------------------------------------------------ dataset

def test_train_set_items(corpus):
    ds = SDPNTrainSet(corpus["train"], max_frames=40, glb_num=2, local_num=3, aug_prob=0.5)
    assert len(ds) == 6 and ds.speakers == sorted(ds.speakers) and len(ds.speakers) == 3
    item = ds[1]
    assert item["global"].shape == (2, 40, 80) and item["global"].dtype == torch.float32
    assert item["local"].shape == (3, 20, 80)
    kd = read_kaldi_dir(corpus["train"])
    assert item["speaker"] == ds.speakers.index(kd.utt2spk[list(kd.wavs)[1]]) and item["bad_files"] == []
    torch.manual_seed(3)
    a = ds[(2, 0)]
    torch.manual_seed(4)  # torch's global RNG plays no part: the key (epoch, index) decides
    b = ds[(2, 0)]
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    assert not torch.equal(ds[(3, 0)]["local"], a["local"])  # fresh crops in the next epoch
    assert torch.equal(ds[0]["global"], ds[(0, 0)]["global"])


def test_train_set_wraps_short_utterances(tmp_path):
    d = _make_dir(tmp_path / "d")  # 0.5 s utterances
    ds = SDPNTrainSet(d, max_frames=200, local_num=2, aug_prob=1.0)  # 2 s crops
    item = ds[0]
    assert item["global"].shape == (1, 200, 80) and item["local"].shape == (2, 100, 80)
    assert torch.isfinite(item["global"]).all() and torch.isfinite(item["local"]).all()


def test_train_set_bad_args(corpus):
    with pytest.raises(ValueError, match="aug_prob"):
        SDPNTrainSet(corpus["train"], aug_prob=1.5)
    with pytest.raises(ValueError, match="snr_range"):
        SDPNTrainSet(corpus["train"], snr_range=(20.0, 5.0))


# ------------------------------------------------------------------------------ bad input

def test_read_kaldi_dir_ok_and_relative_paths(tmp_path):
    d = _make_dir(tmp_path / "d", scp="a x.wav\n\nb {wav}\n", trials="1 a a\nnontarget a b\nb a target\n")
    kd = read_kaldi_dir(d, require_trials=True)
    assert list(kd.wavs) == ["a", "b"] and kd.wavs["a"] == d / "x.wav"
    assert kd.trials == [(1, "a", "a"), (0, "a", "b"), (1, "b", "a")]  # the last in Kaldi's column order
    assert kd.speakers == ["s1", "s2"]


@pytest.mark.parametrize("case, needles", [
    ("missing_dir", ["does not exist"]),
    ("not_dir", ["not a directory"]),
    ("no_scp", ["wav.scp is missing"]),
    ("empty_scp", ["has no utterances", "utt-id /path/to.wav"]),
    ("missing_wav", ["'a'", "nope.wav", "wav.scp:1"]),
    ("malformed_scp", ["wav.scp:2", "malformed"]),
    ("dup_scp", ["wav.scp:2", "duplicate", "'a'"]),
    ("no_utt2spk", ["utt2spk is missing"]),
    ("utt2spk_missing_utt", ["utt2spk", "'b'"]),
    ("malformed_utt2spk", ["utt2spk:1", "malformed"]),
    ("trials_required", ["trials is missing"]),
    ("trials_unknown_utt", ["trials:2", "'zz'", "wav.scp"]),
    ("trials_bad_label", ["trials:1", "'yes'", "nontarget"]),
    ("trials_malformed", ["trials:1", "malformed"]),
])
def test_read_kaldi_dir_errors(tmp_path, case, needles):
    d = tmp_path / "d"
    require = False
    if case == "missing_dir":
        pass
    elif case == "not_dir":
        d.write_text("")
    elif case == "no_scp":
        _make_dir(d, scp=None)
    elif case == "empty_scp":
        _make_dir(d, scp="\n")
    elif case == "missing_wav":
        _make_dir(d, scp=f"a {tmp_path / 'nope.wav'}\n")
    elif case == "malformed_scp":
        _make_dir(d, scp="a {wav}\nlonely\n")
    elif case == "dup_scp":
        _make_dir(d, scp="a {wav}\na {wav}\n")
    elif case == "no_utt2spk":
        _make_dir(d, utt2spk=None)
    elif case == "utt2spk_missing_utt":
        _make_dir(d, utt2spk="a s1\n")
    elif case == "malformed_utt2spk":
        _make_dir(d, utt2spk="a s1 extra\n")
    elif case == "trials_required":
        _make_dir(d)
        require = True
    elif case == "trials_unknown_utt":
        _make_dir(d, trials="1 a b\n0 a zz\n")
    elif case == "trials_bad_label":
        _make_dir(d, trials="yes a b\n")
    elif case == "trials_malformed":
        _make_dir(d, trials="1 a\n")
    with pytest.raises(ValueError) as e:
        read_kaldi_dir(d, require_trials=require)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("case, needle", [
    ("garbage", "cannot be read"),
    ("rate", "sample rate 8000"),
    ("stereo", "2 channels"),
    ("empty", "no samples"),
    ("missing", "not found"),
])
def test_load_wav_errors(tmp_path, case, needle):
    p = tmp_path / f"{case}.wav"
    pcm = (np.arange(1600) % 100 * 50).astype("<i2")
    if case == "garbage":
        p.write_bytes(b"this is not a wav file at all" * 10)
    elif case == "rate":
        _write_wav(p, pcm, rate=8000)
    elif case == "stereo":
        _write_wav(p, pcm, channels=2)
    elif case == "8bit":
        _write_wav(p, pcm.astype(np.uint8), width=1)
    elif case == "empty":
        _write_wav(p, pcm[:0])
    with pytest.raises(ValueError) as e:
        load_wav(p)
    assert needle in str(e.value) and p.name in str(e.value)
