"""``python -m pipeline evaluate``: EER/minDCF of a saved checkpoint."""
from __future__ import annotations

from typing import Any, Optional

from . import checkpoint as ckpt
from .config import load_config
from .data import Fbank
from .evaluate import evaluate_dir
from .models import build_model
from .build import resolve_data, resolve_device


def evaluate_checkpoint(path: str, data: Optional[str] = None, device: str = "auto",
                        trust_pickle: bool = False) -> dict[str, Any]:
    state = ckpt.load(path, trust_pickle=trust_pickle)
    cfg = load_config(values=state["config"])
    dev = resolve_device(device)
    model = build_model(channels=cfg.channels, embed_dim=cfg.embed_dim, scale=cfg.scale,
                        output_dim=cfg.output_dim, hidden_dim=cfg.hidden_dim, nlayers=cfg.head_layers)
    model.load_state_dict(state["teacher"])
    model.to(dev).eval()
    if data is None:
        _, eval_dir = resolve_data(cfg)
        if eval_dir is None:
            raise ValueError("the run has no evaluation data (eval_data is empty): pass --data <kaldi dir with trials>")
    else:
        eval_dir = data
    res = evaluate_dir(lambda x: model.backbone(x), eval_dir, device=dev, fbank=Fbank().to(dev))
    return {"checkpoint": str(path), "step": int(state["step"]), "data": str(eval_dir), **res}
