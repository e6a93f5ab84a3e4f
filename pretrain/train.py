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
from maecore.cli import (
    OneLineParser,
    add_engine_args,
    add_model_args,
    check_model_args,
    config_from_args,
    non_negative_float,
    non_negative_int,
    positive_int,
    ratio,
    run_cli,
)
from maecore.data.decode import DECODE_HELP, DECODES, decode_unavailable
from maecore.engine import SCHEDULE_KEYS, StepFn, Trainer, dump_args
from maecore.models import resolve_model
from maecore.monitor import add_monitor_args, build_monitor
from maecore.optim import WarmupCosine, adamw, param_groups
from pretrain.data import build_pretrain_dataset, fixed_images, pretrain_collate, pretrain_device_batch
from pretrain.evaluate import reconstruction_figure
from pretrain.model import build_mae  # importing it registers the mae_vit_* builders --model resolves into
from pretrain.recipes import RECIPES

# what defines the network: a resumed run must match the checkpoint's saved values
MODEL_KEYS = ("model", "input_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
              "decoder_num_heads", "norm_pix_loss", "encoder_mask_tokens")
# --decode changes the pixels of crops taken at a reduced DCT scale: a resume keeps it unless --resume_override decode
PRETRAIN_SCHEDULE_KEYS = (*SCHEDULE_KEYS, "decode")


