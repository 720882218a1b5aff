"""`python -m pipeline prepare`: a fake VoxCeleb tree with an official-format trial list becomes a
Kaldi dir that an evaluation runs on; a generic speaker tree; one-line errors for bad trees."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import read_kaldi_dir
from pipeline.train import train

TINY = ROOT / "experiments/sdpn_tiny.yaml"
SPEAKERS = ["id10270", "id10271", "id10272"]
VIDEOS = ["x6uYqmx31kE", "8jEAjG6SegY"]


def _fake_voxceleb(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for s, spk in enumerate(SPEAKERS):
        for v in VIDEOS:
            for u in (1, 2):
                p = root / "wav" / spk / v / f"{u:05d}.wav"
                p.parent.mkdir(parents=True, exist_ok=True)
                t = np.arange(16000) / 16000
                x = 0.3 * np.sin(2 * np.pi * (140 + 50 * s) * t) + 0.02 * rng.standard_normal(16000)
                sf.write(str(p), x.astype(np.float32), 16000, subtype="PCM_16")
    lines = ["1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00002.wav",
             "0 id10270/x6uYqmx31kE/00001.wav id10271/8jEAjG6SegY/00001.wav",
             "1 id10271/x6uYqmx31kE/00002.wav id10271/8jEAjG6SegY/00001.wav",
             "0 id10272/x6uYqmx31kE/00001.wav id10271/x6uYqmx31kE/00001.wav"]
    (root / "veri_test2.txt").write_text("\n".join(lines) + "\n")
    return root


def test_prepare_voxceleb_then_evaluate(tmp_path, micro, capsys):
    root = _fake_voxceleb(tmp_path / "vox1")
    out = tmp_path / "data" / "vox1_O"
    assert main(["prepare", "voxceleb", str(root), str(out), "--trials", str(root / "veri_test2.txt")]) == 0
    assert "12 utterances, 3 speakers, 4 trials" in capsys.readouterr().out
    kd = read_kaldi_dir(out, require_trials=True)
    assert len(kd.wavs) == 12 and kd.speakers == SPEAKERS
    assert kd.utt2spk["id10270-x6uYqmx31kE-00001"] == "id10270"
    assert kd.trials[0] == (1, "id10270-x6uYqmx31kE-00001", "id10270-8jEAjG6SegY-00002")
    assert (out / "spk2utt").read_text().splitlines()[0].startswith("id10270 id10270-8jEAjG6SegY-00001 ")
    # an evaluation runs on it (and training reads the same dir)
    cfg = load_config(TINY, micro + [f"data={out}", f"eval_data={out}", "batch_size=4", "max_steps=2",
                                     "monitors=none", "wandb_mode=disabled"])
    res = train(cfg)
    assert 0.0 <= res["eval/eer"] <= 1.0 and 0.0 <= res["eval/eer_at_init"] <= 1.0


def test_prepare_tree_flac(tmp_path, capsys):
    for spk in ("alice", "bob"):
        for i in range(2):
            p = tmp_path / "tree" / spk / "session1" / f"take{i}.flac"
            p.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(p), np.zeros(1600, dtype=np.float32), 16000)
    assert main(["prepare", "tree", str(tmp_path / "tree"), str(tmp_path / "out")]) == 0
    kd = read_kaldi_dir(tmp_path / "out")
    assert list(kd.wavs) == ["alice-session1-take0", "alice-session1-take1", "bob-session1-take0", "bob-session1-take1"]
    assert kd.wavs["bob-session1-take1"].suffix == ".flac" and kd.speakers == ["alice", "bob"]


@pytest.mark.parametrize("case, needle", [
    ("missing", "is not a directory"),
    ("no_speakers", "no speaker folders idNNNNN/"),
    ("m4a", "convert them first, e.g. ffmpeg"),
    ("bad_trial", "is not under"),
    ("malformed_trial", "malformed trial"),
])
def test_prepare_voxceleb_errors(tmp_path, capsys, case, needle):
    root = tmp_path / "vox"
    args = ["prepare", "voxceleb", str(root), str(tmp_path / "out")]
    if case == "no_speakers":
        (root / "speakerA").mkdir(parents=True)
    elif case == "m4a":
        (root / "id00012" / "abc").mkdir(parents=True)
        (root / "id00012" / "abc" / "00001.m4a").write_bytes(b"x")
    elif case in ("bad_trial", "malformed_trial"):
        _fake_voxceleb(root)
        line = "1 id10270/x6uYqmx31kE/00001.wav id19999/zz/00001.wav" if case == "bad_trial" else "1 only-one.wav"
        (root / "t.txt").write_text(line + "\n")
        args += ["--trials", str(root / "t.txt")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
