"""COCO evaluation of a Mask R-CNN: predictions in original image coordinates, COCOeval bbox + segm,
a COCO result json, and an overlay figure of predictions on a few val images.

Under ``torchrun`` every rank predicts its shard of the val images; the per-image results are
gathered once (keyed by image id, so padding duplicates of the sampler count once) and rank 0 runs
COCOeval; the metrics are then shared with every rank.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from maecore import distributed as du
from maecore.engine import autocast, to_device
from maecore.figures import save_figure

from .data import CocoInstances, collate

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(model: nn.Module, images: list[torch.Tensor], targets: list[dict], amp: str = "none") -> list[dict]:
    """Detections mapped back to each original image: boxes (xyxy), labels, scores, masks (N,1,H,W) probs.

    The images are LSJ test views (long side resized, padded); the content size is handed to the
    RPN and box head, so proposals and boxes are clipped to the real image and not to the padding,
    and torchvision's postprocess rescales boxes and pastes masks at the original size."""
    model = getattr(model, "module", model)
    image_list, _ = model.transform(images)
    image_list.image_sizes = [tuple(int(v) for v in t["content_size"]) for t in targets]
    orig = [tuple(int(v) for v in t["orig_size"]) for t in targets]
    with autocast(image_list.tensors.device, amp):
        feats = model.backbone(image_list.tensors)
    feats = {k: v.float() for k, v in feats.items()}
    proposals, _ = model.rpn(image_list, feats)
    dets, _ = model.roi_heads(feats, proposals, image_list.image_sizes)
    return model.transform.postprocess(dets, image_list.image_sizes, orig)


