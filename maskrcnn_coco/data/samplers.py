"""Resumable, shardable training order with augmentation seeded per sample.

``TrainSampler`` draws a new permutation per epoch from ``(seed, epoch)`` only, so the order of any
epoch can be rebuilt after a restart, and can skip the samples an interrupted epoch already
trained on. It yields ``(index, sample_seed)``; ``SeededSamples`` runs the wrapped dataset's random
augmentation under that seed. Augmentation is then a function of ``(seed, epoch, index)``: the same
with 0 or 8 loader workers, persistent or not, and it never draws from the global RNG, which stays
for the model's own samplers (and is checkpointed).

With ``group_ids`` (e.g. ``aspect_ratio_groups``: portrait and landscape images) the epoch's order
is rearranged into batches of one group each (``group_batches``), still a function of
``(seed, epoch)`` only; the DataLoader's plain batching then cuts exactly those batches, and an
interrupted epoch skips exactly the samples it trained (``skip_next`` counts positions of the
rearranged order).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def aspect_ratio_groups(sizes: Sequence[tuple[float, float]], factor: int = 3) -> list[int]:
    """Group id per ``(width, height)``: the aspect ratio ``width / height`` quantised by the bins
    ``2 ** linspace(-1, 1, 2 * factor + 1)`` (torchvision's ``--aspect-ratio-group-factor``; factor 0:
    portrait vs landscape)."""
    n = 2 * factor + 1
    bins = sorted(2.0 ** (-1.0 + 2.0 * i / (n - 1)) for i in range(n)) if factor > 0 else [1.0]
    return [bisect.bisect_right(bins, float(w) / float(h)) for w, h in sizes]


def group_batches(order: Sequence[int], group_ids: Sequence[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into batches of one group each: a group's batch is emitted as soon as it has
    ``batch_size`` indices, in the order batches complete; the rest (under a batch per group) follows in
    ``order``'s order, in batches that may mix groups. Every index exactly once; all batches but the last
    are full."""
    position = {index: pos for pos, index in enumerate(order)}
    buffers: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for index in order:
        buffer = buffers.setdefault(group_ids[index], [])
        buffer.append(index)
        if len(buffer) == batch_size:
            batches.append(buffer)
            buffers[group_ids[index]] = []
    left = sorted((i for buffer in buffers.values() for i in buffer), key=position.__getitem__)
    batches += [left[i:i + batch_size] for i in range(0, len(left), batch_size)]
    return batches


class TrainSampler(Sampler):
    """Shuffled (or ordered) indices per epoch, sharded over ``world_size`` ranks like
    ``DistributedSampler`` (padded by repeating indices so every rank gets the same count).

    ``group_ids`` with ``batch_size``: the order is rearranged into batches of one group
    (``group_batches``); with several ranks, whole batches are sharded (rank r takes batches
    r, r + W, ...; padded with whole batches). Inactive when every index has the same group."""

    def __init__(self, size: int, seed: int, *, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 group_ids: Sequence[int] | None = None, batch_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip = 0  # positions of the global order already trained (resume mid-epoch); applies once
        if group_ids is not None and len(group_ids) != size:
            raise ValueError(f"TrainSampler: {len(group_ids)} group ids for {size} samples")
        self.grouped = group_ids is not None and batch_size > 1 and len(set(group_ids)) > 1
        self.group_ids, self.batch_size = (list(group_ids) if self.grouped else None), batch_size  # type: ignore[arg-type]
        if self.grouped and world_size > 1:
            # ceil(batches / W) whole batches per rank: what the DataLoader's len() must count.
            self.num_samples = math.ceil(math.ceil(size / batch_size) / world_size) * batch_size
        else:
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
        if self.grouped:
            order = [i for batch in group_batches(order, self.group_ids, self.batch_size) for i in batch]  # type: ignore[arg-type]
        skip, self._skip = min(self._skip, self.size), 0
        rest = order[skip:]
        if self.grouped and self.world_size > 1:
            # Skipped positions are whole batches (iterations x batch x ranks): the rest cuts into the same batches.
            b = self.batch_size
            batches = [rest[i:i + b] for i in range(0, len(rest), b)]
            pad = -len(batches) % self.world_size
            batches += (batches * (pad // max(len(batches), 1) + 1))[:pad]
            return [i for batch in batches[self.rank::self.world_size] for i in batch]
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
    a plain index draws them from the global RNG, as the wrapped dataset does. Attributes (``coco``,
    ``mapping``, ``ids``) are the wrapped dataset's."""

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
