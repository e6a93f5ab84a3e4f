"""Image datasets that survive bad files, and a sampler that makes runs resumable mid-epoch.

Determinism: every sample's augmentation is seeded from (seed, epoch, index), handed over by the
sampler, so the same sample gets the same crop whatever the number of workers, the rank layout or
where a resumed run restarts.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler, get_worker_info

from maecore.errors import UserError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MAX_SUBSTITUTES = 20


def check_dir(path: str | Path, what: str = "dataset") -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} directory not found: {p}")
    if not p.is_dir():
        raise UserError(f"{what} path is not a directory: {p}")
    return p


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def load_rgb(path: str | Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image as RGB.  With ``draft_size`` a JPEG is decoded at the smallest 1/2, 1/4, 1/8
    scale that is still at least that size (libjpeg's DCT scaling) — much cheaper for big photos."""
    with Image.open(path) as im:
        if draft_size is not None and im.format == "JPEG":
            im.draft("RGB", draft_size)
        return im.convert("RGB")


class ImageFiles(Dataset):
    """Images under ``root``, with class sub-folders (``root/<class>/…``, ImageNet layout) or without.

    Without class folders every target is -1.  A file that cannot be decoded is reported once,
    counted, and replaced by the next readable one, so a long run never dies on one bad file and
    batches keep their size (which DDP and static-shape compilation need).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> None:
        self.root = check_dir(root)
        self.transform = transform
        self.draft_size = draft_size
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        samples: list[tuple[Path, int]] = []
        self.classes: list[str] = []
        for d in class_dirs:
            files = list_images(d)
            if files:
                samples += [(f, len(self.classes)) for f in files]
                self.classes.append(d.name)
        loose = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if loose and self.classes:
            log.warning("%s: %d images beside class folders are ignored", self.root, len(loose))
        elif loose:
            samples = [(f, -1) for f in loose]
        if not samples:
            raise UserError(f"no images found under {self.root} (looked for {', '.join(IMG_EXTENSIONS)})")
        self.samples = samples
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int, int]:
        """(image, target, number of unreadable files skipped to get it)."""
        for tried in range(MAX_SUBSTITUTES):
            path, target = self.samples[(index + tried) % len(self.samples)]
            try:
                return load_rgb(path, self.draft_size), target, tried
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                log.warning("skipping unreadable image %s: %s", path, e)
        raise UserError(f"{MAX_SUBSTITUTES} unreadable images in a row near {self.samples[index][0]}")

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        img, target, skipped = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, target, skipped


class SeededDataset(Dataset):
    """Wraps a dataset to take ``(index, seed)`` keys: python, numpy and torch RNGs are seeded per
    sample before the transforms run (and restored afterwards in the main process)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        if not isinstance(key, tuple):
            return self.base[key]
        index, seed = key
        in_main = get_worker_info() is None
        if in_main:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            return self.base[index]
        finally:
            if in_main:
                random.setstate(saved[0])
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
