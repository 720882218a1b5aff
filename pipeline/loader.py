"""The training data loader: a ``torch.utils.data.DataLoader`` over :class:`SDPNTrainSet` that
yields exactly the batches of steps ``start_step .. total_steps - 1``.

What is reproduced: the batch of step ``s`` depends only on ``(seed, s, the data dir, the crop
and augmentation config, rank, world size)``. The utterance order of epoch ``e`` is
``randperm(N, seed * 1000 + e)``, sharded ``[rank::world]``; every crop, noise and gain of an
item comes from ``(seed + rank, e, index)``. So ``num_workers`` (0, 1, 8, ...) does not change
a batch, and a resume at any step, mid-epoch included, continues the very same sequence. (The
losses are then equal up to the nondeterminism of the kernels, exactly on CPU.)

Unreadable files (missing, corrupt, truncated after startup) are skipped by the dataset and
counted here: each distinct path is printed once, ``skipped_files`` goes to W&B and the summary
as ``data/skipped_files``, and more than ``max_bad_files`` of them stop the run with a one-line
error. A wrong sample rate stops it at once. No host-device synchronisation: batches are pinned
(CUDA) and copied with ``non_blocking=True``.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from .data import SDPNTrainSet


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for the steps ``start_step .. total_steps - 1``, across
    epochs (one loader iterator serves the whole run: no worker restart per epoch)."""

    def __init__(self, num_items: int, batch_size: int, per_epoch: int, seed: int, rank: int, world: int,
                 start_step: int, total_steps: int) -> None:
        self.num_items, self.batch_size, self.per_epoch = num_items, batch_size, per_epoch
        self.seed, self.rank, self.world = seed, rank, world
        self.start_step, self.total_steps = start_step, total_steps

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(self.num_items, generator=g)
        return order[self.rank::self.world][: self.per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while step < self.total_steps:
            epoch = step // self.per_epoch
            order = self.epoch_order(epoch).tolist()
            for b in range(step % self.per_epoch, self.per_epoch):
                if step >= self.total_steps:
                    return
                yield [(epoch, i) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
                step += 1

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def collate(items: list[dict]) -> dict[str, Any]:
    """Stack the crops; gather the skipped files; the first configuration error, if any."""
    errors = [it["error"] for it in items if "error" in it]
    if errors:
        return {"error": errors[0]}
    return {
        "global": torch.stack([it["global"] for it in items]),   # (B, g, T, 80)
        "local": torch.stack([it["local"] for it in items]),     # (B, l, T/2, 80)
        "speaker": torch.tensor([it["speaker"] for it in items], dtype=torch.long),
        "bad_files": [b for it in items for b in it["bad_files"]],
    }


class TrainFeed:
    """Builds the DataLoader, counts skipped files, times the wait for data, and holds the small
    state a mid-epoch resume needs (``state_dict()`` goes to ``checkpoint['data']``)."""

    def __init__(self, dataset: SDPNTrainSet, *, batch_size: int, per_epoch: int, seed: int, rank: int,
                 world: int, device: torch.device, num_workers: int = 0, prefetch_factor: int = 2,
                 max_bad_files: int = 100, state: Optional[dict[str, Any]] = None) -> None:
        self.dataset, self.batch_size, self.per_epoch = dataset, batch_size, per_epoch
        self.seed, self.rank, self.world, self.device = seed, rank, world, device
        self.num_workers, self.prefetch_factor, self.max_bad_files = num_workers, prefetch_factor, max_bad_files
        self.bad_paths: dict[str, str] = {}
        self.wait_seconds = 0.0    # total time next() waited for a batch
        self.last_wait_s = 0.0     # of the last batch
        self.batches_seen = 0
        self.load_state_dict(state)

    @property
    def skipped_files(self) -> int:
        return len(self.bad_paths)

    def state_dict(self) -> dict[str, Any]:
        return {"num_items": len(self.dataset), "bad_paths": dict(self.bad_paths), "seed": self.seed}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """The skipped files of a checkpoint's ``data`` (None: none); a warning when its data had
        another number of utterances."""
        self.bad_paths = dict((state or {}).get("bad_paths", {}))
        if state and state.get("num_items") not in (None, len(self.dataset)):
            print(f"warning: the checkpoint's data had {state['num_items']} utterances, this one has "
                  f"{len(self.dataset)}: the batch order after the resume differs from the original run",
                  file=sys.stderr)

    def loader(self, start_step: int, total_steps: int) -> DataLoader:
        sampler = StepBatchSampler(len(self.dataset), self.batch_size, self.per_epoch, self.seed,
                                   self.rank, self.world, start_step, total_steps)
        workers = self.num_workers > 0
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=workers,
                          prefetch_factor=self.prefetch_factor if workers else None,
                          generator=torch.Generator().manual_seed(self.seed))  # leaves torch's global RNG alone

    def batches(self, start_step: int, total_steps: int) -> Iterator[dict[str, Any]]:
        """The batches of the steps start_step .. total_steps - 1, on the device."""
        it = iter(self.loader(start_step, total_steps))
        while True:
            t0 = time.perf_counter()
            if self.num_workers == 0:
                old = torch.get_num_threads()
                torch.set_num_threads(1)  # small per-crop ops: more threads only oversubscribe
                try:
                    batch = next(it, None)
                finally:
                    torch.set_num_threads(old)
            else:
                batch = next(it, None)
            if batch is None:
                return
            self._account(batch)
            out = {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                   for k, v in batch.items()}
            self.last_wait_s = time.perf_counter() - t0
            self.wait_seconds += self.last_wait_s
            self.batches_seen += 1
            yield out

    def _account(self, batch: dict[str, Any]) -> None:
        if "error" in batch:
            raise ValueError(batch["error"])
        for path, reason in batch["bad_files"]:
            if path in self.bad_paths:
                continue
            self.bad_paths[path] = reason
            n = len(self.bad_paths)
            if n > self.max_bad_files:
                raise ValueError(f"{n} unreadable audio files, more than max_bad_files={self.max_bad_files} "
                                 f"(the last: {reason}): fix or remove them from wav.scp, or raise max_bad_files")
            where = f"rank {self.rank}: " if self.world > 1 else ""  # each rank reads its own shard
            print(f"warning: {where}skipped an unreadable audio file ({reason}); {n} skipped so far, "
                  f"training stops after max_bad_files={self.max_bad_files}", file=sys.stderr)
