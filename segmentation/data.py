"""ADE20K-layout semantic segmentation data and the mmseg/BEiT training pipeline.

Layout (the official release): ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
``ADEChallengeData2016/annotations/{training,validation}/*.png`` (one 8-bit label per pixel, 0 = "other",
k = class k).  With ``reduce_zero_label`` (ADE20K's convention) 0 becomes ignore (255) and k becomes k-1.

Bad inputs never kill a run: an image without a label file is left out when the list is built (counted,
one warning); an unreadable image or label, a colour (RGB) label map, or a label whose size differs from
its image is skipped (training substitutes the next sample so batches keep their size; evaluation counts
it and moves on, so no image is counted twice); label values beyond the class count become ignore and
are counted.  Grey-scale (and CMYK / palette) images are converted to RGB.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

from maecore.data.images import IMG_EXTENSIONS, MAX_SUBSTITUTES, check_dir, load_rgb
from maecore.errors import UserError

log = logging.getLogger(__name__)

ADE_DIRNAME = "ADEChallengeData2016"
SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
IGNORE_INDEX = 255
# ImageNet mean/std on the 0-255 scale, RGB (mmseg's SegDataPreProcessor for ADE20K)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


class BadSample(ValueError):
    """A sample whose files cannot be used (reported and skipped, never fatal)."""


def resolve_root(path: str | Path) -> Path:
    """``path`` may be the folder holding ``ADEChallengeData2016`` or that folder itself."""
    p = check_dir(path, "ADE20K data")
    if (p / ADE_DIRNAME).is_dir():
        p = p / ADE_DIRNAME
    if not (p / "images").is_dir() or not (p / "annotations").is_dir():
        raise UserError(f"{path}: not an ADE20K layout (expected {ADE_DIRNAME}/images and {ADE_DIRNAME}/annotations)")
    return p


def find_pairs(root: str | Path, split: str) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(image, label) pairs of a split, and the images that have no label file."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use train or val")
    base = resolve_root(root)
    img_dir, ann_dir = base / "images" / SPLITS[split], base / "annotations" / SPLITS[split]
    if not img_dir.is_dir():
        raise UserError(f"image folder not found: {img_dir}")
    if not ann_dir.is_dir():
        raise UserError(f"annotation folder not found: {ann_dir}")
    images = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    pairs, unlabelled = [], []
    for img in images:
        lab = ann_dir / img.relative_to(img_dir).with_suffix(".png")
        (pairs.append((img, lab)) if lab.is_file() else unlabelled.append(img))
    return pairs, unlabelled


def load_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in LABEL_MODES:
            raise BadSample(f"label map {path} is a {im.mode} image, expected one class index per pixel (8-bit)")
        return np.asarray(im, dtype=np.int64)


def encode_label(raw: np.ndarray, num_classes: int, reduce_zero_label: bool) -> tuple[np.ndarray, int]:
    """Class indices with ignore = 255, and the number of pixels whose value was out of range."""
    lab = raw.copy()
    if reduce_zero_label:  # 0 ("other") -> ignore, k -> k-1 (mmseg's LoadAnnotations)
        lab[lab == 0] = IGNORE_INDEX + 1
        lab -= 1
        lab[lab == IGNORE_INDEX - 1] = IGNORE_INDEX  # a raw 255 stays ignore
    bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= num_classes))
    n_bad = int(bad.sum())
    if n_bad:
        lab[bad] = IGNORE_INDEX
    return lab, n_bad


@dataclass
class Sample:
    image: Image.Image
    label: np.ndarray  # (H, W) int64, ignore = 255
    name: str
    n_label_oor: int  # pixels whose label value was out of range (set to ignore)


class ADE20K(torch.utils.data.Dataset):
    """One split of an ADE20K-layout folder.  ``transform(image, label) -> (img, label)``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        transform: Any = None,
    ) -> None:
        pairs, unlabelled = find_pairs(root, split)
        self.root, self.split = resolve_root(root), split
        self.num_unlabelled = len(unlabelled)
        if unlabelled:
            log.warning("%s: %d images have no label file and are left out (e.g. %s)",
                        split, len(unlabelled), unlabelled[0].name)
        if not pairs:
            raise UserError(f"no labelled images found for split {split!r} under {self.root}")
        self.pairs = pairs
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        self._warned_oor = False

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Sample:
        """Decode one sample; :class:`BadSample` if its files cannot be used."""
        img_path, lab_path = self.pairs[index]
        try:
            image = load_rgb(img_path)  # grey-scale / CMYK / palette -> RGB
            raw = load_label(lab_path)
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise BadSample(f"unreadable file for {img_path.name}: {e}") from None
        if raw.ndim != 2 or raw.shape != (image.height, image.width):
            raise BadSample(f"label {lab_path.name} is {raw.shape[:2]}, image {img_path.name} is {(image.height, image.width)}")
        label, n_oor = encode_label(raw, self.num_classes, self.reduce_zero_label)
        if n_oor and not self._warned_oor:
            self._warned_oor = True
            log.warning("%s: label values above %d (the class count) are ignored; counted as n_label_oor",
                        lab_path, self.num_classes if self.reduce_zero_label else self.num_classes - 1)
        return Sample(image, label, img_path.stem, n_oor)

    def __getitem__(self, index: int) -> tuple[Any, Any, int, int]:
        """(image, label, skipped, n_label_oor): a bad sample is replaced by the next good one."""
        for tried in range(MAX_SUBSTITUTES):
            try:
                s = self.load((index + tried) % len(self.pairs))
                break
            except BadSample as e:
                log.warning("skipping: %s", e)
        else:
            raise UserError(f"{MAX_SUBSTITUTES} unusable samples in a row near {self.pairs[index][0]}")
        img, lab = (s.image, s.label) if self.transform is None else self.transform(s.image, s.label)
        return img, lab, tried, s.n_label_oor


