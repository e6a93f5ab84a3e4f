"""MAE pretraining: ``python -m pretrain --data_path DIR --output_dir OUT [flags]``.

Flags follow the official ``main_pretrain.py`` (``--blr``, ``--mask_ratio``, ``--norm_pix_loss``,
``--accum_iter``, ``--warmup_epochs``, ``--resume``…).  Run under ``torchrun`` for DDP.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from maecore.cli import (
    OneLineParser,
    add_cache_args,
    add_engine_args,
    add_model_args,
    check_model_args,
    given_flags,
    non_negative_float,
    non_negative_int,
    positive_int,
    ratio,
    with_checkpoint_flags,
)
from maecore.config import RunConfig
from maecore.data.decode import DECODE_HELP, DECODES, decode_unavailable
from maecore.engine import SCHEDULE_KEYS
from maecore.models import resolve_model
from maecore.monitor import add_monitor_args
from pretrain.model import build_mae  # noqa: F401  (importing it registers the mae_vit_* builders --model resolves into)
from pretrain.recipes import RECIPES

# what defines the network: a resumed run must match the checkpoint's saved values
MODEL_KEYS = ("model", "input_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
              "decoder_num_heads", "norm_pix_loss", "encoder_mask_tokens")
# --decode changes the pixels of crops taken at a reduced DCT scale: a resume keeps it unless --resume_override decode
PRETRAIN_SCHEDULE_KEYS = (*SCHEDULE_KEYS, "decode")


# this module's docstring is the parser's description (``--help``); the config is built by :func:`parse_config`
@dataclass(frozen=True, kw_only=True)
class PretrainConfig(RunConfig):
    """The flags of ``python -m pretrain`` (in the parser's order), the lr resolved."""

    recipe: str | None
    # model
    model: str
    input_size: int | tuple[int, int]  # H, or (H, W)
    patch_size: int | None  # None: the size's own (likewise embed_dim, depth, num_heads)
    embed_dim: int | None
    depth: int | None
    num_heads: int | None
    mask_ratio: float
    mask_type: str  # random | block | grid
    norm_pix_loss: bool
    encoder_mask_tokens: bool
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    # memory
    grad_checkpointing: bool
    fsdp: bool
    # optimisation
    weight_decay: float
    wd_rule: str  # official | uniform
    lr: float  # absolute; from the command line, else blr x effective batch / 256
    blr: float
    min_lr: float
    warmup_epochs: float
    # data and figures
    data_path: str
    cache_dir: str | None  # a remote --data_path's records kept on local disk (maecore.data.packed.remote)
    cache_size: int
    decode: str
    jpeg_draft: bool
    vis_every: int
    vis_images: int
    # monitor (maecore.monitor.add_monitor_args)
    monitor: bool
    monitor_every: int
    monitor_data: str
    monitor_bank: int
    monitor_queries: int
    monitor_pool: str  # mean | cls


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
    g.add_argument("--data_path", required=True, help="image folder (class sub-folders optional; uses train/ if present), "
                                                      "a packed copy, or the URL of one (http(s)://, s3:// … see maecore/data/packed/)")
    add_cache_args(g)
    g.add_argument("--decode", choices=DECODES, default="fast", help=DECODE_HELP)
    g.add_argument("--jpeg_draft", action="store_true",
                   help="deprecated: --decode fast picks the DCT scale per crop; with --decode official, draft-decode "
                        "JPEGs at the output size before the crop (the old behaviour)")
    g.add_argument("--vis_every", type=non_negative_int, default=20, help="reconstruction figure every N epochs (0: off)")
    g.add_argument("--vis_images", type=non_negative_int, default=8)
    add_monitor_args(p)
    add_engine_args(p)
    return p


def check_config(cfg: PretrainConfig) -> str | None:
    """What is wrong with the flags taken together, if anything (one line)."""
    if msg := check_model_args(cfg):
        return msg
    if cfg.decoder_embed_dim % cfg.decoder_num_heads:
        return f"--decoder_embed_dim {cfg.decoder_embed_dim} is not a multiple of --decoder_num_heads {cfg.decoder_num_heads}"
    width = cfg.embed_dim or resolve_model(cfg.model, "mae").kwargs["embed_dim"]
    for flag, dim in (("--embed_dim", width), ("--decoder_embed_dim", cfg.decoder_embed_dim)):
        if dim % 4:
            return f"{flag} {dim} is not a multiple of 4 (the sin-cos position table needs it)"
    return decode_unavailable(cfg.decode, cfg.device)


def parse_config(argv: list[str] | None = None, world_size: int | None = None) -> PretrainConfig:
    """The command line ``argv`` (``None``: ``sys.argv[1:]``) as a checked, resolved config; a bad flag is one
    ``error: …`` line and exit 2.  ``world_size``: the processes the lr's effective batch counts (``None``: this
    job's, :func:`maecore.distributed.launched_world_size`)."""
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.recipe:
        p.set_defaults(**RECIPES[pre.recipe])
    cfg = PretrainConfig.from_namespace(p.parse_args(argv), given=given_flags(p, argv))
    if msg := check_config(cfg):
        p.error(msg)
    if cfg.lr is None:
        cfg = replace(cfg, lr=cfg.blr * cfg.effective_batch(world_size) / 256)
    return cfg


def checkpoint_config(cfg: PretrainConfig, saved: Mapping[str, Any] | None, source: str,
                      log: Callable[[str], object] | None = print) -> PretrainConfig:
    """``cfg`` with the model flags (:data:`MODEL_KEYS`) saved in a checkpoint's args ``saved``, except those written
    on the command line: the config that builds the trained network (``--eval --resume``, ``predict``), checked by
    :func:`check_config` afterwards (:func:`maecore.cli.with_checkpoint_flags`)."""
    return with_checkpoint_flags(get_parser(), cfg, saved, MODEL_KEYS, source, log)
