"""The duplicate check of the doctor (PROTO_DUPLICATES): the share of the prototypes that have
another one at cosine > ``dup_cosine``. It is O(K^2 D), so it runs at most every ``dup_every``
steps, compares a subset of rows at large K, and spreads one check over consecutive log intervals
(``dup_pairs_per_log`` similarities each); :class:`~monitors.health.interval_checks.IntervalChecks`
calls it at each interval and judges the fraction when a check finishes."""
from __future__ import annotations

from typing import Optional

import torch

from ..core.cadence import Every
from .settings import DoctorSettings


class DuplicateCheck:
    """One running duplicate check at a time; :meth:`advance` continues it (see the module docstring)."""

    def __init__(self, settings: DoctorSettings) -> None:
        self.settings = settings
        self._cadence = Every(settings.dup_every, "HealthDoctor", "dup_every")  # from the start of the last check
        self._todo: Optional[torch.Tensor] = None  # rows of the running check still to compare
        self._best: list[torch.Tensor] = []        # their best cosine so far, per chunk
        self._k = 0                                # K the running check was drawn for
        self.checked_rows = 0                      # rows of the last finished check

    def due(self, step: int) -> bool:
        """Whether the check runs at the interval ending at ``step`` (one is running, or it is time)."""
        return self._todo is not None or self._cadence.due(step)

    def advance(self, Pf: torch.Tensor, norms: torch.Tensor, step: int) -> Optional[torch.Tensor]:
        """Continue the duplicate check: compare up to ``dup_pairs_per_log`` similarities' worth of
        its rows with every prototype. When its last rows are done, return the 0-dim float64
        fraction of the compared rows with another prototype at cosine > ``dup_cosine``; until
        then None. A check compares at most ``dup_max_rows`` and ``dup_max_pairs / K`` rows, a
        random subset seeded by the step it starts at when K is larger. No (K, D) temporary:
        the (m, K) block of dot products is divided by the norms in place."""
        K = Pf.shape[0]
        if self._todo is None or self._todo.device != Pf.device or self._k != K:
            n = min(K, self.settings.dup_max_rows, max(1, self.settings.dup_max_pairs // K))
            if n < K:
                g = torch.Generator().manual_seed(step)
                idx = torch.randperm(K, generator=g)[:n].to(Pf.device)
            else:
                idx = torch.arange(K, device=Pf.device)
            self._todo, self._best, self._k = idx, [], K
            self._cadence.last = int(step)  # the cadence counts from the start of a check
        inv = norms.clamp_min(1e-12).reciprocal()                     # (K,)
        per_block = max(1, min(self.settings.dup_pairs_per_log, 1 << 24) // K)  # rows per (m, K) block
        budget = max(1, self.settings.dup_pairs_per_log // K)                   # rows this interval
        now, self._todo = self._todo[:budget], self._todo[budget:]
        for chunk in now.split(per_block):
            sim = Pf[chunk] @ Pf.T                                     # (m, K) dot products
            sim.mul_(inv[chunk, None]).mul_(inv[None, :])              # cosines, in place
            sim[torch.arange(chunk.numel(), device=Pf.device), chunk] = -2.0  # not yourself
            self._best.append(sim.amax(dim=1))
        if self._todo.numel():
            return None
        best = torch.cat(self._best)
        self._todo, self._best, self.checked_rows = None, [], best.numel()
        return (best > self.settings.dup_cosine).double().mean()
