"""Pretraining data: any image folder, with or without class sub-folders; crop + flip only."""

from __future__ import annotations

from pathlib import Path

import torchvision.transforms as T
from torchvision.transforms import InterpolationMode

from maecore.data import MAX_SUBSTITUTES, ImageFiles, check_dir, list_images, try_load_rgb
from maecore.vit import to_2tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def resolve_train_dir(data_path: str | Path) -> Path:
    """``data_path/train`` when it exists (the official scripts' convention), else ``data_path``."""
    root = check_dir(data_path)
    return root / "train" if (root / "train").is_dir() else root


def build_pretrain_dataset(
    data_path: str | Path, input_size: int | tuple[int, int], jpeg_draft: bool = False
) -> ImageFiles:
    size = to_2tuple(input_size)
    return ImageFiles(resolve_train_dir(data_path), pretrain_transform(size), draft_size=size if jpeg_draft else None)


def fixed_images(data_path: str | Path, n: int) -> list[Path]:
    """A fixed, spread-out choice of ``n`` readable images (from ``val`` if present) for figures across
    epochs; an unreadable candidate is reported once here and replaced by the next readable file."""
    root = check_dir(data_path)
    src = root / "val" if (root / "val").is_dir() else resolve_train_dir(root)
    files = list_images(src)
    if not files or n <= 0:
        return []
    step = max(1, len(files) // n)
    order = files[::step] + [f for i, f in enumerate(files) if i % step]  # the spread first, then the rest
    chosen: list[Path] = []
    for f in order[: n + MAX_SUBSTITUTES]:  # a folder of bad files is not read to the end for a figure
        if len(chosen) == n:
            break
        if try_load_rgb(f) is not None:
            chosen.append(f)
    return chosen
