"""Evaluation inside a training run: EER/minDCF of the backbone on the evaluation trials (rank 0),
and at the end the head outputs of the same embeddings for ``on_embeddings`` (the t-SNE)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from monitors import MonitorHub, RunContext

from .config import Config
from .data import Fbank, KaldiDir
from .evaluate import evaluate_embeddings, extract_embeddings


class RunEvaluator:
    """``evaluator(model, tag)`` -> ``{"eer", "min_dcf"}`` ({} without evaluation data or off rank 0)."""

    def __init__(self, cfg: Config, eval_data: Optional[KaldiDir], fbank: Fbank, device: torch.device,
                 hub: MonitorHub, ctx: RunContext, rank: int) -> None:
        self.cfg, self.eval_data, self.fbank, self.device = cfg, eval_data, fbank, device
        self.hub, self.ctx, self.rank = hub, ctx, rank

    @property
    def active(self) -> bool:
        return self.eval_data is not None and self.rank == 0

    def __call__(self, model: torch.nn.Module, tag: str) -> dict[str, float]:
        """Before the end only the trials' utterances are embedded; at the end (``tag="final"``)
        all of them, and their head outputs go to on_embeddings (one pass over the audio serves both)."""
        if not self.active:
            return {}
        eval_data = self.eval_data
        was_training = model.training
        model.eval()
        final = tag == "final"
        trial_utts = list(dict.fromkeys(u for _, a, b in eval_data.trials for u in (a, b)))
        emb = extract_embeddings(model.backbone, eval_data, self.fbank, device=self.device,
                                 max_seconds=self.cfg.eval_max_seconds or None,
                                 utts=None if final else trial_utts)       # utt -> (E,)
        res = evaluate_embeddings(emb, eval_data.trials)
        if final:  # the speaker embeddings in the prototypes' space, for the t-SNE
            utts = list(emb)
            with torch.no_grad():  # eval mode: the head maps each row as it would one at a time
                embeddings = model.head(torch.stack([emb[u] for u in utts]).to(self.device))  # (N, D)
            labels = [eval_data.utt2spk[u] for u in utts]
            self.hub.emit_with("on_embeddings", self.ctx, embeddings=embeddings, labels=labels)
        model.train(was_training)
        return res


def report_final(final: dict[str, float], result: dict[str, Any], hub: MonitorHub, step: int) -> str:
    """Log and summarise the final EER/minDCF into ``hub`` and ``result``; returns the line to print."""
    result.update({"eval/eer": final["eer"], "eval/min_dcf": final["min_dcf"]})
    hub.log({"eval/eer": final["eer"], "eval/min_dcf": final["min_dcf"]}, step=step)
    hub.set_summary({"eval/eer": final["eer"], "eval/min_dcf": final["min_dcf"]})
    init_eer = result.get("eval/eer_at_init")
    msg = f"EER after training: {100 * final['eer']:.2f}%  minDCF {final['min_dcf']:.3f}"
    if init_eer:
        msg += f"  (at initialisation {100 * init_eer:.2f}%, ratio {final['eer'] / init_eer:.2f})"
    return msg
