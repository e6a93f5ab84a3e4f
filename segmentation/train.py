"""ADE20K UperNet training / evaluation: ``python -m segmentation --data_path DIR --output_dir OUT [flags]``.

``--recipe base`` (the default: the MAE paper's ViT-B setting), ``large`` or ``demo`` (synthetic world).
``--finetune MAE_CKPT`` loads pretrained encoder weights (ours or an official release); ``--eval --resume
CKPT`` only evaluates a trained checkpoint, built from the model flags saved in it (``ARCH_KEYS``; a flag
given on the command line wins), so ``--data_path`` and ``--output_dir`` are all it needs; it writes
``OUT/eval.json`` (:func:`maecore.checkpoint.write_eval`: the log's ``eval`` record, as every task's ``--eval``
does).  Iterations are
the unit of the schedule (``--max_iters``, ``--warmup_iters``, ``--eval_iters``); the engine's epochs are
derived from them.  Run under ``torchrun`` for DDP (SyncBatchNorm is switched on there; evaluation sums one
confusion matrix over the ranks, each image counted once).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Collection
from functools import partial
from pathlib import Path

import torch

from maecore import distributed as du
from maecore.checkpoint import checkpoint_step, load_for_eval, unwrap_state_dict, write_eval
from maecore.cli import (
    OneLineParser,
    add_engine_args,
    add_model_args,
    check_model_args,
    config_from_args,
    given_flags,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    ratio,
    run_cli,
)
from maecore.convert import load_backbone
from maecore.engine import Trainer, dump_args, resolve_amp, use_attention
from maecore.errors import UserError
from maecore.models import model_kwargs
from maecore.optim import WarmupPoly, adamw, param_groups
from segmentation.data import build_train_dataset, build_val_dataset
from segmentation.evaluate import MS_SCALES, evaluate_segmentation, format_results
from segmentation.model import UperNetViT, build_segmentor, maybe_sync_batchnorm
from segmentation.recipes import RECIPES

# what defines the network: taken from a checkpoint's args when evaluating it (unless given on the command line)
ARCH_KEYS = ("model", "patch_size", "embed_dim", "depth", "num_heads", "input_size", "num_classes",
             "channels", "aux_channels", "aux_weight", "out_indices")


def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m segmentation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="base", help="preset defaults; flags given override")
    m = p.add_argument_group("model")
    add_model_args(m, "vit", input_size_help="training crop = sliding window",
                   num_classes_help="classes (labels are 8-bit: at most 254, 255 = ignore)")
    m.add_argument("--out_indices", type=non_negative_int, nargs=4, default=None, help="blocks feeding the 4 levels")
    m.add_argument("--channels", type=positive_int, help="UperNet channels")
    m.add_argument("--aux_channels", type=positive_int, help="auxiliary FCN head channels")
    m.add_argument("--aux_weight", type=non_negative_float, help="auxiliary loss weight (0: no auxiliary head)")
    m.add_argument("--drop_path", type=ratio(0.0, 1.0, hi_open=True))
    m.add_argument("--grad_checkpointing", action="store_true", help="recompute blocks in backward (memory)")
    m.add_argument("--finetune", default="", help="pretrained MAE checkpoint for the backbone")
    d = p.add_argument_group("data")
    d.add_argument("--data_path", required=True, help="folder holding ADEChallengeData2016 (or that folder)")
    d.add_argument("--no_reduce_zero_label", action="store_true", help="labels are already 0..K-1 (255 = ignore)")
    d.add_argument("--scale", type=positive_int, nargs=2, metavar=("LONG", "SHORT"), help="rescale bound before the ratio")
    d.add_argument("--ratio_range", type=positive_float, nargs=2, metavar=("LO", "HI"))
    d.add_argument("--cat_max_ratio", type=ratio(0.0, 1.0, lo_open=True))
    d.add_argument("--no_photometric", action="store_true")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=non_negative_float)
    o.add_argument("--min_lr", type=non_negative_float, default=0.0)
    o.add_argument("--weight_decay", type=non_negative_float)
    o.add_argument("--wd_rule", choices=["official", "uniform"], default="official",
                   help="which parameters skip weight decay: official = mmseg's LayerDecayOptimizerConstructor (1-D "
                        "parameters and biases; pos_embed, cls_token and the relative-position tables decay: its exemption "
                        "of pos_embed / cls_token never matches the backbone.-prefixed names); uniform = also those")
    o.add_argument("--layer_decay", type=ratio(0.0, 1.0, lo_open=True))
    o.add_argument("--warmup_iters", type=non_negative_int)
    o.add_argument("--max_iters", type=positive_int, help="optimizer steps in total (sets the engine's epochs)")
    o.add_argument("--poly_after_warmup", action="store_true",
                   help="start the poly decay after the warm-up, as the mmseg-1.x config (LinearLR, then PolyLR from "
                        "--warmup_iters); default: mmseg 0.x's poly over all --max_iters with the warm-up multiplied in, "
                        "what mmseg's published 48.13 mIoU was trained with")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", "--eval_only", "--eval-only", dest="eval", action="store_true",
                   help="only evaluate the checkpoint given by --resume")
    e.add_argument("--eval_iters", type=non_negative_int, help="evaluate about every N iterations (rounded to epochs)")
    e.add_argument("--stride", type=positive_int, default=None, help="sliding-window stride (default 2/3 of the crop)")
    e.add_argument("--aug_test", action="store_true", help="multi-scale (0.5-1.75) + flip")
    e.add_argument("--num_vis", type=non_negative_int, default=4, help="colourised predictions written per evaluation")
    e.add_argument("--eval_max_images", type=non_negative_int, default=0, help="evaluate on the first N val images only")
    add_engine_args(p)
    p.set_defaults(**RECIPES["base"])
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    p.set_defaults(**RECIPES[pre.recipe])
    args = p.parse_args(argv)
    if msg := check_crop(args):
        p.error(msg)
    if not 0 < args.cat_max_ratio <= 1:
        p.error("--cat_max_ratio must be in (0, 1]")
    if args.max_iters <= 0 or args.warmup_iters < 0:
        p.error("--max_iters must be positive and --warmup_iters non-negative")
    return args


def check_crop(args: argparse.Namespace) -> str | None:
    """What is wrong with the model flags taken together (crop size and patch size, class count, tapped
    blocks), if anything; run after parsing and again once ``--eval --resume`` has taken the checkpoint's."""
    if msg := check_model_args(args):
        return msg
    if not 1 <= args.num_classes <= 254:
        return f"--num_classes must be in 1..254 (labels are 8-bit, 255 = ignore), got {args.num_classes}"
    depth = model_kwargs(args.model, depth=args.depth)["depth"]
    if args.out_indices and max(args.out_indices) >= depth:
        return f"--out_indices {' '.join(map(str, args.out_indices))}: the model has blocks 0..{depth - 1}"
    return None


