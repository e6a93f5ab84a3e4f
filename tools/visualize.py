#!/usr/bin/env python
"""Reconstruction figure of an MAE checkpoint: original / masked / reconstruction / reconstruction
with the visible patches pasted back.

    python tools/visualize.py CKPT IMG [IMG ...] -o out.png [--mask_ratio 0.75] [--seed 0]

Works with our checkpoints and the official ``_full`` / ``visualize`` releases; the architecture is
read from the weights' shapes.  An encoder-only checkpoint has no decoder and is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maecore.checkpoint import load_file, unwrap_state_dict  # noqa: E402
from maecore.cli import run_cli  # noqa: E402
from maecore.errors import UserError  # noqa: E402
from pretrain.evaluate import reconstruction_figure  # noqa: E402
from pretrain.model import MaskedAutoencoderViT, infer_config, is_decoder_key, load_mae_state  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--input_size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--norm_pix_loss", choices=["auto", "yes", "no"], default="auto",
                   help="was the model trained on normalised pixels (auto: from the checkpoint's args)")
    p.add_argument("--no_patch_stats", dest="patch_stats", action="store_false",
                   help="for norm_pix_loss models, show the raw normalised prediction")
    args = p.parse_args(argv)

    obj = load_file(args.checkpoint)
    state = unwrap_state_dict(obj)
    if not any(is_decoder_key(k) for k in state):
        raise UserError(f"{args.checkpoint} is an encoder-only checkpoint: it has no decoder to reconstruct with")
    cfg = infer_config(state)
    saved = obj.get("args", {}) if isinstance(obj, dict) else {}
    if args.norm_pix_loss == "auto":
        cfg["norm_pix_loss"] = bool(saved.get("norm_pix_loss", False))
    else:
        cfg["norm_pix_loss"] = args.norm_pix_loss == "yes"
    if "decoder_num_heads" in saved:
        cfg["decoder_num_heads"] = saved["decoder_num_heads"]
    model = MaskedAutoencoderViT(**cfg)
    load_mae_state(model, state)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise UserError(f"image not found: {missing[0]}")
    size = args.input_size or cfg["img_size"]
    try:
        out = reconstruction_figure(model, args.images, args.output, size, args.mask_ratio,
                                    patch_stats=args.patch_stats, title=Path(args.checkpoint).name, seed=args.seed)
    except OSError as e:
        raise UserError(f"cannot read an image: {e}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