# ------------------------------------------------------------------------------------------------
# Transforms (mmseg's ADE20K pipeline; randomness from python/numpy RNGs seeded per sample by the engine)
# ------------------------------------------------------------------------------------------------
def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio size fitting ``scale`` = (long, short) bounds (mmcv ``rescale_size``)."""
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_pair(image: Image.Image, label: np.ndarray | None, size: tuple[int, int]):
    h, w = size
    image = image.resize((w, h), Image.BILINEAR)
    if label is not None:
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((w, h), Image.NEAREST), dtype=np.int64)
    return image, label


def crop_bbox(h: int, w: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    oy = random.randint(0, max(h - crop[0], 0))
    ox = random.randint(0, max(w - crop[1], 0))
    return oy, min(oy + crop[0], h), ox, min(ox + crop[1], w)


def random_crop(image: np.ndarray, label: np.ndarray, crop: tuple[int, int], cat_max_ratio: float):
    """Random crop; with ``cat_max_ratio`` < 1 retry (up to 10 times) until no single class covers more
    than that fraction of the labelled pixels of the crop (mmseg ``RandomCrop``)."""
    h, w = label.shape
    box = crop_bbox(h, w, crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y0, y1, x0, x1 = box
            vals, cnt = np.unique(label[y0:y1, x0:x1], return_counts=True)
            cnt = cnt[vals != IGNORE_INDEX]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            box = crop_bbox(h, w, crop)
    y0, y1, x0, x1 = box
    return image[y0:y1, x0:x1], label[y0:y1, x0:x1]


def photometric_distortion(img: torch.Tensor) -> torch.Tensor:
    """mmseg ``PhotoMetricDistortion`` on a float (3, H, W) image in [0, 1]: brightness (±32/255),
    contrast (×0.5–1.5, before or after the colour steps), saturation (×0.5–1.5), hue (±18° of 180),
    each with probability 1/2."""
    if random.random() < 0.5:
        img = (img + random.uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = random.random() < 0.5
    if contrast_first and random.random() < 0.5:
        img = (img * random.uniform(0.5, 1.5)).clamp(0, 1)
    if random.random() < 0.5:
        img = TF.adjust_saturation(img, random.uniform(0.5, 1.5))
    if random.random() < 0.5:
        img = TF.adjust_hue(img, random.uniform(-18, 18) / 180)
    if not contrast_first and random.random() < 0.5:
        img = (img * random.uniform(0.5, 1.5)).clamp(0, 1)
    return img


def normalize(img: torch.Tensor) -> torch.Tensor:
    """float [0, 1] (3, H, W) -> ImageNet-normalised."""
    mean = torch.tensor(MEAN).view(3, 1, 1) / 255
    std = torch.tensor(STD).view(3, 1, 1) / 255
    return (img - mean) / std


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


class TrainTransform:
    """Random rescale of ``scale`` by ``ratio_range`` (keep ratio), random crop with ``cat_max_ratio``,
    horizontal flip, photometric distortion, normalise, pad to the crop size (image 0, label 255)."""

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
    ) -> None:
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        r = random.uniform(*self.ratio_range)
        size = rescale_size(image.height, image.width, (int(self.scale[0] * r), int(self.scale[1] * r)))
        image, label = resize_pair(image, label, size)
        img, label = random_crop(np.asarray(image), label, self.crop, self.cat_max_ratio)
        if random.random() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        x = to_tensor(img)
        if self.photometric:
            x = photometric_distortion(x)
        x = normalize(x)
        y = torch.from_numpy(np.ascontiguousarray(label))
        ph, pw = self.crop[0] - x.shape[1], self.crop[1] - x.shape[2]
        if ph > 0 or pw > 0:  # small images: pad bottom/right, labels with ignore
            x = torch.nn.functional.pad(x, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
            y = torch.nn.functional.pad(y, (0, max(pw, 0), 0, max(ph, 0)), value=IGNORE_INDEX)
        return x, y


def build_train_dataset(args: Any) -> ADE20K:
    tf = TrainTransform(
        crop_size=args.input_size,
        scale=(args.scale[0], args.scale[1]),
        ratio_range=(args.ratio_range[0], args.ratio_range[1]),
        cat_max_ratio=args.cat_max_ratio,
        photometric=not args.no_photometric,
    )
    return ADE20K(args.data_path, "train", args.num_classes, not args.no_reduce_zero_label, tf)


def build_val_dataset(args: Any) -> ADE20K:
    return ADE20K(args.data_path, "val", args.num_classes, not args.no_reduce_zero_label, None)