def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m pretrain", description=__doc__)
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="preset defaults; flags given override")
    g = p.add_argument_group("model")
    add_model_args(g, "mae", model="mae_vit_large_patch16", input_size=224, two_sided=True, num_classes=False)
    g.add_argument("--mask_ratio", type=ratio(0.0, 1.0, lo_open=True, hi_open=True), default=0.75,
                   help="fraction of patches removed, in (0, 1)")
    g.add_argument("--mask_type", default="random", choices=["random", "block", "grid"])
    g.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised pixels as target")
    g.add_argument("--encoder_mask_tokens", action="store_true", help="ablation: encoder also sees mask tokens")
    g.add_argument("--decoder_embed_dim", type=positive_int, default=512)
    g.add_argument("--decoder_depth", type=non_negative_int, default=8)
    g.add_argument("--decoder_num_heads", type=positive_int, default=16)
    g = p.add_argument_group("memory")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute each encoder block's activations in the backward pass (the decoder's are kept)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer state per block (FSDP2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--weight_decay", type=non_negative_float, default=0.05)
    g.add_argument("--wd_rule", choices=["official", "uniform"], default="official",
                   help="which parameters skip weight decay: official = main_pretrain.py's (timm 0.3.2 add_weight_decay: "
                        "1-D parameters and biases only; the cls and mask tokens decay); uniform = also the cls and mask tokens")
    g.add_argument("--lr", type=non_negative_float, default=None, help="absolute lr (default: blr * eff_batch / 256)")
    g.add_argument("--blr", type=non_negative_float, default=1.5e-4, help="base lr: lr = blr * eff_batch / 256")
    g.add_argument("--min_lr", type=non_negative_float, default=0.0)
    g.add_argument("--warmup_epochs", type=non_negative_float, default=40)
    g = p.add_argument_group("data and figures")
    g.add_argument("--data_path", required=True, help="image folder (class sub-folders optional; uses train/ if present)")
    g.add_argument("--decode", choices=DECODES, default="fast", help=DECODE_HELP)
    g.add_argument("--jpeg_draft", action="store_true",
                   help="deprecated: --decode fast picks the DCT scale per crop; with --decode official, draft-decode "
                        "JPEGs at the output size before the crop (the old behaviour)")
    g.add_argument("--vis_every", type=non_negative_int, default=20, help="reconstruction figure every N epochs (0: off)")
    g.add_argument("--vis_images", type=non_negative_int, default=8)
    add_monitor_args(p)
    add_engine_args(p)
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags taken together, if anything (one line)."""
    if msg := check_model_args(args):
        return msg
    if args.decoder_embed_dim % args.decoder_num_heads:
        return f"--decoder_embed_dim {args.decoder_embed_dim} is not a multiple of --decoder_num_heads {args.decoder_num_heads}"
    width = args.embed_dim or resolve_model(args.model, "mae").kwargs["embed_dim"]
    for flag, dim in (("--embed_dim", width), ("--decoder_embed_dim", args.decoder_embed_dim)):
        if dim % 4:
            return f"{flag} {dim} is not a multiple of 4 (the sin-cos position table needs it)"
    return decode_unavailable(args.decode, args.device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.recipe:
        p.set_defaults(**RECIPES[pre.recipe])
    args = p.parse_args(argv)
    if msg := check_args(args):
        p.error(msg)
    return args


def build_model(args: argparse.Namespace):
    return build_mae(
        args.model,
        img_size=args.input_size,
        patch_size=args.patch_size,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.num_heads,
        norm_pix_loss=args.norm_pix_loss,
        mask_type=args.mask_type,
        encoder_mask_tokens=args.encoder_mask_tokens,
        decoder_embed_dim=args.decoder_embed_dim,
        decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
    )


def main(argv: list[str] | None = None) -> dict:
    return du.launch(train, parse_args(argv))


def train(args: argparse.Namespace, device: torch.device) -> dict:
    trainer = build_trainer(args, device)
    summary = trainer.fit()
    if du.is_main():
        print(json.dumps(summary, default=str))
    return summary


def make_step_fn(mask_ratio: float) -> StepFn:
    """The pretraining step function (``maecore.engine.TrainStep`` runs it; ``pretrain.benchmark`` times it):
    the MAE loss on an ``(images, labels, skipped)`` batch; counts the unreadable files the loader skipped."""

    def step_fn(m, batch):
        imgs, _, skipped = batch
        loss, _, _ = m(imgs, mask_ratio=mask_ratio)
        return loss, {"n_skipped": skipped.sum()}

    return step_fn


def optimizer_groups(model: torch.nn.Module, weight_decay: float, wd_rule: str = "official") -> list[dict]:
    """AdamW groups.  ``official``: ``main_pretrain.py`` calls timm 0.3.2's ``add_weight_decay(model, wd)`` with no
    skip list, which exempts 1-D parameters and ``.bias`` only, so ``cls_token`` and ``mask_token`` decay (the
    frozen sin-cos tables are in no group).  ``uniform``: also the tokens (``model.no_weight_decay()``)."""
    return param_groups(model, weight_decay, no_weight_decay=model.no_weight_decay() if wd_rule == "uniform" else ())


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95) over :func:`optimizer_groups`, as ``main_pretrain.py``."""
    return adamw(optimizer_groups(model, args.weight_decay, args.wd_rule), args.lr, (0.9, 0.95), device)


def build_trainer(args: argparse.Namespace, device: torch.device) -> Trainer:
    du.seed_everything(args.seed + du.rank())
    out = Path(args.output_dir)
    dataset = build_pretrain_dataset(args.data_path, args.input_size, args.jpeg_draft, args.decode)
    if args.jpeg_draft and args.decode != "official" and du.is_main():
        print(f"note: --jpeg_draft is deprecated and has no effect with --decode {args.decode}, which picks the JPEG "
              "DCT scale per crop; with --decode official it keeps its old meaning")
    model = build_model(args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)

    eff_batch = args.batch_size * args.accum_iter * du.world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    optimizer = build_optimizer(model, args, device)
    schedule = WarmupCosine(args.lr, args.min_lr, args.warmup_epochs, args.epochs)

    if du.is_main():
        n_enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
        print(f"{args.model}: {n_enc / 1e6:.2f}M encoder params; {len(dataset)} images; "
              f"eff. batch {eff_batch} = {args.batch_size} x {args.accum_iter} x {du.world_size()}; lr {args.lr:.3g}")

    vis_paths = fixed_images(args.data_path, args.vis_images) if args.vis_every else []

    def on_epoch_end(m, epoch):
        if vis_paths and ((epoch + 1) % args.vis_every == 0 or epoch + 1 >= args.epochs):
            for name in (f"recon/epoch_{epoch:04d}.png", "recon-last.png"):
                reconstruction_figure(m, vis_paths, out / name, args.input_size, args.mask_ratio,
                                      patch_stats=True, title=f"{args.model} epoch {epoch}")

    cfg = config_from_args(args)
    return Trainer(cfg, model, optimizer, dataset, make_step_fn(args.mask_ratio), schedule, device, args=dump_args(args),
                   on_epoch_end=on_epoch_end, model_keys=MODEL_KEYS, schedule_keys=PRETRAIN_SCHEDULE_KEYS,
                   collate_fn=pretrain_collate(args.decode),
                   device_batch=pretrain_device_batch(args.decode, args.input_size, device),
                   hooks=[build_monitor(args, model, dataset.classes, device)])


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
