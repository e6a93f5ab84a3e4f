"""Mask R-CNN on COCO with a ViT backbone: ``python -m detection --recipe vitdet_b --data_path COCO
--finetune mae_pretrain_vit_base.pth --output_dir OUT``; ``--eval`` (alias ``--eval-only``) evaluates a checkpoint:
``python -m detection --eval --resume OUT/checkpoint-best.pth --data_path COCO --output_dir EVAL`` builds the
detector from the model flags saved in the checkpoint (``MODEL_KEYS``; a flag given on the command line wins)
and writes ``EVAL/eval.json`` (:func:`maecore.checkpoint.write_eval`: the log's ``eval`` record, as every task's
``--eval`` does) beside COCOeval's table and the detections.

``--data_path`` is a COCO 2017 root (``train2017/``, ``val2017/``, ``annotations/instances_*2017.json``);
``--train_json``/``--val_json``/``--train_images``/``--val_images`` point at any other COCO-format set.
Run under ``torchrun`` for DDP (evaluation is sharded and gathered once per image).
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
from maecore.optim import WarmupStep, adamw, param_groups

from .data import build_datasets, collate
from .evaluate import evaluate_coco
from .model import build_detector, layer_id_fn
from .recipes import RECIPES, VITDET_MILESTONES

# what builds the network (its shape and its test-time settings): ``--eval --resume CKPT`` takes these from
# the checkpoint's saved args unless given on the command line; training-only, data and output flags stay
MODEL_KEYS = ("backbone", "model", "patch_size", "embed_dim", "depth", "num_heads", "pretrain_img_size", "window_size",
              "global_blocks", "out_channels", "fc_dim", "anchor_sizes", "input_size", "num_classes", "rpn_pre_nms_top_n_test",
              "rpn_post_nms_top_n_test", "detections_per_img", "score_thresh")


def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m detection", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="preset defaults; flags given override")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="vitdet", choices=["vitdet", "vitfpn"])
    add_model_args(g, "vit", model="vit_base_patch16", input_size=1024, input_size_help="LSJ target (train crop and test pad) size",
                   num_classes_help="object classes (default: the annotations' categories; must match them)")
    g.add_argument("--pretrain_img_size", type=positive_int, default=224, help="grid of the absolute position table")
    g.add_argument("--window_size", type=non_negative_int, default=14, help="window attention size (0: all global)")
    g.add_argument("--global_blocks", type=non_negative_int, nargs="*", default=None, help="default: last block of each quarter")
    g.add_argument("--drop_path", type=ratio(0.0, 1.0, hi_open=True), default=0.1)
    g.add_argument("--out_channels", type=positive_int, default=256, help="pyramid and head width")
    g.add_argument("--fc_dim", type=positive_int, default=1024, help="box head fc width")
    g.add_argument("--grad_checkpointing", action="store_true", help="activation checkpointing in the trunk")
    g.add_argument("--anchor_sizes", type=positive_int, nargs=5, default=[32, 64, 128, 256, 512])
    g.add_argument("--rpn_batch_size_per_image", type=positive_int, default=256)
    g.add_argument("--rpn_pre_nms_top_n_train", type=positive_int, default=2000)
    g.add_argument("--rpn_post_nms_top_n_train", type=positive_int, default=1000)
    g.add_argument("--rpn_pre_nms_top_n_test", type=positive_int, default=1000)
    g.add_argument("--rpn_post_nms_top_n_test", type=positive_int, default=1000)
    g.add_argument("--box_batch_size_per_image", type=positive_int, default=512)
    g.add_argument("--detections_per_img", type=positive_int, default=100)
    g.add_argument("--score_thresh", type=ratio(0.0, 1.0), default=0.05, help="minimum detection score kept at test time")
    g.add_argument("--finetune", default="", help="MAE checkpoint (ours or official) for the trunk")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="COCO root with train2017/ val2017/ annotations/")
    g.add_argument("--train_json", default=None)
    g.add_argument("--train_images", default=None)
    g.add_argument("--val_json", default=None)
    g.add_argument("--val_images", default=None)
    g.add_argument("--lsj_scale", type=positive_float, nargs=2, default=[0.1, 2.0], help="LSJ scale range")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=non_negative_float, default=1e-4, help="absolute lr (ViTDet: 1e-4 at batch 64)")
    g.add_argument("--weight_decay", type=non_negative_float, default=0.1)
    g.add_argument("--wd_rule", choices=["official", "decay_all", "uniform"], default="official",
                   help="which parameters skip weight decay: official = ViTDet-B/L's detectron2 config (the position table "
                        "and the trunk's LayerNorms only; biases, rel_pos_h/w and the pyramid's and heads' norms decay); "
                        "decay_all = ViTDet-H's (none); uniform = every 1-D parameter, pos_embed and rel_pos_h/w")
    g.add_argument("--layer_decay", type=ratio(0.0, 1.0, lo_open=True), default=0.7)
    g.add_argument("--warmup_iters", type=non_negative_float, default=250,
                   help="linear warm-up from 0.001, in optimizer steps (ViTDet-H: 187.4966, B's 250 / 184,375 of its run)")
    g.add_argument("--max_iters", type=non_negative_int, default=0,
                   help="optimizer steps in total (ViTDet: 184,375 at batch 64), over as many epochs as they need; "
                        "0, or --epochs given without it: whole --epochs")
    g.add_argument("--milestones", type=ratio(0.0, 1.0), nargs="*", default=list(VITDET_MILESTONES),
                   help="x0.1 from these fractions of the run's optimizer steps on, each rounded down to a step "
                        "(default: ViTDet's 163,889 and 177,546 of 184,375)")
    g.add_argument("--best_key", default="bbox/AP", help="eval metric whose best checkpoint is kept")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", "--eval-only", "--eval_only", dest="eval", action="store_true",
                   help="evaluate --resume (or --finetune'd) weights and exit")
    g.add_argument("--eval_batch_size", type=positive_int, default=1)
    g.add_argument("--max_eval_images", type=non_negative_int, default=0, help="evaluate the first N val images only (0: all)")
    g.add_argument("--vis_images", type=non_negative_int, default=4, help="val images in the overlay figure (0: none)")
    add_engine_args(p)
    p.set_defaults(epochs=100, batch_size=2, num_workers=4)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.recipe:
        p.set_defaults(**RECIPES[pre.recipe])
    args = p.parse_args(argv)
    given = given_flags(p, argv)
    if "epochs" in given and "max_iters" not in given:
        args.max_iters = 0  # --epochs on the command line wins over a recipe's iteration count
    if not 0 < args.lsj_scale[0] <= args.lsj_scale[1]:
        p.error("--lsj_scale needs 0 < min <= max")
    if args.eval and not (args.resume or args.finetune):
        p.error("--eval needs --resume CHECKPOINT (or --finetune for trunk-only weights)")
    if msg := check_args(args):
        p.error(msg)
    return args


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the model flags taken together, if anything (one line); run after parsing and
    again once ``--eval --resume`` has taken the checkpoint's model flags."""
    if msg := check_model_args(args):
        return msg
    if args.input_size % 32:
        return f"--input_size {args.input_size} is not a multiple of 32 (the pyramid's coarsest stride)"
    depth = model_kwargs(args.model, depth=args.depth)["depth"]
    if args.global_blocks and max(args.global_blocks) >= depth:
        return f"--global_blocks {' '.join(map(str, args.global_blocks))}: the model has blocks 0..{depth - 1}"
    return None