def to_coco_results(det: dict, image_id: int, cat_ids: Sequence[int], mask_thresh: float = 0.5) -> list[dict]:
    """One image's detections as COCO result entries (bbox xywh, compressed-RLE segmentation)."""
    boxes = det["boxes"].float().cpu().numpy()
    scores = det["scores"].float().cpu().numpy()
    labels = det["labels"].cpu().numpy()
    masks = (det["masks"][:, 0] > mask_thresh).cpu().numpy().astype(np.uint8) if "masks" in det else None
    # pycocotools on use (as in detection.data): the converter imports this module where it may be absent
    from pycocotools import mask as mask_utils

    out = []
    for i in range(len(scores)):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        r = {"image_id": int(image_id), "category_id": int(cat_ids[int(labels[i]) - 1]),
             "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "score": round(float(scores[i]), 5)}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i]))
            r["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        out.append(r)
    return out


def run_cocoeval(coco_gt, results: list[dict], img_ids: Sequence[int], iou_type: str,
                 summary: list[str] | None = None) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl in percent (detectron2's scale) for ``bbox`` or ``segm``.  COCOeval's own
    12-line summary is appended to ``summary`` (evaluate_coco writes it to a file) instead of being printed."""
    if not results:
        log.warning("no detections: %s AP is 0", iou_type)
        return {k: 0.0 for k in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(coco_gt, coco_dt, iou_type)
    ev.params.imgIds = sorted(img_ids)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if summary is not None:
        summary.append(f"COCOeval {iou_type}:\n{buf.getvalue().rstrip()}")
    # -1 marks "no ground truth in this size range"; report it as nan rather than a fake -100
    return {k: (float(v) * 100 if v >= 0 else float("nan")) for k, v in zip(STAT_NAMES, ev.stats[:6])}


def one_line(metrics: dict[str, float]) -> str:
    """The evaluation in one line: box and mask AP / AP50 / AP75 and what was evaluated."""
    def part(t: str) -> str:
        return f"{t} AP {metrics[f'{t}/AP']:.1f} (AP50 {metrics[f'{t}/AP50']:.1f}, AP75 {metrics[f'{t}/AP75']:.1f})"

    return (f"COCO eval: {part('bbox')}, {part('segm')} on {int(metrics['n_images'])} images, "
            f"{int(metrics['n_detections'])} detections")


def merge_shards(parts: Sequence[dict[int, list[dict]]]) -> dict[int, list[dict]]:
    """Per-image results of all ranks, one entry per image id (a sampler that pads its shards would
    otherwise count an image twice)."""
    merged: dict[int, list[dict]] = {}
    for part in parts:
        for img_id, res in part.items():
            merged.setdefault(int(img_id), res)
    return merged


def evaluate_coco(
    model: nn.Module,
    dataset: CocoInstances,
    device: torch.device,
    output_dir: str | Path | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    amp: str = "none",
    max_images: int = 0,
    vis_images: int = 4,
    vis_name: str = "predictions.png",
) -> dict[str, float]:
    """Predict on ``dataset`` (this rank's shard), gather per-image results, run COCOeval bbox and
    segm on rank 0, write ``coco_instances_results.json`` / ``cocoeval.txt`` / the overlay figure,
    and return ``{"bbox/AP": …, "segm/AP50": …, "n_images": …, "n_detections": …}`` on every rank (what the run's
    ``log.jsonl`` records; ``--eval`` writes it to ``eval.json``)."""
    was_training = model.training
    model.eval()
    n = min(len(dataset), max_images) if max_images else len(dataset)
    shard = list(range(du.rank(), n, du.world_size()))
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    per_image: dict[int, list[dict]] = {}
    for images, targets in loader:
        outs = predict(model, to_device(images, device), targets, amp)
        for det, t in zip(outs, targets):
            per_image[int(t["image_id"])] = to_coco_results(det, int(t["image_id"]), dataset.cat_ids)
    model.train(was_training)

    gathered = du.all_gather_object(per_image)
    metrics: dict[str, float] = {}
    if du.is_main():
        merged = merge_shards(gathered)
        results = [r for img in sorted(merged) for r in merged[img]]
        img_ids = sorted(merged)
        summary: list[str] = []
        for iou_type in ("bbox", "segm"):
            for k, v in run_cocoeval(dataset.coco, results, img_ids, iou_type, summary).items():
                metrics[f"{iou_type}/{k}"] = v
        metrics["n_images"] = len(img_ids)  # counts as integers, as in the other tasks' records
        metrics["n_detections"] = len(results)
        print(one_line(metrics))  # the whole table goes to cocoeval.txt
        if output_dir is not None:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "coco_instances_results.json").write_text(json.dumps(results))
            (out / "cocoeval.txt").write_text("\n\n".join(summary) + "\n")
            if vis_images:
                overlay_figure(dataset, merged, out / vis_name, vis_images)
    return du.all_gather_object(metrics)[0]


def overlay_figure(dataset: CocoInstances, per_image: dict[int, list[dict]], path: str | Path, n: int = 4,
                   score_thresh: float = 0.5, max_shown: int = 10) -> Path:
    """The first ``n`` evaluated images twice: the ground truth (masks, boxes, class names) above the predictions
    (masks, boxes, class names and scores), so a reader sees at a glance whether the right objects were found.

    Each box carries a number on the image; its class name (and score) are written in a margin below the panel,
    beside a swatch of the box's colour, in a font sized to the panel, not to the image: the demo's 64-px images
    leave no room for words on the picture itself.

    Shown predictions: class-agnostic NMS at IoU 0.5 first (COCOeval scores every class's box; a figure with one
    box per class on the same object says little), then those scoring >= ``score_thresh``; where none does (an
    early or weak model) the best k, k = the image's number of ground-truth objects; at most ``max_shown`` (the
    highest scoring: one colour each)."""
    import matplotlib
    from pycocotools import mask as mask_utils

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.ops import nms

    from maecore.data.images import try_load_rgb

    ids = [i for i in dataset.ids if i in per_image][:n]
    names = {c: dataset.coco.cats[c].get("name", str(c)) for c in dataset.cat_ids}
    cmap = plt.get_cmap("tab10")
    panels: list[tuple[np.ndarray | None, list, str, list, str]] = []  # image, ground truth, title, predictions, title
    for img_id in ids:
        info = dataset.coco.imgs[img_id]
        if (pil := try_load_rgb(dataset.img_dir / info["file_name"])) is None:
            panels.append((None, [], "", [], ""))  # unreadable (warned): empty panels, the figure goes on
            continue
        gt = [a for a in dataset.coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        gt_objs = [(dataset.coco.annToMask(a).astype(bool), a["bbox"], names.get(a["category_id"], "?")) for a in gt]
        ranked = sorted(per_image[img_id], key=lambda d: -d["score"])
        if ranked:
            xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in ranked)], dtype=torch.float32)
            keep = nms(xyxy, torch.tensor([d["score"] for d in ranked]), 0.5).tolist()
            ranked = [ranked[i] for i in keep]
        dets = [d for d in ranked if d["score"] >= score_thresh]
        shown = f"{len(dets)} >= {score_thresh}"
        if not dets:
            dets = ranked[: max(1, len(gt))]
            shown = f"best {len(dets)} (none >= {score_thresh})"
        if len(dets) > max_shown:
            shown = f"best {max_shown} of {len(dets)} >= {score_thresh}"
            dets = dets[:max_shown]
        pred_objs = [(mask_utils.decode(d["segmentation"]).astype(bool) if "segmentation" in d else None, d["bbox"],
                      f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}") for d in dets]
        panels.append((np.asarray(pil, dtype=np.float32) / 255, gt_objs, f"image {img_id}: ground truth ({len(gt)})",
                       pred_objs, f"predicted: {shown}"))

    def legend_rows(most: int) -> tuple[int, float]:
        """Legend columns, and the margin's height in inches (one 9-pt line per legend row)."""
        ncol = 1 if most <= 3 else 2
        return ncol, 0.25 * -(-max(most, 1) // ncol) + 0.15

    (gt_cols, gt_margin), (pred_cols, pred_margin) = (legend_rows(max([len(p[i]) for p in panels] + [0])) for i in (1, 3))
    cols = max(len(ids), 1)
    fig, axes = plt.subplots(4, cols, figsize=(3.2 * cols, 2 * 3.1 + gt_margin + pred_margin), squeeze=False,
                             gridspec_kw={"height_ratios": [3.1, gt_margin, 3.1, pred_margin]})
    from matplotlib.patches import Patch

    def draw(ax, leg, img: np.ndarray, objs: list[tuple[np.ndarray | None, list[float], str]], title: str,
             ncol: int) -> None:
        img = img.copy()
        for k, (m, _, _) in enumerate(objs):
            if m is not None and m.shape == img.shape[:2]:
                img[m] = 0.55 * img[m] + 0.45 * np.array(cmap(k % 10)[:3], dtype=np.float32)
        ax.imshow(img)
        for k, (_, (x, y, w, h), _) in enumerate(objs):
            color = cmap(k % 10)
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=1.5))
            ax.text(x, y, str(k + 1), fontsize=8, fontweight="bold", color="white", va="top", clip_on=True,
                    bbox=dict(facecolor=color, alpha=0.85, pad=1.0, linewidth=0))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        leg.axis("off")
        if objs:
            leg.legend(handles=[Patch(facecolor=cmap(k % 10), label=f"{k + 1}  {text}") for k, (_, _, text) in enumerate(objs)],
                       loc="upper left", ncol=ncol, fontsize=9, frameon=False, handlelength=1.0, borderaxespad=0.0,
                       columnspacing=1.0)

    for col, (img, gt_objs, gt_title, pred_objs, pred_title) in enumerate(panels):
        if img is None:
            for row in range(4):
                axes[row, col].axis("off")
            continue
        draw(axes[0, col], axes[1, col], img, gt_objs, gt_title, gt_cols)
        draw(axes[2, col], axes[3, col], img, pred_objs, pred_title, pred_cols)
    if not panels:
        for ax in axes.flat:
            ax.axis("off")
    return save_figure(fig, path, dpi=120)


__all__ = ["STAT_NAMES", "evaluate_coco", "merge_shards", "overlay_figure", "predict", "run_cocoeval", "to_coco_results"]
