"""``python -m classification predict CKPT INPUT… -o OUT``: the top-k classes of each image as JSON lines.

The classifier is built from the model flags saved in the checkpoint (:data:`classification.config.MODEL_KEYS`,
as ``--eval --resume`` does: :func:`classification.train.build_model`), images are seen through the training
run's evaluation transform (:func:`classification.data.eval_transform`: resize, centre crop, normalise), and
``OUT/predictions.jsonl`` gets one line per image::

    {"image": "imgs/cat.jpg", "topk": [{"label": "cat", "score": 0.91}, {"label": "dog", "score": 0.05}, ...]}

with the class names the checkpoint saved (``args.classes``, the training folders) and softmax scores in
decreasing order.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from classification.config import ClassificationConfig, check_config, checkpoint_config, parse_config
from classification.data import eval_transform
from classification.train import build_model, trained_view
from maecore.checkpoint import checkpoint_args, unwrap_state_dict
from maecore.cli import OneLineParser, positive_int, run_cli
from maecore.convert import load_weights
from maecore.convert.onnx_export import OnnxModule
from maecore.engine import autocast
from maecore.errors import UserError
from maecore.models.layers import to_2tuple
from maecore.predict import (
    Progress,
    add_predict_args,
    check_task_checkpoint,
    expand_inputs,
    input_batches,
    load_task_checkpoint,
    prepare_output,
    setup_runtime,
)


def get_predict_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m classification predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_args(p, batch_size=32)
    p.add_argument("--topk", type=positive_int, default=5, help="classes per image (at most the class count)")
    return p


def load_classifier(path: str, ckpt: dict[str, Any] | None = None) -> tuple[nn.Module, ClassificationConfig, list[str]]:
    """The trained classifier of a checkpoint of ours, the config that built it and its class names
    (``args.classes``; numbers for outputs beyond them)."""
    ckpt = ckpt if ckpt is not None else load_task_checkpoint(path, "classification")
    cfg = parse_config(["--data_path", "-"])  # parser defaults; the checkpoint's model flags replace them (as --eval)
    cfg = checkpoint_config(cfg, checkpoint_args(ckpt), str(path))
    if msg := check_config(cfg):
        raise UserError(f"{path}: {msg}")
    state = unwrap_state_dict(ckpt)
    head_w = state.get("head.weight", state.get("head.1.weight"))
    num_classes = head_w.shape[0]
    cfg = trained_view(cfg, state)
    model = build_model(cfg, num_classes)
    try:
        load_weights(model, state, "exact")
    except UserError as e:
        raise UserError(f"{path}: does not fit the classifier its args describe ({e})") from None
    saved = (checkpoint_args(ckpt) or {}).get("classes") or []
    if not saved:
        print(f"warning: {path} saved no class names; labels are class numbers", file=sys.stderr)
    names = [str(c) for c in saved][:num_classes] + [str(i) for i in range(len(saved), num_classes)]
    return model.eval(), cfg, names


def topk_records(probs: torch.Tensor, names: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Per row of ``probs`` (B, classes) the ``k`` best classes, highest score first."""
    scores, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[{"label": names[int(j)], "score": round(float(s), 6)} for s, j in zip(srow, irow)]
            for srow, irow in zip(scores.tolist(), idx.tolist())]


@torch.no_grad()
def predict(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = get_predict_parser().parse_args(argv)
    paths = expand_inputs(args.inputs)
    ckpt = load_task_checkpoint(args.checkpoint, "classification")
    device, amp = setup_runtime(args)
    model, margs, names = load_classifier(args.checkpoint, ckpt)
    del ckpt
    model.to(device)
    out_file = prepare_output(args.output) / "predictions.jsonl"
    tf = eval_transform(margs.input_size, margs.crop_pct)
    k = min(args.topk, len(names))
    records: list[dict[str, Any]] = []
    progress = Progress(len(paths), args.progress)
    with open(out_file, "w") as sink:
        for batch in input_batches(paths, tf, args.batch_size, args.num_workers):
            good = []
            for i, x, err in batch:
                if err is not None:
                    progress.skip(paths[i], err)
                else:
                    good.append((i, x))
            if not good:
                continue
            x = torch.stack([t for _, t in good]).to(device)
            with autocast(device, amp):
                logits = model(x)
            probs = logits.float().softmax(dim=1).cpu()
            for (i, _), top in zip(good, topk_records(probs, names, k)):
                rec = {"image": str(paths[i]), "topk": top}
                records.append(rec)
                sink.write(json.dumps(rec) + "\n")
            progress.advance(len(good))
    progress.close(out_file)
    return records


def onnx_module(path: str, ckpt: Any) -> OnnxModule:
    """The classifier for ``python -m pipeline.convert CKPT --to onnx`` (:mod:`maecore.convert.onnx_export`)."""
    model, args, names = load_classifier(path, check_task_checkpoint(ckpt, path, "classification"))
    h, w = to_2tuple(args.input_size)
    return OnnxModule(model, torch.randn(2, 3, h, w), "images", ["logits"],
                      f"normalised images (B, 3, {h}, {w}) -> logits (B, {len(names)}); resize, centre crop and normalise "
                      "(classification.data.eval_transform) on the host")


def cli(argv: list[str] | None = None) -> None:
    run_cli(predict, argv)


if __name__ == "__main__":
    cli()
