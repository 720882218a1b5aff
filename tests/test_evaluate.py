"""Tests of pipeline.evaluate: EER, minDCF, cosine trial scoring, embedding extraction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import Fbank, ensure_synthetic_corpus, read_kaldi_dir
from pipeline.evaluate import (compute_eer, compute_min_dcf, evaluate_dir, evaluate_embeddings,
                               extract_embeddings, score_trials)


def test_perfect_separation():
    scores = [0.9, 0.8, 0.7, 0.1, 0.0, -0.5]
    labels = [1, 1, 1, 0, 0, 0]
    assert compute_eer(scores, labels) == 0.0
    assert compute_min_dcf(scores, labels) == 0.0
    # perfectly wrong scores
    assert compute_eer([-s for s in scores], labels) == 1.0


def test_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    scores = rng.normal(size=4000)
    assert abs(compute_eer(scores, labels) - 0.5) < 0.05
    dcf = compute_min_dcf(scores, labels)
    assert 0.9 < dcf <= 1.0


def test_hand_computed():
    # Thresholds give (P_fa, P_miss): (0,1) (0,2/3) (0,1/3) (1/2,1/3) (1/2,0) (1,0).
    # The ROC crosses P_miss = P_fa on the segment (0,1/3)-(1/2,1/3): EER = 1/3.
    # minDCF(p=0.05) = min over points of (0.05 P_miss + 0.95 P_fa) / 0.05 = P_miss + 19 P_fa = 1/3.
    scores, labels = [5, 4, 3, 2, 1], [1, 1, 0, 1, 0]
    assert compute_eer(scores, labels) == pytest.approx(1 / 3)
    assert compute_min_dcf(scores, labels) == pytest.approx(1 / 3)
    # p_target 0.5: cost (P_miss + P_fa) / 1 -> best point (0, 1/3) or (1/2, 0) -> 1/3
    assert compute_min_dcf(scores, labels, p_target=0.5) == pytest.approx(1 / 3)
    # an exact crossing at a point: (1/3, 1/3)
    assert compute_eer([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 1, 0, 1, 0, 0]) == pytest.approx(1 / 3)


def test_metric_bad_input():
    with pytest.raises(ValueError, match="only target"):
        compute_eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="only nontarget"):
        compute_min_dcf([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="2 labels"):
        compute_eer([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        compute_eer([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="p_target"):
        compute_min_dcf([0.1, 0.2], [0, 1], p_target=1.0)


def test_score_trials_cosine_and_errors():
    emb = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0, 0.0]), "c": torch.tensor([0.0, 3.0])}
    trials = [(1, "a", "b"), (0, "a", "c"), (0, "b", "c")]
    scores, labels = score_trials(emb, trials)
    np.testing.assert_allclose(scores, [1.0, 0.0, 0.0], atol=1e-6)
    assert labels.tolist() == [1, 0, 0]
    assert evaluate_embeddings(emb, trials) == {"eer": 0.0, "min_dcf": 0.0}
    with pytest.raises(ValueError, match="'zz' has no embedding"):
        score_trials(emb, trials + [(1, "a", "zz")])
    with pytest.raises(ValueError, match="only target"):
        evaluate_embeddings(emb, [(1, "a", "b")])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_synthetic_corpus(tmp_path_factory.mktemp("c"), num_train_speakers=2, num_eval_speakers=3,
                                   utts_per_speaker=2, utt_seconds=1.0)


def _stats_embed(feats: torch.Tensor) -> torch.Tensor:  # (B, T, 80) -> (B, 80)
    return feats.std(dim=1)


def test_extract_embeddings_and_truncation(tiny):
    data = read_kaldi_dir(tiny["eval"])
    seen = []

    def embed(feats):
        seen.append(feats.shape)
        return feats.mean(1) + 1.0

    emb = extract_embeddings(embed, data, Fbank(), max_seconds=0.5)
    assert set(emb) == set(data.wavs) and all(e.shape == (80,) for e in emb.values())
    assert all(s[0] == 1 and s[1] == 1 + (8000 - 400) // 160 and s[2] == 80 for s in seen)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        extract_embeddings(lambda f: f, data, Fbank())


def test_evaluate_dir(tiny, tmp_path):
    res = evaluate_dir(_stats_embed, tiny["eval"])
    assert set(res) == {"eer", "min_dcf", "num_trials"}
    assert 0.0 <= res["eer"] <= 1.0 and 0.0 <= res["min_dcf"] <= 1.0
    assert res["num_trials"] == len(read_kaldi_dir(tiny["eval"]).trials)
    (tmp_path / "d").mkdir()
    for name in ("wav.scp", "utt2spk"):
        (tmp_path / "d" / name).write_text((tiny["eval"] / name).read_text())
    with pytest.raises(ValueError, match="trials is missing"):
        evaluate_dir(_stats_embed, tmp_path / "d")
