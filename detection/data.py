"""COCO instances (any COCO-format dataset) read with pycocotools, and ViTDet's large-scale jitter.

Training: horizontal flip, resize to a random 0.1-2.0 of the target size, fixed-size crop (boxes
clipped, masks cropped, instances left empty removed, boxes recomputed from the masks as ViTDet's
``recompute_boxes``), pad to the square target size.  Test: resize the long side to the target
size and pad; ``meta`` keeps what is needed to map predictions back to the original image.

Bad input never stops a run half-way: images the json lists but the folder lacks are dropped at
start (counted, warned), crowd regions are ignored in training, degenerate boxes and unreadable
segmentations are skipped (counted), unreadable image files are replaced by the next readable one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from maecore.data.images import MAX_SUBSTITUTES, load_rgb
from maecore.errors import UserError

from .model import IMAGENET_MEAN

if TYPE_CHECKING:
    from pycocotools.coco import COCO

log = logging.getLogger(__name__)

Target = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Reading COCO
# --------------------------------------------------------------------------------------------------
def load_coco(ann_file: str | Path) -> COCO:
    """pycocotools' index of an instances json; a missing or malformed file is a one-line error."""
    p = Path(ann_file)
    if not p.is_file():
        raise UserError(f"annotation file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{p}: not a COCO instances file (no 'images' list)")
    if not data.get("categories"):
        raise UserError(f"{p}: no 'categories' (a COCO instances file lists its classes)")
    data.setdefault("annotations", [])
    # pycocotools on use: the converter and the predictors import this module (LSJ) where it may be absent (the GPU image)
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as e:
            raise UserError(f"{p}: malformed COCO entry (missing field {e})") from None
    return coco


def _segmentation_ok(segm: Any) -> bool:
    if isinstance(segm, list):  # polygons: each a flat list of >= 3 points
        return bool(segm) and all(isinstance(poly, list) and len(poly) >= 6 for poly in segm)
    if isinstance(segm, dict):  # RLE, compressed (str/bytes counts) or not (list counts)
        return "counts" in segm and "size" in segm
    return False


