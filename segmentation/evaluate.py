"""Semantic segmentation evaluation: sliding-window inference, multi-scale + flip, mIoU from a confusion matrix.

As mmseg evaluates ADE20K: each validation image is resized so that it fits (4·crop, crop) keeping its
ratio (short side = crop for ordinary photos), predicted by overlapping crop-size windows (stride 2/3 of
the crop: 341 for 512) whose logits are averaged where they overlap, and the logits are resized back to the
original size and compared with the original label.  Metrics come from one confusion matrix accumulated
over the whole split (summed over ranks under torchrun; each image is seen by exactly one rank):
IoU_c = TP / (TP + FP + FN), mIoU = mean over classes present in labels or predictions, mAcc = mean
per-class recall, aAcc = overall pixel accuracy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from maecore import distributed as du
from segmentation.data import ADE20K, IGNORE_INDEX, BadSample, normalize, rescale_size, to_tensor

log = logging.getLogger(__name__)

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------
def window_logits(model: nn.Module, crop: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Logits of one crop; a crop smaller than the window (a narrow image, scale 0.5) is padded at the
    bottom/right to the window (the relative position tables are built for it) and the pad cut off."""
    h, w = crop.shape[-2:]
    ph, pw = window[0] - h, window[1] - w
    if ph > 0 or pw > 0:
        crop = F.pad(crop, (0, max(pw, 0), 0, max(ph, 0)))
    return model(crop)[..., :h, :w]


