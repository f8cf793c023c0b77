"""A deterministic, resumable, DDP-aware sampler.

Epoch ``e`` always sees the same permutation (seeded by ``seed`` and ``e``), so a run resumed
mid-epoch continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0
        # like DistributedSampler: pad to a multiple of the world size so every rank steps together
        self.per_rank = -(-size // world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation and skip this rank's first ``skip`` samples of it."""
        self.epoch, self.skip = epoch, skip

    def _order(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        order += order[: self.per_rank * self.world_size - self.size]
        # interleaved shards: global batch k of a run with world size W holds the same samples
        # as batch k of a single process with W times the batch size
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.skip:])

    def __len__(self) -> int:
        return self.per_rank - self.skip
