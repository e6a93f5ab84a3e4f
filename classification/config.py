"""Image classification transfer: ``python -m classification --protocol {finetune,linprobe,partial}``.

* ``finetune``: end-to-end fine-tuning (official ``main_finetune.py``): AdamW, layer-wise lr decay,
  RandAugment, random erasing, Mixup/CutMix, label smoothing, drop path.
* ``linprobe``: frozen encoder + BatchNorm + linear head with LARS (official ``main_linprobe.py``);
  ``--decode fast|official|gpu`` picks how its training images are decoded (as ``python -m pretrain``'s);
  ``--cache_features`` trains on features extracted once (no augmentation).
* ``partial``: the fine-tuning recipe on the last ``--tune_blocks K`` blocks (paper §4.3).

Flags follow the official scripts (``--finetune``, ``--blr``, ``--layer_decay``, ``--drop_path``,
``--cls_token``, ``--mixup``, ``--cutmix``, ``--smoothing``, ``--reprob``, ``--aa``, ``--eval
--resume CKPT``…).  ``--data_path`` holds ``train/`` and ``val/`` class folders.  Run under
``torchrun`` for DDP; evaluation counts each image once.  ``--eval --resume CKPT`` on a checkpoint of
ours takes the model flags (``MODEL_KEYS``) from it unless given on the command line; a file without
saved args (an official release, a converted file) needs ``--model`` etc.; it writes ``OUT/eval.json``
(:func:`maecore.checkpoint.write_eval`: the log's ``eval`` record, as every task's ``--eval`` does).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from classification.recipes import PROTOCOL_DEFAULTS, RECIPES
from maecore.cli import (
    OneLineParser,
    add_cache_args,
    add_engine_args,
    add_model_args,
    check_model_args,
    given_flags,
    non_negative_float,
    positive_float,
    positive_int,
    ratio,
    with_checkpoint_flags,
)
from maecore.config import RunConfig
from maecore.data.decode import DECODE_HELP, DECODES, decode_unavailable
from maecore.engine import SCHEDULE_KEYS
from maecore.models import resolve_model

PROTOCOLS = ("finetune", "linprobe", "partial")
# what builds the network and its eval view: ``--eval --resume CKPT`` takes these from the checkpoint's saved
# args unless given on the command line (the protocol and the head follow from the weights themselves)
MODEL_KEYS = ("model", "patch_size", "embed_dim", "depth", "num_heads", "input_size", "global_pool", "num_classes", "crop_pct")
# --decode changes the pixels of the probe's training crops: a resume keeps it unless --resume_override decode
CLS_SCHEDULE_KEYS = (*SCHEDULE_KEYS, "decode")


@dataclass(frozen=True, kw_only=True)
class ClassificationConfig(RunConfig):
    """The flags of ``python -m classification`` (in the parser's order), resolved: the protocol (flag, recipe or
    ``finetune``) and its defaults, ``--aa none`` as None, the probe's ``--decode``, the lr."""

    protocol: str  # finetune | linprobe | partial
    recipe: str | None
    # model
    model: str
    input_size: int
    num_classes: int | None  # None: the class folders of train/ (the run's ClassifierData)
    patch_size: int | None  # None: the size's own (likewise embed_dim, depth, num_heads)
    embed_dim: int | None
    depth: int | None
    num_heads: int | None
    drop_path: float
    head_init_std: float | None  # None: 0.01 for the linear probe, else 2e-5
    global_pool: bool | None
    finetune: str
    tune_blocks: float | None  # partial only
    grad_checkpointing: bool
    fsdp: bool
    # optimisation
    weight_decay: float
    lr: float  # absolute; from the command line, else blr x effective batch / 256
    blr: float
    layer_decay: float | None
    min_lr: float
    warmup_epochs: float
    model_ema: bool
    model_ema_decay: float
    # augmentation
    aa: str | None  # None: off
    color_jitter: float | None
    smoothing: float
    reprob: float
    remode: str
    recount: int
    mixup: float
    cutmix: float
    cutmix_minmax: list[float] | None
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    crop_pct: float | None  # None: 0.875 up to 224 px, else 1
    # data and evaluation
    data_path: str
    cache_dir: str | None  # a remote --data_path's records kept on local disk (maecore.data.packed.remote)
    cache_size: int
    eval: bool
    dist_eval: bool
    cache_features: bool
    decode: str | None  # the probe's training images only (None elsewhere)
    knn: bool
    knn_k: int
    knn_t: float


