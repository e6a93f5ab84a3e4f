"""``python -m detection predict CKPT INPUT… -o OUT``: instances of the trained detector on any images.

The detector is built from the model flags saved in the checkpoint (:data:`detection.config.MODEL_KEYS`,
as ``--eval --resume`` does: :func:`detection.train.build_model`).  Each image gets the evaluation's test view
(:class:`detection.data.LSJ` with ``train=False``: long side resized to the input size, padded to a square)
and the evaluation's forward (:func:`detection.evaluate.predict`), which maps boxes and masks back to the
image's own resolution.  Written to OUT:

* ``coco_instances_results.json``: COCO results (``image_id``, ``category_id``, ``bbox`` xywh, ``score``,
  ``segmentation`` as compressed RLE) with the dataset's category ids, which training saved in the checkpoint
  (``args.category_ids`` / ``category_names``; older checkpoints fall back to 1..K with a warning);
* ``images.json``: the ``images`` and ``categories`` of a COCO file for those results (image id, file, size),
  so ``COCO("images.json").loadRes("coco_instances_results.json")`` reads them;
* ``overlays/<name>.png``: masks, boxes, class names and scores of the detections at or above ``--score_thresh``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from detection.config import DetectionConfig, check_config, checkpoint_config, parse_config
from detection.data import LSJ
from detection.evaluate import predict as predict_batch
from detection.evaluate import to_coco_results
from detection.train import build_model
from maecore.checkpoint import checkpoint_args, unwrap_state_dict
from maecore.cli import OneLineParser, ratio, run_cli, upgrade_saved_args
from maecore.convert.onnx_export import OnnxModule
from maecore.errors import UserError
from maecore.predict import (
    Progress,
    add_predict_args,
    check_task_checkpoint,
    expand_inputs,
    input_batches,
    load_task_checkpoint,
    output_stems,
    prepare_output,
    setup_runtime,
)

# distinct colours for the overlays (one per category, cycling)
COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


def get_predict_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m detection predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_args(p, batch_size=2)
    p.add_argument("--score_thresh", type=ratio(0.0, 1.0), default=0.5,
                   help="detections drawn in the overlays (the results json keeps all the detector returns)")
    p.add_argument("--no_overlays", dest="overlays", action="store_false", help="write the results json only")
    return p


def load_detector(path: str, ckpt: dict[str, Any] | None = None) -> tuple[nn.Module, DetectionConfig, list[int], list[str]]:
    """The trained detector of a checkpoint of ours, the config that built it, and its category ids and names."""
    ckpt = ckpt if ckpt is not None else load_task_checkpoint(path, "detection")
    cfg = parse_config([])  # parser defaults; the checkpoint's model flags replace them (as --eval)
    saved = upgrade_saved_args(checkpoint_args(ckpt)) or {}
    cfg = checkpoint_config(cfg, saved, str(path))
    if msg := check_config(cfg):
        raise UserError(f"{path}: {msg}")
    state = unwrap_state_dict(ckpt)
    num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1
    cfg = replace(cfg, finetune="")  # the weights are the checkpoint's, whole
    model = build_model(cfg, num_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: does not fit the detector its args describe (missing {missing[:3]}, unexpected {unexpected[:3]})")
    cat_ids, names = saved.get("category_ids"), saved.get("category_names")
    if not (isinstance(cat_ids, list) and len(cat_ids) == num_classes):
        print(f"warning: {path} does not record the dataset's category ids (trained before they were saved); "
              f"writing 1..{num_classes}", file=sys.stderr)
        cat_ids = list(range(1, num_classes + 1))
    if not (isinstance(names, list) and len(names) == num_classes):
        names = [str(c) for c in cat_ids]
    return model.eval(), cfg, [int(c) for c in cat_ids], [str(n) for n in names]


class TestView:
    """PIL image -> (the evaluation's test view, its target with the original and content sizes, the image)."""

    def __init__(self, size: int, keep_image: bool) -> None:
        self.lsj = LSJ(size, train=False)
        self.keep_image = keep_image

    def __call__(self, pil: Image.Image) -> tuple[torch.Tensor, dict[str, Any], Image.Image | None]:
        image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        view, target = self.lsj.test_step(image, {"boxes": torch.zeros((0, 4))})
        return view, target, (pil if self.keep_image else None)


def draw_overlay(pil: Image.Image, results: list[dict[str, Any]], names: dict[int, str], score_thresh: float) -> Image.Image:
    """Masks (blended), boxes and ``name score`` labels of the results at or above ``score_thresh``."""
    from pycocotools import mask as mask_utils

    img = np.asarray(pil, dtype=np.float32).copy()
    shown = sorted((r for r in results if r["score"] >= score_thresh), key=lambda r: r["score"])
    order = {c: i for i, c in enumerate(sorted(names))}
    for r in shown:
        colour = np.array(COLOURS[order.get(r["category_id"], 0) % len(COLOURS)], dtype=np.float32)
        if "segmentation" in r:
            m = mask_utils.decode(r["segmentation"]).astype(bool)
            if m.shape == img.shape[:2]:
                img[m] = 0.5 * img[m] + 0.5 * colour
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for r in shown:
        colour = COLOURS[order.get(r["category_id"], 0) % len(COLOURS)]
        x, y, w, h = r["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=max(1, round(min(pil.size) / 300)))
        label = f"{names.get(r['category_id'], r['category_id'])} {r['score']:.2f}"
        tx, ty = x, max(y - 11, 0)
        box = draw.textbbox((tx, ty), label)
        draw.rectangle(box, fill=colour)
        draw.text((tx, ty), label, fill=(0, 0, 0) if sum(colour) > 400 else (255, 255, 255))
    return out


@torch.no_grad()
def predict(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = get_predict_parser().parse_args(argv)
    paths = expand_inputs(args.inputs)
    ckpt = load_task_checkpoint(args.checkpoint, "detection")
    device, amp = setup_runtime(args)
    model, margs, cat_ids, cat_names = load_detector(args.checkpoint, ckpt)
    del ckpt
    model.to(device)
    out = prepare_output(args.output)
    stems = output_stems(paths)
    names = dict(zip(cat_ids, cat_names))
    if args.overlays:
        (out / "overlays").mkdir(exist_ok=True)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    progress = Progress(len(paths), args.progress)
    for batch in input_batches(paths, TestView(margs.input_size, args.overlays), args.batch_size, args.num_workers):
        good = []
        for i, item, err in batch:
            if err is not None:
                progress.skip(paths[i], err)
            else:
                good.append((i, *item))
        if not good:
            continue
        views = [v.to(device) for _, v, _, _ in good]
        dets = predict_batch(model, views, [t for _, _, t, _ in good], amp)
        for (i, _, target, pil), det in zip(good, dets):
            image_id = len(images) + 1
            h, w = (int(v) for v in target["orig_size"])
            images.append({"id": image_id, "file_name": str(paths[i]), "height": h, "width": w})
            res = to_coco_results(det, image_id, cat_ids)
            results += res
            if pil is not None:
                draw_overlay(pil, res, names, args.score_thresh).save(out / "overlays" / f"{stems[i]}.png")
        progress.advance(len(good))
    (out / "coco_instances_results.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps({
        "images": images, "annotations": [],
        "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, cat_names)],
    }))
    progress.close(out)
    print(f"{len(results)} detections (score >= {margs.score_thresh:g}) on {len(images)} images in "
          f"{out / 'coco_instances_results.json'}" + (f"; overlays in {out / 'overlays'}" if args.overlays else ""))
    return results


class PyramidOutputs(nn.Module):
    """The detector's backbone (trunk + feature pyramid) with the levels as a tuple: what ``--to onnx`` exports."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone(images).values())


def onnx_module(path: str, ckpt: Any) -> OnnxModule:
    """The detector's backbone for ``python -m pipeline.convert CKPT --to onnx``."""
    model, args, _, _ = load_detector(path, check_task_checkpoint(ckpt, path, "detection"))
    s = args.input_size
    return OnnxModule(PyramidOutputs(model.backbone).eval(), torch.randn(2, 3, s, s), "images", ["p2", "p3", "p4", "p5", "p6"],
                      f"the backbone, normalised padded images (B, 3, {s}, {s}) -> pyramid p2..p6; the test view "
                      "(detection.data.LSJ) on the host, torchvision's RPN and RoI heads in PyTorch")


def cli(argv: list[str] | None = None) -> None:
    run_cli(predict, argv)


if __name__ == "__main__":
    cli()