def ann_to_mask(segm: Any, h: int, w: int) -> np.ndarray:
    """A polygon list, uncompressed RLE or compressed RLE as an (h, w) uint8 mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle)


class CocoInstances(Dataset):
    """COCO-format instances: ``(image, target)`` with ``target`` = boxes (xyxy), labels (1..K,
    0 is background), masks (N, H, W) uint8, image_id, and ``meta`` for mapping predictions back.

    ``train=True`` ignores crowd regions and builds masks; ``train=False`` yields images and meta
    only (COCOeval reads the ground truth from the json itself)."""

    def __init__(self, img_dir: str | Path, ann_file: str | Path, transform=None, train: bool = True) -> None:
        self.img_dir = Path(img_dir)
        if not self.img_dir.is_dir():
            raise UserError(f"image directory not found: {self.img_dir}")
        self.ann_file = Path(ann_file)
        self.coco = load_coco(ann_file)
        self.transform = transform
        self.train = train
        self.cat_ids: list[int] = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.cat_ids]
        self.skipped: Counter[str] = Counter()

        ids = []
        for img_id in sorted(self.coco.imgs):
            info = self.coco.imgs[img_id]
            if not (self.img_dir / str(info.get("file_name", ""))).is_file():
                self.skipped["missing image file"] += 1
                if self.skipped["missing image file"] <= 3:
                    log.warning("%s: image %s (%s) not found in %s; skipped",
                                self.ann_file.name, img_id, info.get("file_name"), self.img_dir)
                continue
            ids.append(img_id)
        if not ids:
            raise UserError(f"{self.ann_file}: none of its {len(self.coco.imgs)} images is in {self.img_dir}")
        self.ids = ids

        # Which annotations train: decided once, from the json, so workers agree and counts are exact.
        self.anns: dict[int, list[dict]] = {}
        self.num_instances = 0
        for img_id in ids:
            keep = []
            for a in self.coco.imgToAnns.get(img_id, []):
                bbox = a.get("bbox")
                if a.get("iscrowd", 0):
                    self.skipped["crowd region (ignored)"] += 1
                elif a.get("category_id") not in self.cat_to_label:
                    self.skipped["unknown category"] += 1
                elif not (isinstance(bbox, list) and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0):
                    self.skipped["degenerate box"] += 1
                elif not _segmentation_ok(a.get("segmentation")):
                    self.skipped["unreadable segmentation"] += 1
                else:
                    keep.append(a)
            self.anns[img_id] = keep
            self.num_instances += len(keep)
        self.num_empty = sum(not v for v in self.anns.values())
        bad = {k: v for k, v in self.skipped.items() if k != "crowd region (ignored)"}
        if bad:
            log.warning("%s: skipped %s", self.ann_file.name, ", ".join(f"{v} x {k}" for k, v in sorted(bad.items())))

    def summary(self) -> str:
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items())) or "nothing"
        return (f"{self.ann_file.name}: {len(self.ids)} images ({self.num_empty} without instances), "
                f"{self.num_instances} instances, {len(self.cat_ids)} classes; skipped {skipped}")

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> tuple[int, Image.Image]:
        for tried in range(MAX_SUBSTITUTES):
            img_id = self.ids[(index + tried) % len(self.ids)]
            path = self.img_dir / self.coco.imgs[img_id]["file_name"]
            try:
                return img_id, load_rgb(path)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                log.warning("skipping unreadable image %s: %s", path, e)
        raise UserError(f"{MAX_SUBSTITUTES} unreadable images in a row near {self.ids[index]}")

    def target_for(self, img_id: int, h: int, w: int) -> Target:
        boxes, labels, masks = [], [], []
        for a in self.anns[img_id] if self.train else []:
            try:
                m = ann_to_mask(a["segmentation"], h, w)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                log.warning("image %s annotation %s: unreadable segmentation (%s); skipped", img_id, a.get("id"), e)
                continue
            if m.shape != (h, w):  # json size disagrees with the file: the mask cannot be placed
                log.warning("image %s annotation %s: mask %s vs image %s; skipped", img_id, a.get("id"), m.shape, (h, w))
                continue
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes.append([max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)])
            labels.append(self.cat_to_label[a["category_id"]])
            masks.append(m)
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
            "image_id": img_id,
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        img_id, pil = self.load_image(index)
        w, h = pil.size
        image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        target = self.target_for(img_id, h, w)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Detection batches stay lists (images of a batch may differ in size before padding)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# --------------------------------------------------------------------------------------------------
# Large-scale jitter
# --------------------------------------------------------------------------------------------------
def _pad(image: torch.Tensor, size: int) -> torch.Tensor:
    """Pad bottom/right to size x size with the mean colour (0 after normalisation, as detectron2)."""
    c, h, w = image.shape
    out = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1).expand(c, size, size).clone()
    out[:, :h, :w] = image
    return out


def _resize(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(image.shape[-2:]):
        return image
    down = h < image.shape[-2]
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=down)[0].clamp_(0, 1)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x0, y0, x1, y1) boxes of binary masks, in pixel-edge coordinates (x1 = last column + 1)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.bool().any(2), masks.bool().any(1)
    h, w = masks.shape[-2:]
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    return torch.stack([x0, y0, x1, y1], 1).float()


class LSJ:
    """ViTDet's large-scale jitter (train) or resize-long-side-and-pad (test) to ``size`` x ``size``.

    Randomness comes from torch's global generator, which the engine seeds per sample."""

    def __init__(self, size: int, train: bool = True, scale: tuple[float, float] = (0.1, 2.0), flip: float = 0.5) -> None:
        self.size, self.train, self.scale, self.flip = size, train, scale, flip

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        return self.train_step(image, target) if self.train else self.test_step(image, target)

    def test_step(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        h, w = image.shape[-2:]
        s = self.size / max(h, w)
        nh, nw = min(max(round(h * s), 1), self.size), min(max(round(w * s), 1), self.size)
        image = _pad(_resize(image, nh, nw), self.size)
        out = {k: v for k, v in target.items() if k not in ("masks",)}
        out["boxes"] = target["boxes"] * s
        out["orig_size"] = torch.tensor([h, w])
        out["content_size"] = torch.tensor([nh, nw])
        return image, out

    def train_step(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        size = self.size
        h, w = image.shape[-2:]
        boxes, masks = target["boxes"].clone(), target["masks"]
        if float(torch.rand(())) < self.flip:
            image, masks = image.flip(-1), masks.flip(-1)
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        # detectron2's ResizeScale: fit the image into (r*size)^2, r ~ U(scale)
        r = self.scale[0] + (self.scale[1] - self.scale[0]) * float(torch.rand(()))
        s = min(r * size / h, r * size / w)
        nh, nw = max(round(h * s), 1), max(round(w * s), 1)
        # FixedSizeCrop: random offset when the scaled image is larger than the target
        ch, cw = min(size, nh), min(size, nw)
        oy = round((nh - ch) * float(torch.rand(())))
        ox = round((nw - cw) * float(torch.rand(())))
        image = _resize(image, nh, nw)[:, oy : oy + ch, ox : ox + cw]
        # masks: nearest sampling of only the cropped window (a 2x-scaled full mask stack can be huge)
        rows = ((torch.arange(oy, oy + ch) + 0.5) * (h / nh)).long().clamp_(max=h - 1)
        cols = ((torch.arange(ox, ox + cw) + 0.5) * (w / nw)).long().clamp_(max=w - 1)
        masks = masks[:, rows][:, :, cols]
        boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        boxes -= torch.tensor([ox, oy, ox, oy], dtype=boxes.dtype)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
        # drop instances the crop emptied; boxes = tight boxes of the cropped masks (recompute_boxes)
        keep = (masks.flatten(1) != 0).any(1)
        masks = masks[keep]
        out = dict(target)
        out["geometric_boxes"] = boxes[keep]  # the boxes moved geometrically (for checks), before recomputing
        out["boxes"] = masks_to_boxes(masks)
        out["labels"] = target["labels"][keep]
        out["masks"] = F.pad(masks, (0, size - cw, 0, size - ch))
        return _pad(image, size), out


def build_datasets(
    data_path: str | Path | None,
    image_size: int,
    train_json: str | None = None,
    train_images: str | None = None,
    val_json: str | None = None,
    val_images: str | None = None,
    scale: tuple[float, float] = (0.1, 2.0),
    need_train: bool = True,
) -> tuple[CocoInstances | None, CocoInstances]:
    """Train and val sets of a COCO 2017 layout (``train2017/``, ``val2017/``,
    ``annotations/instances_{train,val}2017.json``) or explicit json/image paths."""
    root = Path(data_path) if data_path else None

    def pick(explicit: str | None, rel: str) -> Path:
        if explicit:
            return Path(explicit)
        if root is None:
            raise UserError(f"no COCO root and no explicit path for {rel}")
        return root / rel

    if root is not None and not root.is_dir():
        raise UserError(f"data directory not found: {root}")
    train = None
    if need_train:
        train = CocoInstances(pick(train_images, "train2017"), pick(train_json, "annotations/instances_train2017.json"),
                              LSJ(image_size, True, scale), train=True)
    val = CocoInstances(pick(val_images, "val2017"), pick(val_json, "annotations/instances_val2017.json"),
                        LSJ(image_size, False), train=False)
    if train is not None and train.cat_ids != val.cat_ids:
        raise UserError(f"train and val list different categories ({len(train.cat_ids)} vs {len(val.cat_ids)})")
    return train, val


__all__ = ["LSJ", "CocoInstances", "ann_to_mask", "build_datasets", "collate", "load_coco", "masks_to_boxes"]