@dataclass(frozen=True)
class ClassifierData:
    """What a run learns from its data (checkpoints store it beside the flags: ``--eval`` maps val folders by name)."""

    classes: list[str]  # the class folders of train/, in label order
    num_classes: int  # the head's outputs: --num_classes, else one per class


def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m classification", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=PROTOCOLS, default=None, help="default: the recipe's, else finetune")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="preset defaults; flags given override")
    g = p.add_argument_group("model")
    add_model_args(g, "vit", model="vit_large_patch16", input_size=224, input_size_help="image side in pixels",
                   num_classes_help="default: number of class folders in train/")
    g.add_argument("--drop_path", type=ratio(0.0, 1.0, hi_open=True), default=None, help="stochastic depth rate")
    g.add_argument("--head_init_std", type=float, default=None,
                   help="trunc-normal std of the new head (official: 2e-5 fine-tuning, 0.01 linear probe)")
    g.add_argument("--global_pool", action="store_true", default=None, help="average patch tokens (+ fc_norm)")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify the cls token")
    g.add_argument("--finetune", default="", help="pretrained MAE checkpoint (ours or official)")
    g.add_argument("--tune_blocks", type=non_negative_float, default=None, help="partial: tune the last K blocks (0.5 = last MLP)")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute each block's activations in the backward pass")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer state per block (FSDP2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--weight_decay", type=non_negative_float, default=None)
    g.add_argument("--lr", type=non_negative_float, default=None, help="absolute lr (default: blr * eff_batch / 256)")
    g.add_argument("--blr", type=non_negative_float, default=None, help="base lr: lr = blr * eff_batch / 256")
    g.add_argument("--layer_decay", type=ratio(0.0, 1.0, lo_open=True), default=None, help="layer-wise lr decay (BEiT rule)")
    g.add_argument("--min_lr", type=non_negative_float, default=None)
    g.add_argument("--warmup_epochs", type=non_negative_float, default=None)
    g.add_argument("--model_ema", action="store_true", help="keep an EMA of the weights (evaluated too)")
    g.add_argument("--model_ema_decay", type=ratio(0.0, 1.0), default=0.9999)
    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 ('none': off)")
    g.add_argument("--color_jitter", type=non_negative_float, default=None)
    g.add_argument("--smoothing", type=ratio(0.0, 1.0, hi_open=True), default=None, help="label smoothing")
    g.add_argument("--reprob", type=ratio(0.0, 1.0), default=None, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=positive_int, default=1)
    g.add_argument("--mixup", type=non_negative_float, default=None, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=non_negative_float, default=None, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix_minmax", type=ratio(0.0, 1.0), nargs=2, default=None)
    g.add_argument("--mixup_prob", type=ratio(0.0, 1.0), default=1.0)
    g.add_argument("--mixup_switch_prob", type=ratio(0.0, 1.0), default=0.5)
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    g.add_argument("--crop_pct", type=ratio(0.0, 1.0, lo_open=True), default=None,
                   help="eval centre-crop fraction (default 0.875 up to 224 px, else 1)")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data_path", required=True, help="folder with train/ and val/ class sub-folders, a packed copy, or the URL "
                                                      "of one (http(s)://, s3:// … see maecore/data/packed/)")
    add_cache_args(g)
    g.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    g.add_argument("--dist_eval", action="store_true", help="accepted for compatibility: evaluation is always sharded")
    g.add_argument("--cache_features", action="store_true", help="linprobe: extract features once, train without augmentation")
    g.add_argument("--decode", choices=DECODES, default=None,
                   help="linprobe training images only (finetune/partial keep timm's RandAugment pipeline; evaluation and "
                        "--cache_features the centre crop): " + DECODE_HELP)
    g.add_argument("--knn", action="store_true", help="kNN accuracy of the initial (pretrained) features")
    g.add_argument("--knn_k", type=positive_int, default=20)
    g.add_argument("--knn_t", type=positive_float, default=0.07)
    add_engine_args(p)
    return p


