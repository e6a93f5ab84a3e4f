"""What several formats have in common (not a format: the registry skips ``_`` modules)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from maecore.checkpoint import save_atomic
from maecore.convert.formats import Job, State
from maecore.convert.writers import save_safetensors

if TYPE_CHECKING:
    from maecore.convert.records import Converted, Source

# every canonical part: what the plain MAE formats keep
ALL_PARTS = frozenset({"cls_token", "norm", "fc_norm", "head", "decoder", "mask_token"})
REL_POS = frozenset({"rel_pos_h", "rel_pos_w"})  # ViTDet's decomposed relative position
BEIT_EXTRAS = frozenset({"relative_position_bias_table", "gamma"})  # BEiT / mmseg relative position bias + layer scale

DENSE_WHY = {"norm": "dense tasks tap blocks without the final norm"}
VITDET_WHY = {**DENSE_WHY, "cls_token": "ViTDet runs without a cls token (its pos_embed keeps the cls slot)"}


def vitdet_new_keys(job: Job, written: State, prefix: str = "") -> dict[str, str]:
    """ViTDet blocks (use_rel_pos=True) start their decomposed relative position at zero."""
    new = {}
    for i in range(job.arch.depth):
        for n in ("rel_pos_h", "rel_pos_w"):
            k = f"{prefix}blocks.{i}.attn.{n}"
            if k not in written:
                new[k] = "decomposed relative position, zero-initialised (use_rel_pos=True)"
    return new


def beit_new_keys(job: Job, written: State, block: str, table: str, gammas: tuple[str, str]) -> dict[str, str]:
    """BEiT-style blocks (mmseg MAE, our segmentation trunk): relative position bias at zero, layer scale
    at init_values.  ``block`` is the block prefix with ``{}`` for the index."""
    new = {}
    for i in range(job.arch.depth):
        pre = block.format(i)
        if pre + table not in written:
            new[pre + table] = "relative position bias, zero-initialised (MAE)"
        for g in gammas:
            if pre + g not in written:
                new[pre + g] = "layer scale = init_values (1.0 in the MAE recipe: identity)"
    return new


def vitdet_size_note(job: Job) -> None:
    """detectron2 / mmdet build the position table from ``pretrain_img_size``: it must match the file."""
    a = job.arch
    if a.img_size != (224, 224):
        job.report.notes.append(f"set ViT(pretrain_img_size={a.img_size[0]}) in the config: the position table is "
                                f"{a.grid[0]}x{a.grid[1]} patches of {a.patch_size}")


def write_model(conv: Converted, source: Source, dst: Path, force: bool) -> list[Path]:
    """``{'model': state}``: the official releases' layout, which detectron2 and mmdet also read."""
    save_atomic({"model": conv.state}, dst)
    return [dst]


def write_safetensors(conv: Converted, source: Source, dst: Path, force: bool) -> list[Path]:
    save_safetensors(conv.state, dst, {"source": source.path, "source_format": source.fmt})
    return [dst]
