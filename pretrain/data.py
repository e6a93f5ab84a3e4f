"""Pretraining data: any image folder, with or without class sub-folders, or a packed copy of one
(``maecore.data.packed``); crop + flip only.

``decode`` (``--decode``) picks how a sample becomes pixels, with the same augmentation distribution each way:

* ``fast`` (default): :class:`maecore.data.crop.FastRandomResizedCrop` in the workers (JPEG DCT scale chosen from the
  crop, only the box resized, uint8 out), normalised on the device (:class:`maecore.data.pixels.UInt8Normalize`);
* ``official``: the torchvision transforms of the official scripts (:func:`pretrain_transform`) in the workers,
  float batches (``jpeg_draft``: the older draft decode at the output size, before the crop);
* ``gpu``: :class:`maecore.data.gpu.GpuJpegCrop` in the workers (header, box, bytes), nvJPEG decode + crop +
  resize on the CUDA device (:class:`maecore.data.gpu.GpuDecode`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torchvision.transforms as T
from torchvision.transforms import InterpolationMode

from maecore.data.decode import IMAGENET_MEAN, IMAGENET_STD, crop_decoder, decode_collate, decode_device_batch
from maecore.data.images import MAX_SUBSTITUTES, ImageFiles, check_dir, list_images, try_load_rgb
from maecore.data.packed.index import is_url, split_dir
from maecore.data.packed.reader import NamedBytes, PackedImages
from maecore.data.packed.remote import RemoteOptions, find_split
from maecore.data.packed.store import Store
from maecore.models.layers import to_2tuple

log = logging.getLogger(__name__)

PRETRAIN_SCALE = (0.2, 1.0)


def pretrain_transform(input_size: int | tuple[int, int], scale: tuple[float, float] = (0.2, 1.0)) -> T.Compose:
    """RandomResizedCrop(0.2-1, bicubic) + flip, the paper's augmentation (no colour jitter)."""
    return T.Compose(
        [
            T.RandomResizedCrop(to_2tuple(input_size), scale=scale, interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(input_size: int | tuple[int, int]) -> T.Compose:
    """Resize the short side and centre-crop: fixed views for reconstruction figures."""
    size = to_2tuple(input_size)
    return T.Compose(
        [
            T.Resize(min(size), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def resolve_train_dir(data_path: str | Path, remote: RemoteOptions | None = None) -> Path | Store:
    """``data_path/train`` when it exists (the official scripts' convention), else ``data_path``; a packed
    folder (or its index file) is a training set itself.  A URL (``https://…``, ``s3://…``) names a packed one,
    or a root whose ``train/`` is one: its store (:mod:`maecore.data.packed.remote`)."""
    if is_url(data_path):
        return find_split(str(data_path), ("", "train"), remote)
    packed = split_dir(data_path)
    if packed is not None:
        return packed
    root = check_dir(data_path)
    return root / "train" if (root / "train").is_dir() else root


def open_images(folder: Path | Store, transform=None, draft_size: tuple[int, int] | None = None,
                decoder: Callable[[Any], Any] | None = None) -> ImageFiles:
    """The dataset of ``folder``: a packed one (found by its index, or a remote one's store) or an image folder."""
    if isinstance(folder, Store) or split_dir(folder) is not None:
        return PackedImages(folder, transform, draft_size, decoder)
    return ImageFiles(folder, transform, draft_size, decoder)


def build_pretrain_dataset(
    data_path: str | Path, input_size: int | tuple[int, int], jpeg_draft: bool = False, decode: str = "fast",
    remote: RemoteOptions | None = None,
) -> ImageFiles:
    """The training images of ``data_path``: a folder or a packed dataset (its ``train/`` when present; a URL: read
    as ``remote`` says), decoded as ``decode`` says (see the module's docstring; ``jpeg_draft`` only changes ``official``)."""
    size = to_2tuple(input_size)
    folder = resolve_train_dir(data_path, remote)
    decoder = crop_decoder(decode, size, PRETRAIN_SCALE)
    if decoder is None:
        return open_images(folder, pretrain_transform(size, PRETRAIN_SCALE), draft_size=size if jpeg_draft else None)
    return open_images(folder, decoder=decoder)


# the collate_fn and the trainer's device_batch a decode needs (shared with the classification probe: maecore.data.decode)
pretrain_collate = decode_collate
pretrain_device_batch = decode_device_batch


def fixed_images(data_path: str | Path, n: int) -> list[Path] | list[NamedBytes]:
    """A fixed, spread-out choice of ``n`` readable images (from ``val`` if present) for figures across
    epochs; an unreadable candidate is reported once here and replaced by the next readable file.  From a
    packed dataset the images are their encoded bytes (named by their record), which the figures decode alike."""
    if n <= 0:
        return []
    if is_url(data_path):  # a remote root's val/ when it has one, as for a folder
        src: Path | Store = find_split(str(data_path), ("val", "", "train"))
    else:
        src = resolve_train_dir(data_path)
        if split_dir(data_path) is None and (Path(data_path) / "val").is_dir():
            src = Path(data_path) / "val"
    packed = PackedImages(src) if isinstance(src, Store) or split_dir(src) is not None else None
    files = list_images(src) if packed is None else []
    get = files.__getitem__ if packed is None else packed.image_bytes
    count = len(files) if packed is None else len(packed)
    step = max(1, count // n)
    order = list(range(0, count, step)) + [i for i in range(count) if i % step]  # the spread first, then the rest
    chosen = []
    for i in order[: n + MAX_SUBSTITUTES]:  # a folder of bad files is not read to the end for a figure
        if len(chosen) == n:
            break
        try:
            item = get(i)
        except OSError as e:  # a packed record whose bytes cannot be read is as unreadable as a bad file
            log.warning("skipping unreadable image %s: %s", packed.samples[i][0] if packed else files[i], e)
            continue
        if try_load_rgb(item) is not None:
            chosen.append(item)
    if packed is not None:
        packed.close()
    return chosen
