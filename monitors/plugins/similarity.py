"""Cosine similarity between prototypes: are they spread out, or collapsing onto each other?"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.base import Metrics, Monitor
from ..core.cadence import Every
from ..core.events import RunContext
from ..core.media import Histogram
from ..core.options import number_in, positive_int


class SimilarityMonitor(Monitor):
    """Off-diagonal statistics of the (K, K) cosine similarity matrix, every ``every_n_steps``.

    ``proto/similarity/max``, ``/mean``, ``/mean_abs`` (over the K(K-1) off-diagonal entries),
    ``/nn_mean`` (mean over prototypes of the cosine to their nearest other prototype),
    ``/duplicates`` (prototypes with another one at cosine > ``dup_threshold``),
    ``/min_distance`` (smallest Euclidean distance between two normalised prototypes), and
    ``proto/similarity/hist`` (at most ``hist_pairs`` fixed off-diagonal pairs) every
    ``hist_every`` steps. For K > ``max_proto`` the statistics are those of a fixed random
    subset of ``max_proto`` prototypes (O(max_proto^2) memory and time).
    """

    name = "similarity"
    metrics = ("proto/similarity/max", "proto/similarity/mean", "proto/similarity/mean_abs",
               "proto/similarity/nn_mean", "proto/similarity/duplicates", "proto/similarity/min_distance",
               "proto/similarity/hist")

    def __init__(self, every_n_steps: int = 10, hist_every: int = 50, max_proto: int = 1024,
                 dup_threshold: float = 0.99, hist_pairs: int = 4096, seed: int = 0) -> None:
        super().__init__(every_n_steps)
        owner = type(self).__name__
        self._hist = Every(hist_every, owner, "hist_every")
        self.max_proto = positive_int(owner, "max_proto", max_proto)
        self.hist_pairs = positive_int(owner, "hist_pairs", hist_pairs)
        self.dup_threshold = number_in(owner, "dup_threshold", dup_threshold, -1.0, 1.0)  # a cosine
        self.seed = int(seed)
        self._subset: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._pairs: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._buffers: dict[str, torch.Tensor] = {}  # X (k, D) and S (k, k), reused

    def _generator(self, device: torch.device) -> torch.Generator:
        # made on the device: indices drawn there need no host-to-device copy (a sync on CUDA)
        return torch.Generator(device=device).manual_seed(self.seed)

    def _rows(self, K: int, device: torch.device) -> Optional[torch.Tensor]:
        """Fixed random subset of max_proto row indices (same every call), or None for all."""
        if K <= self.max_proto:
            return None
        key = (K, device)
        if key not in self._subset:
            idx = torch.randperm(K, generator=self._generator(device), device=device)
            self._subset[key] = idx[: self.max_proto].sort().values
        return self._subset[key]

    def _hist_pairs(self, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed (i, j) index pairs, i != j: all i < j when few enough, else a random sample."""
        key = (k, device)
        if key not in self._pairs:
            if k * (k - 1) // 2 <= self.hist_pairs:
                i, j = torch.triu_indices(k, k, offset=1, device=device)
            else:
                g = self._generator(device)
                i = torch.randint(0, k, (self.hist_pairs,), generator=g, device=device)
                j = (i + torch.randint(1, k, (self.hist_pairs,), generator=g, device=device)) % k
            self._pairs[key] = (i, j)
        return self._pairs[key]

    def _work(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A float32 work buffer kept between calls (a fresh (k, k) matrix per call is costly at large K)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.device != device:
            buf = self._buffers[name] = torch.empty(shape, dtype=torch.float32, device=device)
        return buf

    def on_step_end(self, ctx: RunContext) -> Metrics:
        P = ctx.prototypes.detach()
        rows = self._rows(P.shape[0], P.device)
        k = P.shape[0] if rows is None else rows.shape[0]
        if k < 2 or P.dim() != 2:
            return None
        X = self._work("X", (k, P.shape[1]), P.device)                      # (k, D)
        if rows is None:
            X.copy_(P)
        elif P.dtype == torch.float32:
            torch.index_select(P, 0, rows, out=X)
        else:
            X.copy_(P.index_select(0, rows))
        X.div_(torch.linalg.vector_norm(X, dim=1, keepdim=True).clamp_min_(1e-12))  # F.normalize
        S = torch.mm(X, X.T, out=self._work("S", (k, k), P.device))         # (k, k) cosines
        diag = S.diagonal()
        n_off = k * (k - 1)
        out = {"proto/similarity/mean": (S.sum() - diag.sum()) / n_off}
        if self._hist.fire(ctx.step):
            i, j = self._hist_pairs(k, S.device)
            out["proto/similarity/hist"] = Histogram(S[i, j])                # gather: a copy
        diag.fill_(-2.0)                                  # below any cosine: excluded from max
        nn = S.amax(dim=1)                                # (k,) cosine to nearest other prototype
        s_max = nn.amax()
        diag.zero_()
        out["proto/similarity/mean_abs"] = S.abs_().sum() / n_off
        out["proto/similarity/max"] = s_max
        out["proto/similarity/nn_mean"] = nn.mean()
        out["proto/similarity/duplicates"] = (nn > self.dup_threshold).sum().to(torch.float32)
        out["proto/similarity/min_distance"] = (2.0 - 2.0 * s_max).clamp_min(0.0).sqrt()
        return out
