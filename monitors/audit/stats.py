"""Statistics of one prototype table and between two: row norms, non-finite values, the largest
pairwise cosine and near-duplicates (on a fixed row sample at large K), row movement, drift, and
fingerprints that tell whether a group of tensors changed. Everything works in row blocks, so no
(K, K) or second (K, D) temporary is made."""
from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import torch

from ..core.proto_stats import SAMPLE_ABOVE, SAMPLE_ROWS, row_sample

__all__ = ["table_stats", "movement", "relative_distance", "fingerprints", "changed"]

_BLOCK_ROWS = 4096
_GRAM_ROWS = 256


def table_stats(P: torch.Tensor, dup_cosine: float) -> dict[str, float | int | bool]:
    """Row norms (mean, min, max), non-finite values, the largest cosine between two different
    prototypes and the number with a near-duplicate (cosine > ``dup_cosine``), of all rows up to
    SAMPLE_ABOVE prototypes, else of a fixed evenly spaced sample of SAMPLE_ROWS (``sampled``)."""
    K = P.shape[0]
    norms = P.norm(dim=1)  # (K,)
    nonfinite = sum(int((~torch.isfinite(P[i:i + _BLOCK_ROWS])).sum()) for i in range(0, K, _BLOCK_ROWS))
    idx = row_sample(K, SAMPLE_ABOVE, SAMPLE_ROWS, torch.device("cpu"))
    S = P if idx is None else P[idx]
    S = torch.nan_to_num(S, nan=0.0, posinf=0.0, neginf=0.0)
    S = S / S.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (m, D)
    m = S.shape[0]
    best = torch.full((m,), -1.0)
    for i in range(0, m, _GRAM_ROWS):
        block = S[i:i + _GRAM_ROWS] @ S.T  # (b, m): 4 MiB at m = 4,096
        block[torch.arange(block.shape[0]), torch.arange(i, i + block.shape[0])] = -1.0  # not itself
        best[i:i + _GRAM_ROWS] = block.max(dim=1).values
    finite = torch.isfinite(norms)
    return {
        "norm_mean": float(norms[finite].mean()) if finite.any() else float("nan"),
        "norm_min": float(norms[finite].min()) if finite.any() else float("nan"),
        "norm_max": float(norms[finite].max()) if finite.any() else float("nan"),
        "nonfinite": nonfinite,
        "max_cosine": float(best.max()) if m > 1 else float("nan"),
        "duplicates": int((best > dup_cosine).sum()),
        "dup_rows": m,
        "sampled": idx is not None,
    }


def movement(P: torch.Tensor, prev: torch.Tensor) -> dict[str, float]:
    """Per-row change from ``prev``: mean and max of the row norms of P - prev, the share of rows
    exactly unchanged, and ||P - prev|| / ||prev||."""
    total, unchanged, rmax, rsum = 0.0, 0, 0.0, 0.0
    for i in range(0, P.shape[0], _BLOCK_ROWS):
        d = (P[i:i + _BLOCK_ROWS] - prev[i:i + _BLOCK_ROWS]).norm(dim=1)
        d = torch.nan_to_num(d, nan=float("inf"))
        unchanged += int((d == 0).sum())
        rmax = max(rmax, float(d.max()))
        rsum += float(d.sum())
        total += float((d.double() ** 2).sum())
    K = P.shape[0]
    return {"delta_mean": rsum / K, "delta_max": rmax, "unchanged": unchanged / K,
            "delta_relative": total ** 0.5 / max(float(prev.norm()), 1e-12)}


def relative_distance(P: torch.Tensor, ref: torch.Tensor) -> float:
    """||P - ref|| / ||ref|| (drift from the first checkpoint, student-teacher distance)."""
    total = 0.0
    for i in range(0, P.shape[0], _BLOCK_ROWS):
        total += float(((P[i:i + _BLOCK_ROWS] - ref[i:i + _BLOCK_ROWS]).double() ** 2).sum())
    return total ** 0.5 / max(float(ref.norm()), 1e-12)


def fingerprints(tensors: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
    """A digest of each tensor's bytes (read once; no copy of a contiguous tensor)."""
    out = {}
    for path, t in tensors.items():
        t = t.detach().contiguous().reshape(-1)
        h = hashlib.blake2b(digest_size=16)
        h.update(str((t.dtype, t.numel())).encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
        out[path] = h.digest()
    return out


def changed(now: Mapping[str, bytes], before: Optional[Mapping[str, bytes]]) -> Optional[tuple[int, int]]:
    """(tensors changed, tensors compared) between two fingerprint sets; None when nothing compares."""
    if before is None:
        return None
    common = [p for p in now if p in before]
    if not common:
        return None
    return sum(now[p] != before[p] for p in common), len(common)
