"""A deterministic, resumable, DDP-aware sampler, and per-sample seeded augmentation.

Epoch ``e`` always sees the same permutation (seeded by ``seed`` and ``e``), so a run resumed
mid-epoch continues with exactly the batches an uninterrupted run would have seen. With
``keyed=True`` the sampler hands out ``epoch * size + index`` and ``SeededSamples`` draws each
sample's random augmentation from a generator seeded by ``(seed, epoch, index)``: the same crop
and flip whatever the number of loader workers, the rank, or where the run was resumed.
"""

from __future__ import annotations

from typing import Iterator, Sized, cast

import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[int]):
    """``pad``: repeat the first samples so every rank gets the same count (training, where ranks
    must step together); without it (evaluation) each sample is seen exactly once over all ranks,
    and the last ranks may get one fewer, so padding cannot bias a metric."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 pad: bool = True, keyed: bool = False) -> None:
        self.size, self.shuffle, self.seed, self.pad, self.keyed = size, shuffle, seed, pad, keyed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0
        self.per_rank = -(-size // world_size) if pad else len(range(rank, size, world_size))

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation and skip this rank's first ``skip`` samples of it."""
        self.epoch, self.skip = epoch, skip

    def _order(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            order += order[: self.per_rank * self.world_size - self.size]
        # interleaved shards: global batch k of a run with world size W holds the same samples
        # as batch k of a single process with W times the batch size
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self._order()[self.skip:]
        if self.keyed:
            return iter([self.epoch * self.size + index for index in order])
        return iter(order)

    def __len__(self) -> int:
        return self.per_rank - self.skip


class SeededSamples(Dataset):
    """Wraps a dataset indexed by an ``EpochSampler(keyed=True)``: ``epoch * size + index``.

    Each sample is loaded with torch's default CPU generator seeded from ``(seed, epoch, index)``
    and restored afterwards, so random transforms (torchvision's draw from it) are a function of
    the sample and the epoch only, and the caller's random stream is left untouched. Only the
    CPU generator: ``torch.manual_seed`` would also reseed every GPU's, which a loader without
    worker processes shares with the model (dropout), and it costs about 30x more per sample.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        # a map-style dataset has a length, which torch's Dataset base class does not declare
        return len(cast(Sized, self.dataset))

    def __getitem__(self, key: int):  # noqa: ANN204 - whatever the wrapped dataset returns
        epoch, index = divmod(int(key), len(cast(Sized, self.dataset)))
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + index) % 2**63)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)
