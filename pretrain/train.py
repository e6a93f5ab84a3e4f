"""MAE pretraining: ``python -m pretrain --data_path DIR --output_dir OUT [flags]``.

Flags follow the official ``main_pretrain.py`` (``--blr``, ``--mask_ratio``, ``--norm_pix_loss``,
``--accum_iter``, ``--warmup_epochs``, ``--resume``…).  Run under ``torchrun`` for DDP.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from maecore import distributed as du
from maecore.cli import run_cli
from maecore.engine import Trainer, add_engine_args, config_from_args, dump_args
from maecore.errors import UserError
from maecore.optim import WarmupCosine, adamw, param_groups
from pretrain.data import build_pretrain_dataset, fixed_images
from pretrain.evaluate import reconstruction_figure
from pretrain.model import MODELS, build_mae
from pretrain.recipes import RECIPES

NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed", "encoder_mask_token")
# what defines the network: a resumed run must match the checkpoint's saved values
MODEL_KEYS = ("model", "input_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
              "decoder_num_heads", "norm_pix_loss", "encoder_mask_tokens")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MAE pretraining", description=__doc__)
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="preset defaults; flags given override")
    p.add_argument("--model", default="mae_vit_large_patch16", choices=sorted(MODELS))
    p.add_argument("--input_size", type=int, nargs="+", default=[224], help="H [W]")
    p.add_argument("--patch_size", type=int, default=None, help="override the model's patch size")
    p.add_argument("--embed_dim", type=int, default=None, help="override the encoder width (small models)")
    p.add_argument("--depth", type=int, default=None, help="override the encoder depth")
    p.add_argument("--num_heads", type=int, default=None, help="override the encoder's attention heads")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--mask_type", default="random", choices=["random", "block", "grid"])
    p.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised pixels as target")
    p.add_argument("--encoder_mask_tokens", action="store_true", help="ablation: encoder also sees mask tokens")
    p.add_argument("--decoder_embed_dim", type=int, default=512)
    p.add_argument("--decoder_depth", type=int, default=8)
    p.add_argument("--decoder_num_heads", type=int, default=16)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * eff_batch / 256)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * eff_batch / 256")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--warmup_epochs", type=float, default=40)
    p.add_argument("--data_path", required=True, help="image folder (class sub-folders optional; uses train/ if present)")
    p.add_argument("--jpeg_draft", action="store_true", help="decode JPEGs at reduced scale (faster on big photos)")
    p.add_argument("--vis_every", type=int, default=20, help="reconstruction figure every N epochs (0: off)")
    p.add_argument("--vis_images", type=int, default=8)
    add_engine_args(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.recipe:
        p.set_defaults(**{k: ([v] if k == "input_size" else v) for k, v in RECIPES[pre.recipe].items()})
    args = p.parse_args(argv)
    if len(args.input_size) > 2:
        p.error("--input_size takes H or H W")
    args.input_size = args.input_size[0] if len(args.input_size) == 1 else tuple(args.input_size)
    if not 0.0 <= args.mask_ratio < 1.0:
        p.error("--mask_ratio must be in [0, 1)")
    return args


def build_model(args: argparse.Namespace):
    kw = dict(
        img_size=args.input_size,
        norm_pix_loss=args.norm_pix_loss,
        mask_type=args.mask_type,
        encoder_mask_tokens=args.encoder_mask_tokens,
        decoder_embed_dim=args.decoder_embed_dim,
        decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
    )
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(args, key):
            kw[key] = getattr(args, key)
    try:
        return build_mae(args.model, **kw)
    except ValueError as e:
        raise UserError(str(e)) from None


def main(argv: list[str] | None = None) -> dict:
    return du.launch(train, parse_args(argv))


def train(args: argparse.Namespace, device: torch.device) -> dict:
    trainer = build_trainer(args, device)
    summary = trainer.fit()
    if du.is_main():
        print(json.dumps(summary, default=str))
    return summary


def build_trainer(args: argparse.Namespace, device: torch.device) -> Trainer:
    du.seed_everything(args.seed + du.rank())
    out = Path(args.output_dir)
    dataset = build_pretrain_dataset(args.data_path, args.input_size, args.jpeg_draft)
    model = build_model(args)

    eff_batch = args.batch_size * args.accum_iter * du.world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    groups = param_groups(model, args.weight_decay, no_weight_decay=NO_WEIGHT_DECAY)
    optimizer = adamw(groups, args.lr, (0.9, 0.95), device)
    schedule = WarmupCosine(args.lr, args.min_lr, args.warmup_epochs, args.epochs)

    if du.is_main():
        n_enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
        print(f"{args.model}: {n_enc / 1e6:.2f}M encoder params; {len(dataset)} images; "
              f"eff. batch {eff_batch} = {args.batch_size} x {args.accum_iter} x {du.world_size()}; lr {args.lr:.3g}")

    vis_paths = fixed_images(args.data_path, args.vis_images) if args.vis_every else []

    def step_fn(m, batch):
        imgs, _, skipped = batch
        loss, _, _ = m(imgs, mask_ratio=args.mask_ratio)
        return loss, {"n_skipped": skipped.sum()}

    def on_epoch_end(m, epoch):
        if vis_paths and ((epoch + 1) % args.vis_every == 0 or epoch + 1 >= args.epochs):
            for name in (f"recon/epoch_{epoch:04d}.png", "recon-last.png"):
                reconstruction_figure(m, vis_paths, out / name, args.input_size, args.mask_ratio,
                                      patch_stats=True, title=f"{args.model} epoch {epoch}")

    cfg = config_from_args(args)
    return Trainer(cfg, model, optimizer, dataset, step_fn, schedule, device, args=dump_args(args), on_epoch_end=on_epoch_end,
                   model_keys=MODEL_KEYS)


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
