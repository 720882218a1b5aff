"""Speaker-verification evaluation: embeddings per utterance, cosine trial scores, EER, minDCF."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_curve

from .data import Fbank, KaldiDir, load_wav, read_kaldi_dir

EmbedFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T, n_mels) -> (B, D)


def _check_scores(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"got {s.size} scores but {y.size} labels: pass one label per score")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 1 (target) or 0 (nontarget), got values {sorted(set(y.tolist()))[:5]}")
    n_t = int((y == 1).sum())
    if n_t == 0 or n_t == y.size:
        raise ValueError(f"trials have only {'target' if n_t else 'nontarget'} pairs ({y.size} trials): "
                         f"EER/minDCF need both target (1) and nontarget (0) trials")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite: check the embeddings")
    return s, y.astype(np.int64)


def _error_rates(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """P_fa and P_miss over all thresholds (from accept-none to accept-all)."""
    s, y = _check_scores(scores, labels)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr, 1.0 - tpr


def compute_eer(scores, labels) -> float:
    """Equal error rate in [0, 1], where P_miss = P_fa on the ROC (linear interpolation
    between the two operating points around the crossing). Labels: 1 target, 0 nontarget."""
    p_fa, p_miss = _error_rates(scores, labels)
    d = p_miss - p_fa  # decreases from 1 to -1 along the thresholds
    i = int(np.argmax(d <= 0))  # first point at or past the crossing (d[-1] = -1, so it exists)
    if d[i] == 0 or i == 0:
        return float(p_fa[i])
    t = d[i - 1] / (d[i - 1] - d[i])  # fraction of the segment where d reaches 0
    return float(p_fa[i - 1] + t * (p_fa[i] - p_fa[i - 1]))


def compute_min_dcf(scores, labels, p_target: float = 0.05, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised minimum detection cost (NIST SRE / VoxSRC definition).

    DCF(th) = c_miss * p_target * P_miss(th) + c_fa * (1 - p_target) * P_fa(th), minimised over
    thresholds and divided by C_default = min(c_miss * p_target, c_fa * (1 - p_target)), the
    cost of the best threshold-free system (accept all or reject all). Hence in [0, 1]; 0 for
    perfectly separated scores. VoxCeleb papers (and SDPN) report p_target = 0.05 (or 0.01).
    """
    if not 0.0 < p_target < 1.0 or c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"need 0 < p_target < 1 and positive costs, got p_target={p_target}, "
                         f"c_miss={c_miss}, c_fa={c_fa}")
    p_fa, p_miss = _error_rates(scores, labels)
    dcf = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    c_def = min(c_miss * p_target, c_fa * (1.0 - p_target))
    return float(dcf.min() / c_def)


@torch.no_grad()
def extract_embeddings(embed_fn: EmbedFn, data: KaldiDir, fbank: Fbank, device: str | torch.device = "cpu",
                       max_seconds: Optional[float] = None,
                       utts: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """utt -> (D,) float CPU embedding, one full-length utterance at a time (optionally cut to
    the first ``max_seconds``). ``utts`` restricts extraction (default: every utterance of
    ``data``). Put the model in eval mode before calling (BatchNorm with batch size 1)."""
    fbank = fbank.to(device)
    max_samples = None if max_seconds is None else max(int(max_seconds * 16000), fbank.win_length)
    out: dict[str, torch.Tensor] = {}
    for utt in (data.wavs if utts is None else utts):
        if utt not in data.wavs:
            raise ValueError(f"utterance {utt!r} is not in {data.path}/wav.scp: extract only listed utterances")
        wav = load_wav(data.wavs[utt])
        if max_samples is not None:
            wav = wav[:max_samples]
        if wav.numel() < fbank.win_length:  # too short for one frame: repeat
            wav = wav.repeat(fbank.win_length // wav.numel() + 1)
        feats = fbank(wav.to(device))[None]  # (1, T, n_mels)
        emb = embed_fn(feats)  # (1, D)
        if emb.dim() != 2 or emb.shape[0] != 1:
            raise ValueError(f"embed_fn must map (B, T, n_mels) to (B, D), got {tuple(emb.shape)} "
                             f"for input {tuple(feats.shape)}")
        out[utt] = emb[0].detach().float().cpu()
    return out


def score_trials(embeddings: dict[str, torch.Tensor],
                 trials: Sequence[tuple[int, str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and labels (both (N,)) of (label, enroll, test) trials."""
    if len(trials) == 0:
        raise ValueError("no trials to score: add a trials file with lines 'label enroll-utt test-utt'")
    names = sorted({u for _, a, b in trials for u in (a, b)})
    missing = [u for u in names if u not in embeddings]
    if missing:
        raise ValueError(f"trial utterance {missing[0]!r} has no embedding ({len(missing)} missing): "
                         f"extract embeddings for every utterance named in the trials")
    index = {u: i for i, u in enumerate(names)}
    emb = torch.stack([embeddings[u].reshape(-1).float().cpu() for u in names])  # (U, D)
    emb = torch.nn.functional.normalize(emb, dim=1)
    a = torch.tensor([index[t[1]] for t in trials])
    b = torch.tensor([index[t[2]] for t in trials])
    scores = (emb[a] * emb[b]).sum(1).numpy().astype(np.float64)
    labels = np.array([int(t[0]) for t in trials], dtype=np.int64)
    return scores, labels


def evaluate_embeddings(embeddings: dict[str, torch.Tensor],
                        trials: Sequence[tuple[int, str, str]]) -> dict[str, float]:
    """{"eer", "min_dcf" (p_target 0.05)} of cosine scoring."""
    scores, labels = score_trials(embeddings, trials)
    return {"eer": compute_eer(scores, labels), "min_dcf": compute_min_dcf(scores, labels)}


def evaluate_dir(embed_fn: EmbedFn, data_dir: str | Path, device: str | torch.device = "cpu",
                 fbank: Optional[Fbank] = None) -> dict[str, float]:
    """Read a data dir (trials required), embed the utterances its trials name, score.
    Returns {"eer", "min_dcf", "num_trials"}."""
    data = read_kaldi_dir(data_dir, require_trials=True)
    needed = list(dict.fromkeys(u for _, a, b in data.trials for u in (a, b)))
    emb = extract_embeddings(embed_fn, data, fbank or Fbank(), device=device, utts=needed)
    res = evaluate_embeddings(emb, data.trials)
    res["num_trials"] = len(data.trials)
    return res