def parse_config(argv: list[str] | None = None, world_size: int | None = None) -> ClassificationConfig:
    """The command line ``argv`` (``None``: ``sys.argv[1:]``) as a checked, resolved config; a bad flag is one
    ``error: …`` line and exit 2.  ``world_size``: the processes the lr's effective batch counts (``None``: this
    job's, :func:`maecore.distributed.launched_world_size`)."""
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    recipe = RECIPES[pre.recipe] if pre.recipe else {}
    protocol = pre.protocol or recipe.get("protocol", "finetune")
    # precedence: flags > recipe > protocol defaults > parser defaults
    p.set_defaults(**PROTOCOL_DEFAULTS[protocol])
    p.set_defaults(**{k: v for k, v in recipe.items() if k != "protocol"})
    args = p.parse_args(argv)
    cfg = ClassificationConfig.from_namespace(args, given=given_flags(p, argv), protocol=protocol,
                                              aa=None if args.aa in ("none", "None", "") else args.aa)
    if cfg.protocol == "partial" and cfg.tune_blocks is None:
        p.error("--protocol partial needs --tune_blocks K (0.5, or an integer number of blocks)")
    if cfg.protocol != "partial" and cfg.tune_blocks is not None:
        p.error("--tune_blocks belongs to --protocol partial")
    if cfg.protocol == "linprobe" and (cfg.mixup > 0 or cfg.cutmix > 0):
        p.error("--mixup/--cutmix are not part of the linear probe")
    if cfg.cache_features and cfg.protocol != "linprobe":
        p.error("--cache_features needs --protocol linprobe (a frozen encoder)")
    decode, msg = resolve_decode(cfg)
    if msg:
        p.error(msg)
    cfg = replace(cfg, decode=decode)
    if msg := check_config(cfg):
        p.error(msg)
    if cfg.lr is None:
        cfg = replace(cfg, lr=cfg.blr * cfg.effective_batch(world_size) / 256)
    return cfg


def resolve_decode(cfg: ClassificationConfig) -> tuple[str | None, str | None]:
    """``--decode`` and what is wrong with it, if anything (one line): the probe's augmented training images default
    to ``fast``; where no image is augmented by a random crop (finetune/partial: RandAugment, ``--cache_features``,
    ``--eval``) it stays ``None`` and giving it is an error."""
    if cfg.protocol == "linprobe" and not cfg.cache_features and not cfg.eval:
        decode = cfg.decode or "fast"
        return decode, decode_unavailable(decode, cfg.device)
    if cfg.decode is not None:
        where = "--cache_features trains on centre-crop features" if cfg.cache_features else (
            "--eval only evaluates" if cfg.eval else f"--protocol {cfg.protocol} keeps timm's RandAugment pipeline")
        return cfg.decode, f"--decode picks how --protocol linprobe decodes its training images; {where}"
    return None, None


def check_config(cfg: ClassificationConfig) -> str | None:
    """What is wrong with the model flags taken together, if anything (one line); run after parsing and
    again once ``--eval --resume`` has taken the checkpoint's model flags."""
    if msg := check_model_args(cfg):
        return msg
    if cfg.tune_blocks is not None:
        depth = cfg.depth or resolve_model(cfg.model).kwargs["depth"]
        k = cfg.tune_blocks
        if k > depth or (k != int(k) and k != 0.5):
            return f"--tune_blocks must be 0.5 or an integer in [0, {depth}] (the model's blocks), got {k:g}"
    return None


def checkpoint_config(cfg: ClassificationConfig, saved: Mapping[str, Any] | None, source: str,
                      log: Callable[[str], object] | None = print) -> ClassificationConfig:
    """``cfg`` with the model flags (:data:`MODEL_KEYS`) saved in a checkpoint's args ``saved``, except those written
    on the command line: the config that builds the trained network (``--eval --resume``, ``predict``), checked by
    :func:`check_config` afterwards (:func:`maecore.cli.with_checkpoint_flags`)."""
    return with_checkpoint_flags(get_parser(), cfg, saved, MODEL_KEYS, source, log)