def window_grid(h: int, w: int, window: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """The sliding windows (y0, y1, x0, x1) over an h x w image, row by row (mmseg's grid: a window every
    ``stride``, the last one flush with the border).  All have the same size, min(window, image) per side."""
    (wh, ww), (sh, sw) = window, stride
    rows = max(h - wh + sh - 1, 0) // sh + 1
    cols = max(w - ww + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh + wh, h), min(c * sw + ww, w)
            boxes.append((max(y1 - wh, 0), y1, max(x1 - ww, 0), x1))
    return boxes


def slide_inference(
    model: nn.Module,
    img: torch.Tensor,
    num_classes: int,
    window: tuple[int, int],
    stride: tuple[int, int],
    window_batch: int = 1,
) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, classes, H, W) logits from overlapping windows (mmseg's grid:
    windows every ``stride``, the last one flush with the border, logits averaged over overlaps).
    ``window_batch`` windows go through the model in one forward pass (1: one at a time, as evaluation runs)."""
    b, _, h, w = img.shape
    out = img.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    boxes = window_grid(h, w, window, stride)
    if window_batch <= 1:
        for y0, y1, x0, x1 in boxes:
            out[:, :, y0:y1, x0:x1] += window_logits(model, img[:, :, y0:y1, x0:x1], window).float()
            count[:, :, y0:y1, x0:x1] += 1
        return out / count
    for s in range(0, len(boxes), window_batch):
        chunk = boxes[s : s + window_batch]
        crops = torch.cat([img[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in chunk])  # same size: see window_grid
        logits = window_logits(model, crops, window).float().view(len(chunk), b, num_classes, *crops.shape[-2:])
        for (y0, y1, x0, x1), lg in zip(chunk, logits):
            out[:, :, y0:y1, x0:x1] += lg
            count[:, :, y0:y1, x0:x1] += 1
    return out / count


def default_stride(window: tuple[int, int]) -> tuple[int, int]:
    """2/3 of the window (512 -> 341, mmseg's ADE20K setting)."""
    return (window[0] * 2 // 3, window[1] * 2 // 3)


def eval_scale(window: tuple[int, int], s: float = 1.0) -> tuple[int, int]:
    """The (long, short) bounds a test image is resized to fit, keeping its ratio: (4·w, h) times ``s``
    (mmseg's ``Resize(scale=(2048, 512))`` for a 512 crop)."""
    return (int(4 * window[1] * s), int(window[0] * s))


@torch.no_grad()
def predict(
    model: nn.Module,
    image: Image.Image,
    num_classes: int,
    window: tuple[int, int],
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str = "cpu",
    amp: str = "none",
    window_batch: int = 1,
) -> torch.Tensor:
    """Class map (H, W) at the image's original size.  Test scale ``(4·crop, crop)`` keeping ratio,
    times each of ``scales``; several passes (scales × flips) average their softmax probabilities.
    ``window_batch``: sliding windows per forward pass (:func:`slide_inference`)."""
    stride = stride or default_stride(window)
    h0, w0 = image.height, image.width
    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    acc = None
    for s, f in passes:
        size = rescale_size(h0, w0, eval_scale(window, s))
        x = normalize(to_tensor(image.resize((size[1], size[0]), Image.BILINEAR)))[None].to(device)
        if f:
            x = x.flip(-1)
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
        with ctx:
            logits = slide_inference(model, x, num_classes, window, stride, window_batch)
        if f:
            logits = logits.flip(-1)
        logits = F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=False)
        score = logits.softmax(1) if len(passes) > 1 else logits
        acc = score if acc is None else acc + score
    return acc[0].argmax(0)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts, rows = ground truth, columns = prediction; ignore (255) and
    out-of-range labels are left out."""
    label = label.reshape(-1).to(torch.int64)
    pred = pred.reshape(-1).to(torch.int64).to(label.device)
    valid = (label != IGNORE_INDEX) & (label >= 0) & (label < num_classes)
    idx = label[valid] * num_classes + pred[valid].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (fractions) and per-class IoU / Acc (NaN for a class absent from both labels
    and predictions, left out of the means as mmseg does)."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    tp = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = cm.sum()
    return {
        "mIoU": float(iou.nanmean()) if (union > 0).any() else float("nan"),
        "mAcc": float(acc.nanmean()) if (gt > 0).any() else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


# ------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------
def palette(num_classes: int) -> np.ndarray:
    """(classes + 1, 3) uint8 colours, spread over hue; the last row (ignore) is black."""
    import colorsys

    cols = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.3 * (i % 3) / 2)
            for i in range(num_classes)]
    pal = np.array(cols) * 255
    return np.concatenate([pal, np.zeros((1, 3))]).astype(np.uint8)


def colorize(classes: np.ndarray, num_classes: int) -> np.ndarray:
    c = np.where((classes >= 0) & (classes < num_classes), classes, num_classes)
    return palette(num_classes)[c]


VIS_MIN_SIDE = 192  # a figure's panels are enlarged to at least this short side (the demo's 64-px images are tiny)
VIS_TITLES = ("image", "ground truth", "prediction")


def _titled(row: np.ndarray, titles: Sequence[str]) -> np.ndarray:
    """``row`` (equal-width panels side by side) under a white band with each panel's title centred over it, in a
    font sized to the panel (1/12 of its width, 12 to 32 px)."""
    from PIL import ImageDraw, ImageFont

    w = row.shape[1] // len(titles)
    size = min(max(12, w // 12), 32)
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: its fixed bitmap font
        font = ImageFont.load_default()
    band = Image.new("RGB", (row.shape[1], int(size * 1.7)), "white")
    draw = ImageDraw.Draw(band)
    for i, title in enumerate(titles):
        draw.text((i * w + w / 2, band.height / 2), title, fill="black", font=font, anchor="mm")
    return np.concatenate([np.asarray(band), row], axis=0)


def save_visual(image: Image.Image, label: np.ndarray, pred: np.ndarray, num_classes: int, path: Path) -> None:
    """image | ground truth | prediction, side by side (ignore = black), each panel titled so.  Small images are
    enlarged by a whole factor, nearest-neighbour (every pixel a crisp block: labels stay exact), to a short side
    of at least :data:`VIS_MIN_SIDE`; larger ones are kept at their size."""
    row = np.concatenate([np.asarray(image), colorize(label, num_classes), colorize(pred, num_classes)], axis=1)
    k = -(-VIS_MIN_SIDE // min(row.shape[:2]))  # ceil: 64 px -> 3x
    if k > 1:
        row = row.repeat(k, axis=0).repeat(k, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_titled(row, VIS_TITLES)).save(path)


# ------------------------------------------------------------------------------------------------
# The evaluation loop
# ------------------------------------------------------------------------------------------------
class _EvalView(torch.utils.data.Dataset):
    """Decodes validation samples (in loader workers); a bad one comes back as its error message."""

    def __init__(self, ds: ADE20K, indices: list[int]) -> None:
        self.ds, self.indices = ds, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        try:
            return self.ds.load(self.indices[i])
        except BadSample as e:
            return str(e)


def _first(batch: list) -> Any:
    return batch[0]


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset: ADE20K,
    window: tuple[int, int],
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str = "cpu",
    amp: str = "none",
    num_workers: int = 0,
    vis_dir: str | Path | None = None,
    num_vis: int = 4,
    max_images: int = 0,
) -> dict[str, Any]:
    """mIoU / mAcc / aAcc (percent, as mmseg reports them), per-class IoU and counts over ``dataset``.

    Under torchrun rank r takes images r, r+W, … and the confusion matrices are summed, so every
    image counts exactly once.  Unusable samples are skipped and counted (``n_skipped``)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    k = dataset.num_classes
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    indices = list(range(du.rank(), n, du.world_size()))
    loader = torch.utils.data.DataLoader(_EvalView(dataset, indices), batch_size=1, num_workers=num_workers,
                                         collate_fn=_first)
    cm = torch.zeros((k, k), dtype=torch.int64, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # images, skipped, out-of-range label pixels
    for j, s in enumerate(loader):
        if isinstance(s, str):
            log.warning("evaluation skips: %s", s)
            counts[1] += 1
            continue
        pred = predict(model, s.image, k, window, stride, scales, flip, device, amp)
        label = torch.from_numpy(s.label).to(device)
        cm += confusion_matrix(pred, label, k)
        counts[0] += 1
        counts[2] += s.n_label_oor
        if vis_dir is not None and j < num_vis and du.is_main():
            save_visual(s.image, s.label, pred.cpu().numpy(), k, Path(vis_dir) / f"{s.name}.png")
    cm = du.all_reduce_sum(cm)
    counts = du.all_reduce_sum(counts)
    model.train(was_training)
    m = metrics_from_confusion(cm.cpu())
    return {
        "mIoU": 100 * m["mIoU"],
        "mAcc": 100 * m["mAcc"],
        "aAcc": 100 * m["aAcc"],
        "IoU_per_class": [round(100 * v, 2) if v == v else None for v in m["IoU"]],
        "n_images": int(counts[0]),
        "n_skipped": int(counts[1] + dataset.num_unlabelled),
        "n_label_oor": int(counts[2]),
    }


def format_results(res: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    lines = [f"mIoU {res['mIoU']:.2f}  mAcc {res['mAcc']:.2f}  aAcc {res['aAcc']:.2f}  "
             f"({res['n_images']} images, {res['n_skipped']} skipped, {res['n_label_oor']} out-of-range label pixels)"]
    for i, v in enumerate(res["IoU_per_class"]):
        name = class_names[i] if class_names and i < len(class_names) else str(i)
        lines.append(f"  {name:>16s}  IoU {'  n/a' if v is None else f'{v:5.2f}'}")
    return "\n".join(lines)
