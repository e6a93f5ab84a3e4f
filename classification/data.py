"""ImageNet-layout datasets (``DIR/train/<class>/…``, ``DIR/val/<class>/…``, or a packed copy of such a root:
``maecore.data.packed``) and the transforms of the official fine-tuning / linear-probe scripts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from classification.evaluate import eval_loader  # noqa: F401  (re-exported: the loaders live with the evaluation)
from maecore.data.crop import FastRandomResizedCrop
from maecore.data.decode import crop_decoder
from maecore.data.images import ImageFiles, ImageSource, check_dir
from maecore.data.packed.index import INDEX_NAME, is_url, split_dir
from maecore.data.packed.reader import PackedImages
from maecore.data.packed.remote import RemoteOptions, find_split, open_split
from maecore.data.packed.store import Store
from maecore.errors import UserError
from maecore.models.layers import to_2tuple

__all__ = ["LINPROBE_SCALE", "FeatureDataset", "build_datasets", "eval_loader", "eval_transform", "finetune_transform",
           "linprobe_train", "linprobe_transform"]

log = logging.getLogger(__name__)

# torchvision's default scale: the official main_linprobe's RandomResizedCrop(input_size, interpolation=3)
LINPROBE_SCALE = (0.08, 1.0)


def finetune_transform(
    input_size: int | Sequence[int],
    aa: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    color_jitter: float | None = None,
) -> T.Compose:
    """timm's training pipeline as the official ``main_finetune``: RandomResizedCrop (bicubic) + flip,
    RandAugment, normalise, random erasing."""
    tf = create_transform(
        input_size=to_2tuple(input_size),
        is_training=True,
        color_jitter=color_jitter,
        auto_augment=aa or None,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    for t in getattr(tf, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return tf


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for every Pillow: ``rand-m9-mstd0.5-inc1`` draws magnitude 10 (keep 0 bits)
    in ~2 % of its posterize ops; Pillow >= 11 refuses 0 bits, which would kill a run mid-epoch.
    Keeping 0 bits is a black image, what older Pillow (and the official runs) produced."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def linprobe_transform(input_size: int | Sequence[int]) -> T.Compose:
    """RandomResizedCrop (0.08-1, bicubic) + flip only (paper App. A.1)."""
    return T.Compose([
        T.RandomResizedCrop(to_2tuple(input_size), scale=LINPROBE_SCALE, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def linprobe_train(input_size: int | Sequence[int], decode: str) -> tuple[T.Compose | None, FastRandomResizedCrop | None]:
    """The probe's training view as ``--decode`` makes it, ``(transform, decoder)`` for :func:`build_datasets`:
    ``official`` is :func:`linprobe_transform` (float batches); ``fast`` / ``gpu`` the same boxes and flips from the
    shared decoders (``maecore.data.decode.crop_decoder``), uint8 or JPEG bytes finished on the device by the trainer's
    ``device_batch`` (``maecore.data.decode.decode_device_batch``)."""
    decoder = crop_decoder(decode, to_2tuple(input_size), LINPROBE_SCALE)
    return (linprobe_transform(input_size) if decoder is None else None), decoder


def default_crop_pct(input_size: int | Sequence[int]) -> float:
    """The official rule: 0.875 (resize 256, crop 224) up to 224 px, no crop margin above."""
    return 224 / 256 if max(to_2tuple(input_size)) <= 224 else 1.0


def eval_transform(input_size: int | Sequence[int], crop_pct: float | None = None) -> T.Compose:
    """Resize the short side to size / crop_pct (bicubic), centre-crop to size."""
    size = to_2tuple(input_size)
    crop_pct = default_crop_pct(size) if crop_pct is None else crop_pct
    if not 0 < crop_pct <= 1:
        raise UserError(f"the eval crop fraction must be in (0, 1], got {crop_pct}")
    return T.Compose([
        T.Resize(int(min(size) / crop_pct), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def build_datasets(
    data_path: str | Path, train_tf, val_tf, need_train: bool = True, classes: Sequence[str] | None = None,
    train_decoder: Callable[[ImageSource], Any] | None = None, remote: RemoteOptions | None = None,
) -> tuple[ImageFiles | None, ImageFiles, list[str]]:
    """``train`` and ``val`` image folders sharing one class index space: ``classes`` when given (a
    checkpoint's), else the train split's folders, else (evaluation without train/) the val split's.
    ``train_decoder`` (:func:`linprobe_train`) replaces decoding + ``train_tf`` for the train split.  ``data_path`` may
    be the URL of a packed root (its ``train/`` and ``val/`` read over the network as ``remote`` says).

    A val class that the index space lacks is an error; a class absent from val is fine.
    Returns (train or None, val, class names)."""
    remote_root = str(data_path).rstrip("/") if is_url(data_path) else None
    if (split_dir(data_path) if remote_root is None else open_split(remote_root, remote)) is not None:
        raise UserError(f"{remote_root or data_path} is one packed folder; classification needs a root with train/ and "
                        "val/ (pack the ImageNet-layout root itself)")
    if remote_root is not None:  # a remote packed root: train/ and val/ are its stores
        splits = {s: find_split(remote_root, (s,), remote) for s in (("train", "val") if need_train else ("val",))}
    else:
        root = check_dir(data_path, "data")
        for split in ("train", "val") if need_train else ("val",):
            if not (root / split).is_dir():
                raise UserError(f"{root} has no {split}/ sub-directory (expected the ImageNet layout {root}/{{train,val}}/<class>/*)")
        splits = {s: root / s for s in ("train", "val")}
    train = None
    if need_train:
        train = _open_split(splits["train"], train_tf, train_decoder)
        if classes is None:
            classes = list(train.classes)
        else:
            _reindex(train, classes, "train")
    val = _open_split(splits["val"], val_tf)
    if classes is None:
        classes = list(val.classes)
    _reindex(val, classes, "val")
    return train, val, list(classes)


def has_split(data_path: str | Path, split: str, remote: RemoteOptions | None = None) -> bool:
    """``data_path`` has a ``split`` (``train``/``val``): a folder, or a packed folder of a remote root."""
    if is_url(data_path):
        return open_split(f"{str(data_path).rstrip('/')}/{split}", remote) is not None
    return (Path(data_path) / split).is_dir()


def _open_split(folder: Path | Store, tf, decoder: Callable[[ImageSource], Any] | None = None) -> ImageFiles:
    """A split's class folders, or its packed copy (found by its index, or a remote one's store); one without
    classes is refused."""
    packed = isinstance(folder, Store) or split_dir(folder) is not None
    ds = (PackedImages if packed else ImageFiles)(folder, tf, decoder=decoder)
    if not ds.classes:
        raise UserError(f"{folder}: packed without class labels (its {INDEX_NAME} lists no classes; pack a folder of class "
                        f"sub-folders)" if packed else f"{folder}: no class sub-folders (expected {folder.name}/<class>/*.jpg)")
    return ds


def _reindex(ds: ImageFiles, classes: Sequence[str], split: str) -> None:
    """Re-map ``ds`` targets (indices into its own folder list) into ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    extra = [c for c in ds.classes if c not in index]
    if extra:
        raise UserError(f"{split} classes unknown to the model's class list: {', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}")
    remap = [index[c] for c in ds.classes]
    ds.samples = [(p, remap[t]) for p, t in ds.samples]
    ds.targets = [t for _, t in ds.samples]
    ds.classes = list(classes)
    ds.class_to_idx = dict(index)


class FeatureDataset(Dataset):
    """Cached pooled features (linear probe without augmentation): items ``(feature, target, 0)``."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.features[i], int(self.targets[i]), 0