def build_model(args: argparse.Namespace, num_classes: int):
    try:
        model = build_detector(
            num_classes, backbone=args.backbone, arch=args.model, image_size=args.input_size,
            pretrain_img_size=args.pretrain_img_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
            depth=args.depth, num_heads=args.num_heads, window_size=args.window_size, global_blocks=args.global_blocks,
            drop_path_rate=args.drop_path, out_channels=args.out_channels, fc_dim=args.fc_dim, grad_checkpointing=args.grad_checkpointing,
            anchor_sizes=args.anchor_sizes, rpn_batch_size_per_image=args.rpn_batch_size_per_image,
            rpn_pre_nms_top_n_train=args.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=args.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=args.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=args.rpn_post_nms_top_n_test,
            box_batch_size_per_image=args.box_batch_size_per_image, detections_per_img=args.detections_per_img,
            box_score_thresh=args.score_thresh,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.finetune:
        report = load_backbone(model.backbone.net, args.finetune)
        if du.is_main():
            print(f"loaded {len(report.converted)} trunk tensors from {args.finetune} "
                  f"({len(report.dropped)} dropped, {len(report.added)} new)")
    return model


def optimizer_groups(model, args: argparse.Namespace) -> list[dict]:
    """ViTDet's layer decay (``get_vit_lr_decay_rate``) with the weight-decay rule of ``--wd_rule``."""
    if args.wd_rule == "official":
        names, decay_1d = model.vitdet_no_weight_decay(), True
    elif args.wd_rule == "decay_all":
        names, decay_1d = set(), True
    else:
        names, decay_1d = model.no_weight_decay(), False
    return param_groups(model, args.weight_decay, layer_decay=args.layer_decay, layer_id=layer_id_fn(model),
                        num_layers=model.backbone.net.depth + 1, no_weight_decay=names, decay_1d=decay_1d)


def build_optimizer(model, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) over :func:`optimizer_groups`."""
    return adamw(optimizer_groups(model, args), args.lr, (0.9, 0.999), device)


def schedule_length(args: argparse.Namespace, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, optimizer steps) of the run: ``--max_iters`` steps (ViTDet counts iterations, not epochs) over as
    many epochs as they need, or ``--epochs`` whole epochs."""
    if args.max_iters:
        return math.ceil(args.max_iters / steps_per_epoch), args.max_iters
    return args.epochs, args.epochs * steps_per_epoch


def step_schedule(args: argparse.Namespace, total_steps: int) -> WarmupStep:
    """The ViTDet schedule in optimizer steps: ``--warmup_iters`` steps of linear warm-up from 0.001, x0.1 from each
    milestone on, the milestones being fractions of the run's ``total_steps`` rounded down to a step, as fvcore counts
    them (ViTDet-B/L: 163,889 and 177,546 of 184,375; H: 122,916 and 133,159 of 138,281)."""
    milestones = tuple(int(m * total_steps + 1e-6) for m in args.milestones)
    return WarmupStep(args.lr, warmup=args.warmup_iters, milestones=milestones, gamma=0.1, warmup_factor=0.001)


def resolve_classes(args: argparse.Namespace, found: int, source: object) -> int:
    """The detector's class count: ``--num_classes`` (or a checkpoint's) must be the categories of the annotations,
    since predictions map back to their category ids."""
    if args.num_classes is not None and args.num_classes != found:
        raise UserError(f"--num_classes {args.num_classes} does not match the {found} categories of {source}")
    return found


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return du.launch(partial(run, given=given_flags(get_parser(), argv)), args)


def run(args: argparse.Namespace, device: torch.device, given: Collection[str] = ()) -> dict:
    """Train, or with ``--eval`` evaluate; ``given``: the flags written on the command line (they win over
    the model flags an evaluated checkpoint carries)."""
    du.seed_everything(args.seed + du.rank())
    out = Path(args.output_dir)
    ckpt = None
    if args.eval and args.resume:
        ckpt = load_for_eval(args.resume, args, get_parser(), MODEL_KEYS, given)
        if msg := check_args(args):
            raise UserError(msg)
    if not args.data_path:
        missing = [f"--{k}" for k in ("train_json", "train_images", "val_json", "val_images")
                   if not getattr(args, k) and not (args.eval and k.startswith("train"))]
        if missing:
            raise UserError(f"give --data_path (a COCO root) or {', '.join(missing)}")
    train_set, val_set = build_datasets(args.data_path, args.input_size, args.train_json, args.train_images,
                                        args.val_json, args.val_images, tuple(args.lsj_scale), need_train=not args.eval)
    if du.is_main():
        for ds in (train_set, val_set):
            if ds is not None:
                print(ds.summary())
    args.num_classes = resolve_classes(args, len(val_set.cat_ids), val_set.ann_file)
    # saved with the checkpoint: predict writes the dataset's category ids and names without the annotations
    if not getattr(args, "category_ids", None):
        args.category_ids = list(val_set.cat_ids)
    if not getattr(args, "category_names", None):
        args.category_names = list(val_set.class_names)
    model = build_model(args, args.num_classes)
    amp = resolve_amp(args.amp, device)

    def evaluate(m, epoch: int) -> dict:
        use_attention(m, args.attn, device, amp)  # --eval: the kernel training evaluates with (in training: a no-op)
        return evaluate_coco(m, val_set, device, out, args.eval_batch_size, min(args.num_workers, 2), amp,
                             args.max_eval_images, args.vis_images, vis_name="predictions.png")

    if args.eval:
        step = checkpoint_step(ckpt)
        if ckpt is not None:
            state = unwrap_state_dict(ckpt)
            del ckpt
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise UserError(f"{args.resume}: not a detector checkpoint for these flags "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.to(device)
        metrics = evaluate(model, 0)
        if du.is_main():
            write_eval(out, "detection", args.resume or args.finetune, step, metrics)
            print(json.dumps(metrics))
        return metrics

    assert train_set is not None
    optimizer = build_optimizer(model, args, device)
    ipe = -(-len(train_set) // du.world_size()) // args.batch_size
    steps_per_epoch = max(ipe // args.accum_iter, 1)
    args.epochs, total = schedule_length(args, steps_per_epoch)
    schedule = step_schedule(args, total)
    if du.is_main():
        n = sum(p.numel() for p in model.parameters())
        eff = args.batch_size * args.accum_iter * du.world_size()
        print(f"{args.backbone} {args.model}: {n / 1e6:.2f}M params; eff. batch {eff}; lr {args.lr:.3g}; "
              f"{steps_per_epoch} steps/epoch; {total} steps ({args.epochs} epochs); warm-up {schedule.warmup:g} steps; "
              f"x0.1 at steps {list(schedule.milestones)}; weight decay rule {args.wd_rule}")

    def step_fn(m, batch):
        images, targets = batch
        losses = m(images, targets)
        return sum(losses.values()), losses

    # --max_iters ends the run mid-epoch; --max_steps (smoke runs) may end it sooner
    cfg = config_from_args(args, max_steps=min(filter(None, (args.max_steps, args.max_iters)), default=0))
    trainer = Trainer(cfg, model, optimizer, train_set, step_fn, schedule, device, args=dump_args(args),
                      collate_fn=collate, evaluate=evaluate, model_keys=MODEL_KEYS)
    summary = trainer.fit()
    if du.is_main():
        print(json.dumps(summary, default=str))
    return summary


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
