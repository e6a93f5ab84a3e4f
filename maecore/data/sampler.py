"""The sampler that makes runs resumable mid-epoch, and the dataset wrapper that seeds each sample.

Determinism: every sample's augmentation is seeded from (seed, epoch, index), handed over by the
sampler, so the same sample gets the same crop whatever the number of workers, the rank layout or
where a resumed run restarts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

ALL_RNGS = ("random", "numpy", "torch")  # the global RNGs SeededDataset seeds per sample (python's, numpy's, torch's CPU one)


class SeededDataset(Dataset):
    """Wraps a dataset to take ``(index, seed)`` keys: python, numpy and torch (CPU) RNGs are seeded per
    sample before the transforms run (and restored afterwards in the main process).  A dataset that declares
    which of them its samples draw from (``rngs``, e.g. :attr:`ImageFiles.rngs`: the fast decoders draw from torch's
    only) gets just those seeded and restored: saving and restoring numpy's state alone costs ~0.1 ms a sample."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitems__(self, keys: list[tuple[int, int] | int]) -> list[Any]:
        """A batch, as a DataLoader worker asks for it: a dataset that can fetch ahead (``prefetch``: a remote packed
        dataset) is told the batch's indices first, in order; then each sample is made as :meth:`__getitem__` makes it."""
        ahead = getattr(self.base, "prefetch", None)
        if ahead is not None:
            ahead([k[0] if isinstance(k, tuple) else k for k in keys])
        return [self[k] for k in keys]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        if not isinstance(key, tuple):
            return self.base[key]
        index, seed = key
        rngs = getattr(self.base, "rngs", ALL_RNGS)  # asked each time: a transform set later changes the answer
        py, npy = "random" in rngs, "numpy" in rngs
        in_main = get_worker_info() is None
        if in_main:
            saved = (random.getstate() if py else None, np.random.get_state() if npy else None, torch.get_rng_state())
        if py:
            random.seed(seed)
        if npy:
            np.random.seed(seed % 2**32)
        # the CPU generator only (what transforms draw from): torch.manual_seed would also reseed the CUDA
        # generators, which costs ~80 us a sample where CUDA is not initialised (a stack trace is recorded each call)
        # and, in the main process, would reseed the device RNG that draws the masks
        torch.default_generator.manual_seed(seed)
        try:
            return self.base[index]
        finally:
            if in_main:
                if saved[0] is not None:
                    random.setstate(saved[0])
                if saved[1] is not None:
                    np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class ResumableSampler(Sampler):
    """Shuffled (or ordered) indices sharded over ranks, each paired with a per-sample seed.

    Like ``DistributedSampler`` (pads to a multiple of the world size; rank r takes r, r+W, …) but
    can start part-way through an epoch, which mid-epoch resumption needs.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.num_samples = math.ceil(n / world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch for the shuffle; ``start`` = samples of this rank's shard already consumed."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.world_size
        order += order[: total - len(order)]
        shard = order[self.rank : total : self.world_size]
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i in shard[self.start :]:
            yield i, (base + i) % (2**63 - 1)
