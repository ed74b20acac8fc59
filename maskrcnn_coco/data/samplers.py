"""Resumable, shardable training order with augmentation seeded per sample.

``TrainSampler`` draws a new permutation per epoch from ``(seed, epoch)`` only, so the order of any
epoch can be rebuilt after a restart, and can skip the samples an interrupted epoch already
trained on. It yields ``(index, sample_seed)``; ``SeededSamples`` runs the wrapped dataset's random
augmentation under that seed. Augmentation is then a function of ``(seed, epoch, index)``: the same
with 0 or 8 loader workers, persistent or not, and it never draws from the global RNG, which stays
for the model's own samplers (and is checkpointed).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TrainSampler(Sampler):
    """Shuffled (or ordered) indices per epoch, sharded over ``world_size`` ranks like
    ``DistributedSampler`` (padded by repeating indices so every rank gets the same count)."""

    def __init__(self, size: int, seed: int, *, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip = 0  # positions of the global order already trained (resume mid-epoch); applies once
        self.num_samples = math.ceil(size / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """The next iteration skips the first ``samples`` of the epoch's global order: what an
        interrupted epoch already trained, over all of its ranks. The rest is re-sharded over this
        run's ranks (equal counts), so a run may resume on another number of processes; with the
        same number, every rank continues exactly where it stopped."""
        self._skip = samples

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        skip, self._skip = min(self._skip, self.size), 0
        rest = order[skip:]
        pad = -len(rest) % self.world_size  # rank r takes positions r, r + W, ...: pad to equal counts
        rest += (order * (pad // max(len(order), 1) + 1))[:pad]
        return rest[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._order():
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "size": self.size}


class SeededSamples(Dataset):
    """``dataset[(index, seed)]`` = ``dataset[index]`` with the random transforms drawn from ``seed``;
    a plain index works as before. Attributes (``coco``, ``mapping``, ``ids``) are the wrapped dataset's."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ShardSampler(Sampler):
    """Validation: every ``world_size``-th index from ``rank``, in order; no index on two ranks, no
    padding, so the ranks' shards together are the set exactly once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
