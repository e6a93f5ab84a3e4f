"""Reconstruction figure of an MAE checkpoint: original / masked / reconstruction / reconstruction
with the visible patches pasted back.

    python -m pretrain.visualize CKPT IMG [IMG ...] -o out.png [--mask_ratio 0.75] [--seed 0]
    (python tools/visualize.py is the same command; so is python -m pretrain predict: pretrain/predict.py)

Works with our checkpoints, the official ``_full`` / ``visualize`` releases and any other MAE the
converter reads (e.g. an HF ViTMAE directory); the architecture is read from the weights' shapes and
what the checkpoint records.  An encoder-only checkpoint has no decoder and is refused.
"""

from __future__ import annotations

from pathlib import Path

from maecore.cli import run_cli
from pretrain.predict import get_predict_parser, load_mae, reconstruct_images

__all__ = ["cli", "load_mae", "main"]


def main(argv: list[str] | None = None) -> Path:
    p = get_predict_parser()
    p.prog, p.description = "python -m pretrain.visualize", __doc__
    return reconstruct_images(p, p.parse_args(argv))


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
