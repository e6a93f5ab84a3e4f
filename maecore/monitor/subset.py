"""The images the monitor looks at: a fixed, class-balanced subset of a folder (or packed) dataset, split as
solo-learn splits its kNN — the training images as the bank, the validation images as queries.

A root with ``train/`` and ``val/``: bank from ``train/``, queries from ``val/`` (classes matched by name);
without ``val/`` (or a root that is itself the training folder) the queries are other training images than the
bank's.  No class folders: the bank alone, for RankMe (no labels, so no kNN and no linear classifier).

The choice is seeded and independent of the number of processes (1 or 2 ranks see the same images); each rank
decodes its share (positions r, r+W, …) once, the linear probe's validation view (short side to size / crop_pct,
centre crop), and keeps it as uint8: a few hundred KB an image at 224 px, decoded once instead of every time.
Nothing here draws from the global RNGs, so monitoring leaves the run's masks and augmentations as they were.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision.transforms as T
from torchvision.transforms import InterpolationMode

from maecore import distributed as du
from maecore.data.decode import IMAGENET_MEAN, IMAGENET_STD
from maecore.data.images import ImageFiles, check_dir
from maecore.data.packed.index import is_url, split_dir
from maecore.data.packed.reader import PackedImages
from maecore.data.packed.remote import find_split, open_split
from maecore.data.packed.store import Store
from maecore.data.pixels import normalize_uint8
from maecore.models.layers import to_2tuple


def view_transform(input_size: int | Sequence[int]) -> T.Compose:
    """The probe's validation view as uint8 (classification's rule: crop 0.875 up to 224 px, none above)."""
    size = to_2tuple(input_size)
    crop_pct = 224 / 256 if max(size) <= 224 else 1.0
    return T.Compose([T.Resize(int(min(size) / crop_pct), interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.PILToTensor()])


def open_images(folder: Path | Store, transform: Callable) -> ImageFiles:
    packed = isinstance(folder, Store) or split_dir(folder) is not None
    return PackedImages(folder, transform) if packed else ImageFiles(folder, transform)


def split_roots(root: str | Path) -> tuple[Path | Store, Path | Store | None]:
    """(bank folder, queries folder or None): ``root/train`` and ``root/val`` when present (``val`` only beside a
    ``train``), else ``root`` itself (a packed folder is a split itself; a URL names a packed folder or root)."""
    if is_url(root):
        url = str(root).rstrip("/")
        store = open_split(url)
        if store is not None:
            return store, None
        return find_split(url, ("train",)), open_split(f"{url}/val")
    if split_dir(root) is not None:
        return Path(root), None
    r = check_dir(root, "monitor data")
    if (r / "train").is_dir():
        return r / "train", (r / "val" if (r / "val").is_dir() else None)
    return r, None


def balanced_order(targets: Sequence[int], seed: int) -> list[int]:
    """Every index once, classes taking turns (each class's own seeded shuffle): any prefix is class-balanced."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_class[t].append(i)
    groups = [rng.sample(by_class[c], len(by_class[c])) for c in sorted(by_class)]
    return [i for turn in zip_longest(*groups) for i in turn if i is not None]


@dataclass
class Part:
    """One side (bank or queries): the dataset and its chosen indices (all ranks), this rank's decoded share."""

    dataset: ImageFiles
    indices: list[int]
    label_of: dict[int, int] = field(default_factory=dict)  # a dataset target -> the bank's class index
    images: torch.Tensor | None = None  # this rank's share, uint8 (n, C, H, W)
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self) -> None:
        mine = self.indices[du.rank()::du.world_size()]
        imgs, labels = [], []
        for i in mine:
            img, target, _ = self.dataset[i]  # an unreadable file is replaced by the next readable one, as in training
            imgs.append(img)
            labels.append(self.label_of.get(target, target))
        self.images = torch.stack(imgs) if imgs else torch.zeros(0, dtype=torch.uint8)
        self.labels = torch.tensor(labels, dtype=torch.long)


class MonitorSubset:
    """The bank (``bank`` images) and queries (``queries`` images) of ``root`` (see the module's docstring)."""

    def __init__(self, root: str | Path, input_size: int | Sequence[int], bank: int, queries: int, seed: int = 0) -> None:
        tf = view_transform(input_size)
        train_root, val_root = split_roots(root)
        train = open_images(train_root, tf)
        self.root = root if is_url(root) else Path(root)
        self.classes: list[str] = list(train.classes)
        self.labelled = bool(self.classes)
        order = balanced_order(train.targets, seed)
        self.bank = Part(train, order[:bank])
        self.queries = Part(train, [])
        if not self.labelled:
            return
        if val_root is None:
            self.queries = Part(train, order[bank:bank + queries])
            return
        val = open_images(val_root, tf)
        index = {c: i for i, c in enumerate(self.classes)}
        label_of = {j: index[c] for j, c in enumerate(val.classes) if c in index}
        usable = [i for i, t in enumerate(val.targets) if t in label_of]  # a val class the bank lacks is left out
        self.queries = Part(val, [usable[i] for i in balanced_order([val.targets[i] for i in usable], seed)[:queries]],
                            label_of)

    def load(self) -> None:
        """Decode this rank's share of both sides (once)."""
        for part in (self.bank, self.queries):
            if part.images is None:
                part.load()

    @torch.no_grad()
    def local_features(self, part: Part, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``fn`` (normalised images -> (B, D) features) on this rank's share of ``part``: (features, labels), float32
        (no collective: :func:`gather_in_order` makes them every rank's, in the subset's order)."""
        assert part.images is not None and part.labels is not None, "load() first"
        feats = [fn(normalize_uint8(part.images[i:i + batch_size].to(device), IMAGENET_MEAN, IMAGENET_STD)).float()
                 for i in range(0, len(part.images), batch_size)]
        return (torch.cat(feats) if feats else torch.zeros(0, 0, device=device)), part.labels.to(device)


def gather_in_order(t: torch.Tensor, n: int) -> torch.Tensor:
    """Rank r holds rows r, r+W, … of ``n``: all ``n`` rows, on every rank, in order (one padded all-gather; a
    rank with no rows sends padding only, its width learned from the others)."""
    w = du.world_size()
    if w == 1:
        return t
    shape = torch.tensor(t.shape if t.dim() > 1 else (*t.shape, 0), device=t.device)
    shapes = [torch.zeros_like(shape) for _ in range(w)]
    dist.all_gather(shapes, shape)
    rows = -(-n // w)
    tail = (int(max(s[1] for s in shapes)),) if t.dim() > 1 else ()
    padded = t.new_zeros((rows, *tail))
    if t.numel():
        padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).reshape(rows * w, *tail)[:n]  # row j*W + r is rank r's j-th: the subset's order
