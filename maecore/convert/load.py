"""Loading weights into a model built from :class:`maecore.models.vit.VisionTransformer` — the one loader
behind every task's ``--finetune`` (:func:`load_backbone`), an MAE rebuilt from a checkpoint
(pretraining, ``pretrain.visualize``) and classification's ``--eval --resume``.

The modes differ only in what may be left over on either side:

* ``backbone``: an encoder into any task model.  What the model has no use for is dropped, with the
  reason (MAE decoder, cls token, final norm, classifier, relative-position / layer-scale at their
  neutral values); what the checkpoint lacks keeps the model's init (listed as new).
* ``mae``: an MAE (encoder + decoder).  Nothing is dropped; only the decoder may be missing (an
  encoder-only release loads, the decoder keeps its init).
* ``exact``: a model of the checkpoint's own layout.  Nothing dropped, nothing missing.

In every mode unknown keys and shape mismatches are refused by name and ``pos_embed`` from another
grid (with or without a cls row) is fitted to the model.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import torch
import torch.nn as nn

from maecore.convert.io import load_source
from maecore.convert.keys import is_decoder_key, is_neutral, key_kind, neutral_why, why_dropped
from maecore.convert.report import ConversionReport
from maecore.errors import UserError
from maecore.models import VisionTransformer
from maecore.models.pos_embed import resample_pos_embed

Mode = Literal["backbone", "mae", "exact"]


def adapt_pos_embed(pe: torch.Tensor, model: VisionTransformer) -> torch.Tensor:
    """Fit a checkpoint's position table to ``model``: add/drop the cls slot, resample the grid."""
    n = pe.shape[1]
    src_prefix = next((p for p in (model.pos_embed_prefix, 1, 0) if math.isqrt(n - p) ** 2 == n - p), None)
    if src_prefix is None:
        raise ValueError(f"cannot infer the patch grid of a {n}-row position table")
    if src_prefix > model.pos_embed_prefix:
        pe = pe[:, src_prefix:]
    elif src_prefix < model.pos_embed_prefix:
        pe = torch.cat([pe.new_zeros(1, model.pos_embed_prefix, pe.shape[2]), pe], dim=1)
    return resample_pos_embed(pe, model.grid_size, None, model.pos_embed_prefix)


def _unused(key: str, v: torch.Tensor, model: VisionTransformer, target: dict[str, torch.Tensor]) -> str | None:
    """Why an encoder model has no use for a checkpoint key (backbone mode), or None."""
    why = why_dropped(key)
    if why:
        return why
    if key == "cls_token" and model.cls_token is None:
        return "target has no cls token"
    if key.startswith("norm.") and isinstance(model.norm, nn.Identity):
        return "target has no final norm"
    if key in target:
        return None
    if key.startswith("fc_norm."):
        return "target has no fc_norm (token pooling or a dense task)"
    if key.startswith("head."):
        return "classification head (target has none)"
    if key_kind(key) == "extra" and is_neutral(key, v):
        return neutral_why(key)
    return None


def _neutral_init(key: str) -> str:
    if "rel_pos" in key or "relative_position" in key:
        return "relative position, zero-initialised"
    if key.endswith("gamma"):
        return "layer scale, initialised to init_values"
    if key.startswith("norm.") or key.startswith("fc_norm."):
        return "new norm, ones/zeros"
    return "new, model's own init"


def load_weights(model: VisionTransformer, state: dict[str, torch.Tensor], mode: Mode = "backbone") -> ConversionReport:
    """Load a state dict in canonical (official MAE / timm) names into ``model``, as ``mode`` allows
    (see the module docstring).  Returns what was loaded, dropped, left new and resampled; raises
    :class:`UserError` on anything else."""
    if mode not in ("backbone", "mae", "exact"):
        raise ValueError(f"unknown load mode {mode!r}")
    report = ConversionReport()
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unknown, bad_shape = [], []
    for k, v in state.items():
        if mode == "backbone":
            why = _unused(k, v, model, target)
            if why:
                report.dropped[k] = why
                continue
        if k not in target:
            unknown.append(k)
            continue
        if k == "pos_embed" and v.shape != target[k].shape:
            try:
                new = adapt_pos_embed(v, model)
            except ValueError as e:
                raise UserError(f"pos_embed {tuple(v.shape)}: {e}") from None
            report.resampled[k] = (tuple(v.shape), tuple(new.shape))
            v = new
        elif k == "decoder_pos_embed" and v.shape != target[k].shape:  # the MAE decoder's table has a cls row
            new = resample_pos_embed(v, model.grid_size, None, 1)
            report.resampled[k] = (tuple(v.shape), tuple(new.shape))
            v = new
        if v.shape != target[k].shape:
            bad_shape.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
            continue
        out[k] = v
        report.converted.append(k)
    if unknown:
        who = "this encoder" if mode == "backbone" else type(model).__name__
        raise UserError(f"unknown keys for {who}: {', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}")
    missing = [k for k in target if k not in state]
    if mode == "mae" and any(not is_decoder_key(k) for k in missing):
        raise UserError(f"checkpoint lacks encoder keys: {', '.join(k for k in missing if not is_decoder_key(k))[:400]}")
    if mode == "exact" and missing:
        raise UserError(f"checkpoint lacks keys: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if bad_shape:
        raise UserError(f"shape mismatch: {'; '.join(bad_shape[:6])}")
    for k in target:
        if k not in out:
            report.added[k] = _neutral_init(k)
    model.load_state_dict(out, strict=False)
    return report


def load_backbone(model: VisionTransformer, src: str | os.PathLike | dict[str, Any], verbose: bool = False) -> ConversionReport:
    """Load pretrained encoder weights into ``model``; keys the checkpoint lacks keep their init
    (and are listed as new).  ``src`` may be any format :func:`~maecore.convert.load_source` reads.
    Raises :class:`UserError` on unknown keys or shape mismatches."""
    source = load_source(src)
    report = load_weights(model, source.state, "backbone")
    if not report.converted:
        raise UserError("the checkpoint has no encoder weights for this model (nothing would be loaded)")
    report.dropped.update(source.dropped)
    if verbose:
        print("\n".join(report.lines()))
    return report
