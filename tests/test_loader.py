"""Streaming audio and the training loader: formats, sample-rate errors, determinism across
num_workers and resume, skipped files and max_bad_files, noise/RIR augmentation, amp."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT, Recorder, wandb_summary
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import SDPNTrainSet, load_wav, read_train_list
from pipeline.loader import TrainFeed
from pipeline.train import train

TINY = ROOT / "experiments/sdpn_tiny.yaml"


def _tone(n: int, f: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * f * np.arange(n) / 16000) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _kaldi_dir(root: Path, n_spk: int = 4, per_spk: int = 4, subtype: str = "PCM_16", ext: str = "wav",
               seconds: float = 1.0) -> Path:
    """A Kaldi dir of n_spk x per_spk short files written with soundfile."""
    (root / "wav").mkdir(parents=True, exist_ok=True)
    scp, u2s = [], []
    for s in range(n_spk):
        for u in range(per_spk):
            utt = f"s{s}-u{u}"
            p = root / "wav" / f"{utt}.{ext}"
            sf.write(str(p), _tone(int(seconds * 16000), 150.0 + 60 * s + 7 * u, s * 10 + u), 16000, subtype=subtype)
            scp.append(f"{utt} {p}\n")
            u2s.append(f"{utt} s{s}\n")
    (root / "wav.scp").write_text("".join(scp))
    (root / "utt2spk").write_text("".join(u2s))
    return root


def _feed(ds, workers: int, max_bad: int = 100, **kw) -> TrainFeed:
    return TrainFeed(ds, batch_size=4, per_epoch=len(ds) // 4, seed=3, rank=0, world=1,
                     device=torch.device("cpu"), num_workers=workers, prefetch_factor=2, max_bad_files=max_bad, **kw)


# ------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("subtype, ext", [("PCM_24", "wav"), ("FLOAT", "wav"), ("PCM_16", "flac"), ("PCM_24", "flac")])
def test_formats_are_read(tmp_path, subtype, ext):
    d = _kaldi_dir(tmp_path / "d", n_spk=2, per_spk=2, subtype=subtype, ext=ext)
    x = load_wav(d / "wav" / f"s0-u0.{ext}")
    ref = _tone(16000, 150.0, 0)
    assert x.shape == (16000,) and float((x - torch.from_numpy(ref)).abs().max()) < 1e-4
    item = SDPNTrainSet(d, max_frames=40, local_num=2)[(0, 1)]
    assert item["global"].shape == (1, 40, 80) and torch.isfinite(item["local"]).all()


def test_wrong_sample_rate_is_one_line_error(tmp_path, capsys, micro):
    d = _kaldi_dir(tmp_path / "d", n_spk=2, per_spk=2)
    sf.write(str(d / "wav" / "s0-u0.wav"), _tone(8000, 200.0, 0), 8000, subtype="PCM_16")
    code = main(["train", "--config", str(TINY), *micro, f"data={d}", "eval_data=", "wandb_mode=disabled"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: audio file ") and "s0-u0.wav" in err[0] and "8000 Hz" in err[0]
    assert "sox" in err[0] and "-r 16000" in err[0]
    # also when met in the middle of training (not the first file)
    shutil.copy(d / "wav" / "s0-u0.wav", d / "wav" / "s1-u1.wav")
    sf.write(str(d / "wav" / "s0-u0.wav"), _tone(16000, 200.0, 0), 16000, subtype="PCM_16")
    ds = SDPNTrainSet(d, max_frames=40, local_num=1)
    feed = TrainFeed(ds, batch_size=4, per_epoch=1, seed=0, rank=0, world=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="s1-u1.wav has sample rate 8000 Hz"):
        list(feed.batches(0, 1))


def test_train_list_does_not_open_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "wav.scp").write_text("".join(f"u{i} /nonexistent/{i}.wav\n" for i in range(5000)) + "rel x/rel.flac\n")
    (d / "utt2spk").write_text("".join(f"u{i} spk{i % 7}\n" for i in range(5000)) + "rel spk9\n")
    tl = read_train_list(d)
    assert len(tl.paths) == 5001 and tl.paths[4999] == "/nonexistent/4999.wav"
    assert tl.paths[5000] == str(d / "x/rel.flac")
    assert tl.speakers == sorted(f"spk{i}" for i in (0, 1, 2, 3, 4, 5, 6, 9))
    assert tl.labels.dtype == np.int32 and tl.speakers[tl.labels[5000]] == "spk9" and tl.speakers[tl.labels[8]] == "spk1"
    (d / "wav.scp").write_text("a /x.wav\na /y.wav\n")
    (d / "utt2spk").write_text("a s\n")
    with pytest.raises(ValueError, match="duplicate utterance id 'a'"):
        read_train_list(d)


# ------------------------------------------------------------------------------ determinism

def test_same_batches_and_losses_for_any_num_workers(tmp_path, micro):
    d = _kaldi_dir(tmp_path / "d", n_spk=4, per_spk=4)
    ds = SDPNTrainSet(d, max_frames=40, local_num=2, aug_prob=0.6, seed=3)
    b0 = list(_feed(ds, 0).batches(0, 6))  # 6 steps = 1.5 epochs
    b2 = list(_feed(ds, 2).batches(0, 6))
    assert len(b0) == len(b2) == 6
    for x, y in zip(b0, b2):
        assert torch.equal(x["global"], y["global"]) and torch.equal(x["local"], y["local"])
        assert torch.equal(x["speaker"], y["speaker"])
    # a resume in the middle of the second epoch continues the same sequence
    tail = list(_feed(ds, 1).batches(5, 6))
    assert torch.equal(tail[0]["local"], b0[5]["local"])

    losses = {}
    for w in (0, 2):
        rec = Recorder()
        cfg = load_config(TINY, micro + [f"data={d}", "eval_data=", "wandb_mode=disabled", "monitors=none",
                                         "max_steps=3", f"num_workers={w}", f"exp_dir={tmp_path / f'run{w}'}"])
        train(cfg, extra_monitors=[rec])
        losses[w] = [float(o.loss) for o in rec.outputs]
    assert len(losses[0]) == 3 and losses[0] == losses[2]


# ------------------------------------------------------------------------------ bad files

def test_file_corrupted_after_startup_is_skipped_and_counted(tmp_path, micro, capsys):
    d = _kaldi_dir(tmp_path / "d", n_spk=4, per_spk=4)
    cfg = load_config(TINY, micro + [f"data={d}", "eval_data=", "monitors=none", "max_steps=8", "log_every=2",
                                     "num_workers=1"])
    ds = SDPNTrainSet(d, max_frames=40, local_num=2)
    feed = _feed(ds, 0)
    batches = feed.batches(0, 8)
    next(batches)  # started; now a file breaks
    (d / "wav" / "s2-u1.wav").write_bytes(b"garbage" * 100)
    rest = list(batches)
    assert len(rest) == 7 and feed.skipped_files == 1
    assert all(b["global"].shape == (4, 1, 40, 80) for b in rest)
    err = capsys.readouterr().err
    assert err.count("s2-u1.wav") == 1 and "skipped an unreadable audio file" in err  # printed once

    res = train(cfg)  # through the loop: counted in the result, W&B summary and history
    assert res["data/skipped_files"] == 1
    assert wandb_summary(res["wandb_run_dir"])["data/skipped_files"] == 1

    (d / "wav" / "s3-u0.wav").unlink()
    strict = _feed(SDPNTrainSet(d, max_frames=40, local_num=2), 0, max_bad=1)
    with pytest.raises(ValueError) as e:
        list(strict.batches(0, 8))
    msg = str(e.value)
    assert "\n" not in msg and "more than max_bad_files=1" in msg and "raise max_bad_files" in msg


# ------------------------------------------------------------------------------ augmentation

def test_noise_and_rir_data(tmp_path):
    d = _kaldi_dir(tmp_path / "d", n_spk=2, per_spk=2)
    nz = tmp_path / "noise"
    nz.mkdir()
    rng = np.random.default_rng(0)
    sf.write(str(nz / "n.flac"), (0.1 * rng.standard_normal(24000)).astype(np.float32), 16000)
    (nz / "wav.scp").write_text(f"n1 {nz / 'n.flac'}\n")
    rir = np.zeros(800, dtype=np.float32)
    rir[0], rir[400] = 1.0, 0.7
    sf.write(str(tmp_path / "rir.wav"), rir, 16000, subtype="FLOAT")
    (tmp_path / "rirs.scp").write_text(f"r1 {tmp_path / 'rir.wav'}\n")
    base = SDPNTrainSet(d, max_frames=40, local_num=2, aug_prob=1.0)
    aug = SDPNTrainSet(d, max_frames=40, local_num=2, aug_prob=1.0, noise_data=nz, rir_data=tmp_path / "rirs.scp")
    a, b = base[(0, 1)], aug[(0, 1)]
    assert torch.isfinite(b["global"]).all() and not torch.equal(a["local"], b["local"])
    # reverberation of a known impulse response: x + 0.7 * x delayed, normalised
    x = np.zeros(1000, dtype=np.float32)
    x[10] = 1.0
    y = aug._reverb(np.random.default_rng(0), x, [])
    assert y.shape == x.shape and y[410] / y[10] == pytest.approx(0.7, rel=1e-4)
    with pytest.raises(ValueError, match="noise_data=.*no such Kaldi dir or wav.scp"):
        SDPNTrainSet(d, noise_data=tmp_path / "missing")


# ------------------------------------------------------------------------------ amp

def test_amp_bf16_on_cpu_and_fp16_needs_cuda(tmp_path, micro, capsys):
    rec = Recorder()
    cfg = load_config(TINY, micro + ["eval_data=", "wandb_mode=disabled", "monitors=none", "max_steps=2", "amp=bf16"])
    train(cfg, extra_monitors=[rec])
    assert len(rec.outputs) == 2 and all(torch.isfinite(o.loss) and o.loss.dtype == torch.float32 for o in rec.outputs)
    code = main(["train", "--config", str(TINY), *micro, "eval_data=", "wandb_mode=disabled", "amp=fp16"])
    assert code == 2 and "amp=fp16 needs a CUDA device" in capsys.readouterr().err
