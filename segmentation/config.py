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
from segmentation.recipes import RECIPES

# what defines the network: taken from a checkpoint's args when evaluating it (unless given on the command line)
MODEL_KEYS = ("model", "patch_size", "embed_dim", "depth", "num_heads", "input_size", "num_classes",
              "channels", "aux_channels", "aux_weight", "out_indices")
ARCH_KEYS = MODEL_KEYS  # the older name


# this module's docstring is the parser's description (``--help``); the config is built by :func:`parse_config`
@dataclass(frozen=True, kw_only=True)
class SegmentationConfig(RunConfig):
    """The flags of ``python -m segmentation`` (in the parser's order).  The engine's epochs and ``eval_every``
    follow from the iteration flags and the dataset's size: the run's :class:`SegmentationSchedule`."""

    recipe: str
    # model
    model: str
    input_size: int  # training crop = sliding window
    num_classes: int
    patch_size: int | None  # None: the size's own (likewise embed_dim, depth, num_heads)
    embed_dim: int | None
    depth: int | None
    num_heads: int | None
    out_indices: list[int] | None  # None: the size's four taps
    channels: int
    aux_channels: int
    aux_weight: float
    drop_path: float
    grad_checkpointing: bool
    finetune: str
    # data
    data_path: str
    no_reduce_zero_label: bool
    scale: list[int]  # long, short
    ratio_range: list[float]
    cat_max_ratio: float
    no_photometric: bool
    # optimisation
    lr: float
    min_lr: float
    weight_decay: float
    wd_rule: str  # official | uniform
    layer_decay: float
    warmup_iters: int
    max_iters: int
    poly_after_warmup: bool
    # evaluation
    eval: bool
    eval_iters: int | None
    stride: int | None  # None: 2/3 of the crop
    aug_test: bool
    num_vis: int
    eval_max_images: int


@dataclass(frozen=True)
class SegmentationSchedule:
    """The engine's epochs of a run, from the iteration flags and the training set's size (checkpoints store them
    beside the flags)."""

    epochs: int  # whole epochs holding all --max_iters optimizer steps
    eval_every: int  # --eval_iters in epochs


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


def parse_config(argv: list[str] | None = None, world_size: int | None = None) -> SegmentationConfig:
    """The command line ``argv`` (``None``: ``sys.argv[1:]``) as a checked config; a bad flag is one ``error: …``
    line and exit 2.  ``world_size``: as every task's ``parse_config`` takes it (no segmentation flag depends on the
    processes: ``--lr`` is absolute; the epochs they make are the run's :class:`SegmentationSchedule`)."""
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    p.set_defaults(**RECIPES[pre.recipe])
    cfg = SegmentationConfig.from_namespace(p.parse_args(argv), given=given_flags(p, argv))
    if msg := check_config(cfg):
        p.error(msg)
    if not 0 < cfg.cat_max_ratio <= 1:
        p.error("--cat_max_ratio must be in (0, 1]")
    if cfg.max_iters <= 0 or cfg.warmup_iters < 0:
        p.error("--max_iters must be positive and --warmup_iters non-negative")
    return cfg


def check_config(cfg: SegmentationConfig) -> str | None:
    """What is wrong with the model flags taken together (crop size and patch size, class count, tapped
    blocks), if anything; run after parsing and again once ``--eval --resume`` has taken the checkpoint's."""
    if msg := check_model_args(cfg):
        return msg
    if not 1 <= cfg.num_classes <= 254:
        return f"--num_classes must be in 1..254 (labels are 8-bit, 255 = ignore), got {cfg.num_classes}"
    depth = model_kwargs(cfg.model, depth=cfg.depth)["depth"]
    if cfg.out_indices and max(cfg.out_indices) >= depth:
        return f"--out_indices {' '.join(map(str, cfg.out_indices))}: the model has blocks 0..{depth - 1}"
    return None


def checkpoint_config(cfg: SegmentationConfig, saved: Mapping[str, Any] | None, source: str,
                      log: Callable[[str], object] | None = print) -> SegmentationConfig:
    """``cfg`` with the model flags (:data:`MODEL_KEYS`) saved in a checkpoint's args ``saved``, except those written
    on the command line: the config that builds the trained network (``--eval --resume``, ``predict``), checked by
    :func:`check_config` afterwards (:func:`maecore.cli.with_checkpoint_flags`)."""
    return with_checkpoint_flags(get_parser(), cfg, saved, MODEL_KEYS, source, log)
