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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from maecore.cli import (
    OneLineParser,
    add_engine_args,
    add_model_args,
    check_model_args,
    given_flags,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    ratio,
    with_checkpoint_flags,
)
from maecore.config import RunConfig
from maecore.models import model_kwargs

from .recipes import RECIPES, VITDET_MILESTONES

# what builds the network (its shape and its test-time settings): ``--eval --resume CKPT`` takes these from
# the checkpoint's saved args unless given on the command line; training-only, data and output flags stay
MODEL_KEYS = ("backbone", "model", "patch_size", "embed_dim", "depth", "num_heads", "pretrain_img_size", "window_size",
              "global_blocks", "out_channels", "fc_dim", "anchor_sizes", "input_size", "num_classes", "rpn_pre_nms_top_n_test",
              "rpn_post_nms_top_n_test", "detections_per_img", "score_thresh")


# this module's docstring is the parser's description (``--help``); the config is built by :func:`parse_config`
@dataclass(frozen=True, kw_only=True)
class DetectionConfig(RunConfig):
    """The flags of ``python -m detection`` (in the parser's order), resolved: ``--epochs`` on the command line
    without ``--max_iters`` sets ``max_iters`` 0 (whole epochs) over a recipe's iteration count."""

    recipe: str | None
    # model
    backbone: str  # vitdet | vitfpn
    model: str
    input_size: int  # LSJ target: train crop and test pad
    num_classes: int | None  # None: the annotations' categories (the run's DetectorData)
    patch_size: int | None  # None: the size's own (likewise embed_dim, depth, num_heads)
    embed_dim: int | None
    depth: int | None
    num_heads: int | None
    pretrain_img_size: int
    window_size: int
    global_blocks: list[int] | None  # None: the last block of each quarter
    drop_path: float
    out_channels: int
    fc_dim: int
    grad_checkpointing: bool
    anchor_sizes: list[int]
    rpn_batch_size_per_image: int
    rpn_pre_nms_top_n_train: int
    rpn_post_nms_top_n_train: int
    rpn_pre_nms_top_n_test: int
    rpn_post_nms_top_n_test: int
    box_batch_size_per_image: int
    detections_per_img: int
    score_thresh: float
    finetune: str
    # data
    data_path: str | None
    train_json: str | None
    train_images: str | None
    val_json: str | None
    val_images: str | None
    lsj_scale: list[float]
    # optimisation
    lr: float
    weight_decay: float
    wd_rule: str  # official | decay_all | uniform
    layer_decay: float
    warmup_iters: float
    max_iters: int  # 0: whole --epochs
    milestones: list[float]
    best_key: str
    # evaluation
    eval: bool
    eval_batch_size: int
    max_eval_images: int
    vis_images: int


@dataclass(frozen=True)
class DetectorData:
    """What a run learns from its annotations (checkpoints store it beside the flags: predictions map back to the
    dataset's category ids and names without the annotations)."""

    num_classes: int
    category_ids: list[int]
    category_names: list[str]


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


def parse_config(argv: list[str] | None = None, world_size: int | None = None) -> DetectionConfig:
    """The command line ``argv`` (``None``: ``sys.argv[1:]``) as a checked, resolved config; a bad flag is one
    ``error: …`` line and exit 2.  ``world_size``: as every task's ``parse_config`` takes it (no detection flag
    depends on the processes: ``--lr`` is absolute)."""
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.recipe:
        p.set_defaults(**RECIPES[pre.recipe])
    args = p.parse_args(argv)
    given = given_flags(p, argv)
    # --epochs on the command line wins over a recipe's iteration count
    cfg = DetectionConfig.from_namespace(args, given=given, **({"max_iters": 0} if "epochs" in given and "max_iters" not in given else {}))
    if not 0 < cfg.lsj_scale[0] <= cfg.lsj_scale[1]:
        p.error("--lsj_scale needs 0 < min <= max")
    if cfg.eval and not (cfg.resume or cfg.finetune):
        p.error("--eval needs --resume CHECKPOINT (or --finetune for trunk-only weights)")
    if msg := check_config(cfg):
        p.error(msg)
    return cfg


def check_config(cfg: DetectionConfig) -> str | None:
    """What is wrong with the model flags taken together, if anything (one line); run after parsing and
    again once ``--eval --resume`` has taken the checkpoint's model flags."""
    if msg := check_model_args(cfg):
        return msg
    if cfg.input_size % 32:
        return f"--input_size {cfg.input_size} is not a multiple of 32 (the pyramid's coarsest stride)"
    depth = model_kwargs(cfg.model, depth=cfg.depth)["depth"]
    if cfg.global_blocks and max(cfg.global_blocks) >= depth:
        return f"--global_blocks {' '.join(map(str, cfg.global_blocks))}: the model has blocks 0..{depth - 1}"
    return None


def checkpoint_config(cfg: DetectionConfig, saved: Mapping[str, Any] | None, source: str,
                      log: Callable[[str], object] | None = print) -> DetectionConfig:
    """``cfg`` with the model flags (:data:`MODEL_KEYS`) saved in a checkpoint's args ``saved``, except those written
    on the command line: the config that builds the trained network (``--eval --resume``, ``predict``), checked by
    :func:`check_config` afterwards (:func:`maecore.cli.with_checkpoint_flags`)."""
    return with_checkpoint_flags(get_parser(), cfg, saved, MODEL_KEYS, source, log)
