"""``python -m segmentation predict CKPT INPUT… -o OUT``: a class map for every image, at its own resolution.

The segmentor is built from the model flags saved in the checkpoint (:data:`segmentation.config.MODEL_KEYS`, as
``--eval --resume`` does: :func:`segmentation.train.build_model`); every image, whatever its size, is predicted
as the evaluation predicts it (:func:`segmentation.evaluate.predict`: resized to fit (4·crop, crop) keeping its
ratio, overlapping crop-size windows whose logits are averaged, logits resized back to the image).  Written to
OUT:

* ``<name>.png``: the label map, one 8-bit class index per pixel, at the input's resolution (class k of the
  model is k; ``--dataset_labels`` writes k+1 for a model trained with ``reduce_zero_label``, the ADE20K
  annotation encoding, so the maps compare directly with the annotations);
* ``overlays/<name>.png``: the image blended with the colour map (the evaluation's palette).

``--batch_size`` is the number of sliding windows per forward pass (an image is many windows).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from maecore.checkpoint import checkpoint_args, unwrap_state_dict
from maecore.cli import OneLineParser, positive_int, run_cli, upgrade_saved_args
from maecore.convert.onnx_export import OnnxModule
from maecore.engine import autocast
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
from segmentation.config import SegmentationConfig, check_config, checkpoint_config, parse_config
from segmentation.evaluate import MS_SCALES, colorize
from segmentation.evaluate import predict as predict_image
from segmentation.train import build_model


def get_predict_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m segmentation predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_args(p, batch_size=4, batch_help="sliding windows per forward pass")
    p.add_argument("--stride", type=positive_int, default=None, help="sliding-window stride (default 2/3 of the crop)")
    p.add_argument("--aug_test", action="store_true", help="multi-scale (0.5-1.75) + flip")
    p.add_argument("--dataset_labels", action="store_true",
                   help="write class k as k+1 when the model was trained with reduce_zero_label (the annotations' encoding)")
    p.add_argument("--no_overlays", dest="overlays", action="store_false", help="write the label maps only")
    return p


def load_segmentor(path: str, ckpt: dict[str, Any] | None = None) -> tuple[nn.Module, SegmentationConfig]:
    """The trained segmentor of a checkpoint of ours and the config that built it (``no_reduce_zero_label`` too)."""
    ckpt = ckpt if ckpt is not None else load_task_checkpoint(path, "segmentation")
    cfg = parse_config(["--data_path", "-"])  # parser defaults; the checkpoint's model flags replace them (as --eval)
    saved = upgrade_saved_args(checkpoint_args(ckpt)) or {}
    cfg = checkpoint_config(cfg, saved, str(path))
    if msg := check_config(cfg):
        raise UserError(f"{path}: {msg}")
    cfg = replace(cfg, no_reduce_zero_label=bool(saved.get("no_reduce_zero_label", False)))
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(unwrap_state_dict(ckpt), strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: does not fit the segmentor its args describe (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), cfg


def overlay(pil: Image.Image, pred: np.ndarray, num_classes: int, alpha: float = 0.5) -> Image.Image:
    """The image blended with the colour map of ``pred``."""
    img = np.asarray(pil, dtype=np.float32)
    return Image.fromarray(((1 - alpha) * img + alpha * colorize(pred, num_classes)).round().astype(np.uint8))


@torch.no_grad()
def predict(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_predict_parser().parse_args(argv)
    paths = expand_inputs(args.inputs)
    ckpt = load_task_checkpoint(args.checkpoint, "segmentation")
    device, amp = setup_runtime(args)
    model, margs = load_segmentor(args.checkpoint, ckpt)
    del ckpt
    model.to(device)
    out = prepare_output(args.output)
    stems = output_stems(paths)
    if args.overlays:
        (out / "overlays").mkdir(exist_ok=True)
    k = margs.num_classes
    window = (margs.input_size, margs.input_size)
    stride = (args.stride, args.stride) if args.stride else None
    offset = 1 if args.dataset_labels and not margs.no_reduce_zero_label else 0
    written: dict[str, Any] = {}
    progress = Progress(len(paths), args.progress)
    # evaluate.predict runs bf16 itself; fp16 (a --amp choice on GPUs) is set around it
    ctx = (lambda: autocast(device, amp)) if amp == "fp16" else contextlib.nullcontext
    for batch in input_batches(paths, None, 1, args.num_workers):
        for i, pil, err in batch:
            if err is not None:
                progress.skip(paths[i], err)
                continue
            with ctx():
                pred = predict_image(model, pil, k, window, stride, MS_SCALES if args.aug_test else (1.0,), args.aug_test,
                                     device, amp, window_batch=args.batch_size)
            pred = pred.cpu().numpy().astype(np.uint8)
            Image.fromarray(pred + offset if offset else pred).save(out / f"{stems[i]}.png")
            if args.overlays:
                overlay(pil, pred, k).save(out / "overlays" / f"{stems[i]}.png")
            written[str(paths[i])] = out / f"{stems[i]}.png"
            progress.advance(1)
    progress.close(out)
    return written


def onnx_module(path: str, ckpt: Any) -> OnnxModule:
    """One sliding window of the segmentor for ``python -m pipeline.convert CKPT --to onnx``."""
    model, args = load_segmentor(path, check_task_checkpoint(ckpt, path, "segmentation"))
    s = args.input_size
    return OnnxModule(model, torch.randn(2, 3, s, s), "images", ["logits"],
                      f"one window, normalised (B, 3, {s}, {s}) -> logits (B, {args.num_classes}, {s}, {s}); the sliding "
                      "windows, their averaging and the resize to the image (segmentation.evaluate.predict) on the host")


def cli(argv: list[str] | None = None) -> None:
    run_cli(predict, argv)


if __name__ == "__main__":
    cli()
