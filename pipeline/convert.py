"""Convert MAE / ViT weights between our checkpoints, the official MAE releases, timm, HF ViTMAE,
detectron2 ViTDet, mmsegmentation, mmdetection and our task backbones.

Example: python -m pipeline.convert mae_pretrain_vit_base.pth -o vitdet_b_init.pth --to detectron2
(``python tools/convert.py`` is the same command).

A trained task checkpoint of this toolkit converts whole, by its task's ``export`` module (:data:`TASKS`): a
classifier ``--to timm`` (with its head; a folder name writes timm's local model folder), a segmentor ``--to
mmseg`` (backbone, neck and heads), a detector ``--to detectron2`` (trunk, pyramid, RPN, box and mask heads);
``--to onnx`` asks the task's ``predict`` module for its network.  The converter library itself
(:mod:`maecore.convert`) knows no task package: this command, in the one package that imports every task, joins them.

The source format is detected from the file (``--from`` overrides).  A table of what happened to every
key is printed: converted, renamed, dropped (and why), new in the target (and how it starts),
position tables resampled.  Unknown keys and shape mismatches are refused by name; DST is never
overwritten without ``--force``; every bad input ends with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import classification.export
import classification.predict
import detection.export
import detection.predict
import segmentation.export
import segmentation.predict
from maecore.cli import OneLineParser, run_cli, size_type
from maecore.convert import formats
from maecore.convert.io import load_source, read_checkpoint
from maecore.convert.keys import infer_arch
from maecore.convert.onnx_export import export_onnx, require_onnx
from maecore.convert.pipeline import convert, write_converted
from maecore.convert.trained import describe_task, task_of, trained_parts, trained_route
from maecore.errors import UserError

parse_size = size_type(1)


class Task(NamedTuple):
    """What the converter asks of a task package: its whole-model export (``export``, ``write``) and the network
    ``--to onnx`` writes (``predict.onnx_module``)."""

    export: ModuleType
    predict: ModuleType


TASKS: dict[str, Task] = {
    "classification": Task(classification.export, classification.predict),
    "detection": Task(detection.export, detection.predict),
    "segmentation": Task(segmentation.export, segmentation.predict),
}


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="convert.py", description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint file (.pth/.bin/.pkl/.safetensors) or HF model directory")
    p.add_argument("-o", "--output", required=True, help="destination file (a directory for --to hf)")
    p.add_argument("--to", required=True, choices=(*formats.targets(), "onnx"),
                   help="target format (onnx: a trained task checkpoint's network as a graph, checked with onnxruntime)")
    p.add_argument("--from", dest="src_format", default="auto", choices=formats.sources(), help="source format (default: detect)")
    p.add_argument("--img-size", type=parse_size, default=None,
                   help="resample pos_embed (and decoder_pos_embed) to this input size: N or HxW")
    p.add_argument("--pool", choices=["token", "avg"], default=None,
                   help="timm: global pooling of the target model (token keeps norm; avg uses fc_norm). "
                        "Default: avg if the source has fc_norm only, else token")
    p.add_argument("--fc-norm", choices=["reinit", "copy"], default="reinit",
                   help="timm avg / classification: leave fc_norm to the model's init (official fine-tuning) "
                        "or start it from the final norm")
    p.add_argument("--num-heads", type=_positive, default=None,
                   help="attention heads of the encoder (state dicts do not record it; needed for --to hf "
                        "and task metadata when the width is not a published size)")
    p.add_argument("--decoder-num-heads", type=_positive, default=None, help="attention heads of the MAE decoder")
    p.add_argument("--patch-size", type=_positive, default=None,
                   help="resample the patch embedding to this patch size (e.g. ViTDet-H runs MAE ViT-H/14 at 16); "
                        "encoder-only targets")
    p.add_argument("--force", action="store_true", help="overwrite DST")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.to == "onnx":
        return _export_onnx(args, t0)
    loaded = None
    if args.src_format == "auto" and Path(args.src).is_file():
        loaded = read_checkpoint(args.src)
        task = trained_route(loaded, args.to)
        if task is not None:
            return _export_trained(args, loaded, task, t0)
        if task_of(loaded) == "segmentation":
            raise UserError(f"{args.src} is a trained segmentation checkpoint: it converts whole with --to mmseg")
    source = load_source(args.src, args.src_format, loaded=loaded)
    a = infer_arch(source.state, {**source.hints, **({"num_heads": args.num_heads} if args.num_heads else {})})
    conv = convert(source, args.to, img_size=args.img_size, pool=args.pool, fc_norm=args.fc_norm,
                   num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads, patch_size=args.patch_size)
    written = write_converted(conv, source, args.output, force=args.force)
    print(f"source: {source.path}  (format: {source.fmt}; ViT {a.embed_dim}d x{a.depth}, patch {a.patch_size}, "
          f"grid {a.grid[0]}x{a.grid[1]}" + (f", decoder {a.decoder_dim}d x{a.decoder_depth}" if a.decoder_dim else "") + ")")
    print(f"target: {args.to} -> {', '.join(str(w) for w in written)}")
    print(conv.report.table())
    print(f"done in {time.perf_counter() - t0:.2f}s")
    return 0


def _export_trained(args: argparse.Namespace, loaded: object, task: str, t0: float) -> int:
    """A trained task checkpoint of ours, converted whole by its task's ``export`` module."""
    given = [f for f, v in (("--img-size", args.img_size), ("--patch-size", args.patch_size), ("--pool", args.pool)) if v]
    if given:
        raise UserError(f"{', '.join(given)}: not for a trained {task} model, which converts as it was trained")
    export = TASKS[task].export
    conv = export.export(*trained_parts(loaded))
    written = export.write(conv, args.output, force=args.force)
    a = conv.arch
    print(f"source: {args.src}  ({describe_task(task)} of this toolkit; ViT {a.embed_dim}d x{a.depth}, {a.num_heads} heads, "
          f"patch {a.patch_size}, grid {a.grid[0]}x{a.grid[1]})")
    print(f"target: {args.to} (the whole trained model) -> {', '.join(str(w) for w in written)}")
    print(conv.report.table())
    print(f"done in {time.perf_counter() - t0:.2f}s")
    return 0


def _export_onnx(args: argparse.Namespace, t0: float) -> int:
    """``--to onnx``: the task package that owns the network builds it (see :mod:`maecore.convert.onnx_export`)."""
    given = [f for f, v in (("--img-size", args.img_size), ("--patch-size", args.patch_size), ("--pool", args.pool)) if v]
    if given:
        raise UserError(f"{', '.join(given)}: not for --to onnx, which exports the network as it was trained")
    require_onnx()
    loaded = read_checkpoint(args.src)
    task = task_of(loaded)
    if task not in TASKS:
        raise UserError(f"{args.src} is {describe_task(task)}: --to onnx takes a trained classification, detection or "
                        "segmentation checkpoint of this toolkit")
    spec = TASKS[task].predict.onnx_module(args.src, loaded)
    checked = export_onnx(spec, args.output, force=args.force)
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in checked["max_abs_diff"].items())
    print(f"source: {args.src}  ({describe_task(task)} of this toolkit)")
    print(f"target: onnx -> {args.output}{' (+ .data)' if checked['external_data'] else ''}")
    print(f"graph:  {spec.covers}; dynamic batch")
    print(f"check:  onnxruntime vs PyTorch on a batch of {checked['batch_checked']}: largest difference {diffs}")
    print(f"done in {time.perf_counter() - t0:.2f}s")
    return 0


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
