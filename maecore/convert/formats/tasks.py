"""Our task trunks: the encoder as ``classification`` / ``detection`` / ``segmentation`` load it
(:func:`maecore.convert.load_backbone`), ``{'model': state, 'meta': …}`` with the sizes the state
dict cannot tell (num_heads, image size) in ``meta``.  Read back as ``trunk``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from maecore.checkpoint import save_atomic
from maecore.convert.formats import Format, Job, State
from maecore.convert.formats._shared import BEIT_EXTRAS, DENSE_WHY, REL_POS, VITDET_WHY, beit_new_keys, vitdet_new_keys
from maecore.convert.writers import TRUNK_FORMAT


def trunk_meta(conv, source) -> dict[str, Any]:
    a = conv.arch
    return {
        "format": TRUNK_FORMAT,
        "task": conv.target,
        "source": source.path,
        "source_format": source.fmt,
        "img_size": list(a.img_size),
        "patch_size": a.patch_size,
        "embed_dim": a.embed_dim,
        "depth": a.depth,
        "num_heads": a.num_heads,
        "num_heads_guessed": a.heads_guessed,
        "mlp_hidden": a.mlp_hidden,
        "pos_embed_cls_slot": bool(a.pos_prefix),
        "converter": "tools/convert.py",
    }


def _write(conv, source, dst: Path, force: bool) -> list[Path]:
    save_atomic({"model": conv.state, "meta": trunk_meta(conv, source)}, dst)
    return [dst]


# ---- classification: the encoder + fc_norm, the head left to the task ----------------------------
def _cls_place(job: Job, key: str, kind: str | None, value: torch.Tensor) -> bool:
    if kind == "fc_norm" and job.fc_norm == "reinit":
        job.report.dropped[key] = "fc_norm re-initialised, as the official fine-tuning does (--fc-norm copy keeps it)"
        return True
    return False


def _cls_complete(job: Job) -> None:
    if job.fc_norm == "copy" and "norm.weight" in job.state and "fc_norm.weight" not in job.state:
        for wb in ("weight", "bias"):
            job.out[f"fc_norm.{wb}"] = job.state[f"norm.{wb}"]
            job.report.renamed[f"norm.{wb}"] = f"fc_norm.{wb}"
        job.report.notes.append("fc_norm initialised from the final norm (--fc-norm copy)")


def _cls_new_keys(job: Job, written: State) -> dict[str, str]:
    return {k: "task model's own init (avg-pool mode)" if k.startswith("fc_norm") else "task model's own init"
            for k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias") if k not in written}


FORMATS = (
    Format("classification", order=7, keep=frozenset({"cls_token", "norm", "fc_norm"}), records_heads=True,
           place=_cls_place, complete=_cls_complete, new_keys=_cls_new_keys, write=_write),
    # ViTDet trunk (no cls token, cls row kept in pos_embed, decomposed relative position)
    Format("detection", order=8, extras=REL_POS, why=VITDET_WHY, pos_cls_slot=True, records_heads=True,
           new_keys=vitdet_new_keys, write=_write),
    # BEiT-style trunk of UperNet (relative position bias, layer scale)
    Format("segmentation", order=9, keep=frozenset({"cls_token"}), extras=BEIT_EXTRAS, why=DENSE_WHY, records_heads=True,
           new_keys=lambda job, written: beit_new_keys(job, written, "blocks.{}.", "attn.relative_position_bias_table",
                                                       ("ls1.gamma", "ls2.gamma")),
           write=_write),
    Format("trunk", source_order=9),  # any of the three, read back (names are canonical)
)