def build_model(args: argparse.Namespace) -> UperNetViT:
    try:
        return build_segmentor(
            args.model, args.num_classes, args.input_size, args.patch_size, args.drop_path, args.channels,
            args.aux_channels, args.aux_weight, args.out_indices, args.embed_dim, args.depth, args.num_heads,
            grad_checkpointing=args.grad_checkpointing,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def window_of(args: argparse.Namespace) -> tuple[tuple[int, int], tuple[int, int] | None]:
    w = (args.input_size, args.input_size)
    return w, ((args.stride, args.stride) if args.stride else None)


def run_eval(args: argparse.Namespace, model: torch.nn.Module, dataset, device: torch.device,
             vis_dir: Path | None) -> dict:
    window, stride = window_of(args)
    amp = resolve_amp(args.amp, device)
    use_attention(model, args.attn, device, amp)  # --eval: the kernel training evaluates with (in training: a no-op)
    return evaluate_segmentation(
        model, dataset, window, stride,
        scales=MS_SCALES if args.aug_test else (1.0,), flip=args.aug_test,
        device=device, amp=amp, num_workers=min(args.num_workers, 4),
        vis_dir=vis_dir, num_vis=args.num_vis, max_images=args.eval_max_images,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.eval:
        return du.launch(partial(evaluate_checkpoint, given=given_flags(get_parser(), argv)), args)
    return du.launch(train, args)


def evaluate_checkpoint(args: argparse.Namespace, device: torch.device, given: Collection[str] = ()) -> dict:
    """``--eval --resume CKPT``: the network is the one the checkpoint was trained as (its saved ``ARCH_KEYS``),
    except for the flags in ``given`` (written on the command line)."""
    if not args.resume or args.resume == "auto":
        raise UserError("--eval needs --resume CHECKPOINT (a trained segmentation checkpoint)")
    ckpt = load_for_eval(args.resume, args, get_parser(), ARCH_KEYS, given)
    if msg := check_crop(args):
        raise UserError(msg)
    model = build_model(args)
    missing, unexpected = model.load_state_dict(unwrap_state_dict(ckpt), strict=False)
    step = checkpoint_step(ckpt)
    del ckpt
    if missing or unexpected:
        raise UserError(f"{args.resume}: not a checkpoint of this segmentation model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device)
    val = build_val_dataset(args)
    out = Path(args.output_dir)
    res = run_eval(args, model, val, device, out / "vis" if du.is_main() else None)
    if du.is_main():
        print(format_results(res))
        write_eval(out, "segmentation", args.resume, step, res)
    return res


def schedule_in_epochs(args: argparse.Namespace, n_train: int) -> tuple[int, int, int]:
    """(epochs, optimizer steps per epoch, eval_every in epochs) from the iteration-based flags.  An epoch's
    batches left over after its last whole accumulation make no step, so the epochs hold all --max_iters steps."""
    per_rank = math.ceil(n_train / du.world_size())
    steps_per_epoch = (per_rank // args.batch_size) // args.accum_iter
    if steps_per_epoch < 1:
        raise UserError(f"{n_train} training images give no full optimizer step per epoch "
                        f"(batch {args.batch_size} x accum {args.accum_iter} x {du.world_size()} processes)")
    epochs = math.ceil(args.max_iters / steps_per_epoch)
    eval_every = max(1, round(args.eval_iters / steps_per_epoch)) if args.eval_iters else epochs
    return epochs, steps_per_epoch, eval_every


def optimizer_groups(model: UperNetViT, args: argparse.Namespace) -> list[dict]:
    """BEiT layer decay over the blocks (neck and heads at scale 1) and the weight-decay rule of ``--wd_rule``:
    ``official`` is mmseg's ``LayerDecayOptimizerConstructor``, which exempts 1-D parameters and ``.bias`` (its
    ``name in ('pos_embed', 'cls_token')`` sees ``backbone.pos_embed`` and never matches), so the position table,
    the cls token and the relative-position tables decay; ``uniform`` also exempts those."""
    names = model.no_weight_decay() if args.wd_rule == "uniform" else ()
    return param_groups(model, args.weight_decay, args.layer_decay, layer_id=model.layer_id,
                        num_layers=model.backbone.depth + 1, no_weight_decay=names)


def build_optimizer(model: UperNetViT, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) over :func:`optimizer_groups`."""
    return adamw(optimizer_groups(model, args), args.lr, (0.9, 0.999), device)


def poly_schedule(args: argparse.Namespace) -> WarmupPoly:
    """mmseg's warm-up + poly (power 1) in optimizer steps: 0.x's by default, 1.x's with ``--poly_after_warmup``."""
    return WarmupPoly(args.lr, args.warmup_iters, args.max_iters, power=1.0, min_lr=args.min_lr,
                      restart=args.poly_after_warmup)


def build_trainer(args: argparse.Namespace, device: torch.device) -> Trainer:
    du.seed_everything(args.seed + du.rank())
    out = Path(args.output_dir)
    dataset = build_train_dataset(args)
    val = build_val_dataset(args)
    model = build_model(args)
    if args.finetune:
        report = load_backbone(model.backbone, args.finetune)
        if du.is_main():
            print(f"loaded {len(report.converted)} backbone tensors from {args.finetune} "
                  f"({len(report.added)} new at their neutral init, {len(report.dropped)} dropped)")
    model = maybe_sync_batchnorm(model, device)

    optimizer = build_optimizer(model, args, device)
    args.epochs, spe, args.eval_every = schedule_in_epochs(args, len(dataset))
    schedule = poly_schedule(args)  # counted in optimizer steps, whatever the epoch length

    if du.is_main():
        n_bb = sum(p.numel() for p in model.backbone.parameters())
        n_all = sum(p.numel() for p in model.parameters())
        eff = args.batch_size * args.accum_iter * du.world_size()
        print(f"UperNet {args.model}: {n_bb / 1e6:.2f}M backbone / {n_all / 1e6:.2f}M total params; "
              f"{len(dataset)} train / {len(val)} val images; eff. batch {eff}; {args.max_iters} iterations "
              f"= {args.epochs} epochs of {spe:g} steps; lr {args.lr:g}, layer decay {args.layer_decay}")

    def step_fn(m, batch):
        img, label, skipped, n_oor = batch
        loss, logs = m(img, label)
        return loss, {**logs, "n_skipped": skipped.sum(), "n_label_oor": n_oor.sum()}

    def evaluate(m, epoch):
        res = run_eval(args, m, val, device, out / "vis" if du.is_main() else None)
        if du.is_main():
            print(f"epoch {epoch}: " + format_results(res).splitlines()[0])
        return res

    cfg = config_from_args(args, max_steps=args.max_iters, best_key="mIoU")
    return Trainer(cfg, model, optimizer, dataset, step_fn, schedule, device, args=dump_args(args), evaluate=evaluate,
                   model_keys=ARCH_KEYS)


def train(args: argparse.Namespace, device: torch.device) -> dict:
    trainer = build_trainer(args, device)
    summary = trainer.fit()
    if du.is_main():
        print(json.dumps({k: v for k, v in summary.items() if k != "IoU_per_class"}, default=str))
    return summary


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
