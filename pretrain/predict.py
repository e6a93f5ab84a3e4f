"""Reconstruction figure of an MAE checkpoint: original / masked / reconstruction / reconstruction
with the visible patches pasted back: pretraining's ``predict``.

    python -m pretrain predict CKPT IMG [IMG ...] -o out.png [--mask_ratio 0.75] [--seed 0]
    (python -m pretrain.visualize and python tools/visualize.py are the same command)

Works with our checkpoints, the official ``_full`` / ``visualize`` releases and any other MAE the
converter reads (e.g. an HF ViTMAE directory); the architecture is read from the weights' shapes and
what the checkpoint records.  An encoder-only checkpoint has no decoder and is refused.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from maecore.cli import OneLineParser, non_negative_int, positive_int, ratio, run_cli
from maecore.convert import infer_arch, is_decoder_key, load_source, load_weights
from maecore.errors import UserError
from pretrain.evaluate import reconstruction_figure
from pretrain.model import MaskedAutoencoderViT


def load_mae(checkpoint: str | os.PathLike, norm_pix_loss: bool | None = None) -> MaskedAutoencoderViT:
    """The MAE (encoder and decoder) of a checkpoint, rebuilt from its shapes and recorded sizes.
    ``norm_pix_loss`` None: as the checkpoint records (False when it does not)."""
    source = load_source(checkpoint)
    if not any(is_decoder_key(k) for k in source.state):
        raise UserError(f"{checkpoint} is an encoder-only checkpoint: it has no decoder to reconstruct with")
    cfg = infer_arch(source.state, source.hints).mae_kwargs()
    cfg["norm_pix_loss"] = bool(source.hints.get("norm_pix_loss", False)) if norm_pix_loss is None else norm_pix_loss
    try:
        model = MaskedAutoencoderViT(**cfg)
    except ValueError as e:  # sizes the checkpoint records that its shapes contradict
        raise UserError(f"{checkpoint}: cannot build its MAE ({e})") from None
    load_weights(model, source.state, "mae")
    return model


def get_predict_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m pretrain predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--mask_ratio", type=ratio(0.0, 1.0, lo_open=True, hi_open=True), default=0.75, help="in (0, 1)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random mask")
    p.add_argument("--input_size", type=positive_int, default=None, help="default: the checkpoint's")
    p.add_argument("--norm_pix_loss", choices=["auto", "yes", "no"], default="auto",
                   help="was the model trained on normalised pixels (auto: from the checkpoint's args)")
    p.add_argument("--no_patch_stats", dest="patch_stats", action="store_false",
                   help="for norm_pix_loss models, show the raw normalised prediction")
    return p


def predict(argv: list[str] | None = None) -> Path:
    """The reconstruction figure of the command line ``argv`` (``None``: ``sys.argv``); returns its path."""
    p = get_predict_parser()
    return reconstruct_images(p, p.parse_args(argv))


def reconstruct_images(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """Draw the figure ``args`` (parsed by ``p``, whose ``error`` reports a size that does not fit) asks for."""
    model = load_mae(args.checkpoint, None if args.norm_pix_loss == "auto" else args.norm_pix_loss == "yes")
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise UserError(f"image not found: {missing[0]}")
    h, w = model.img_size
    if args.input_size is not None and args.input_size % model.patch_size:
        p.error(f"--input_size {args.input_size} is not a multiple of the patch size {model.patch_size}")
    size = args.input_size or (h if h == w else (h, w))  # an int keeps eval_transform's resize-and-crop
    try:
        out = reconstruction_figure(model, args.images, args.output, size, args.mask_ratio,
                                    patch_stats=args.patch_stats, title=Path(args.checkpoint).name, seed=args.seed)
    except OSError as e:
        raise UserError(f"cannot read an image: {e}") from None
    if out is None:  # the protected loader skipped every image (each reason was printed)
        raise UserError(f"none of the {len(args.images)} images could be read: no figure written")
    print(f"wrote {out}")
    return out


def cli(argv: list[str] | None = None) -> None:
    run_cli(predict, argv)


if __name__ == "__main__":
    cli()
