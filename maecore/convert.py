"""Carry pretrained weights into any encoder built from :class:`maecore.vit.VisionTransformer`.

``load_backbone(model, src)`` is what every task calls: it reads an MAE checkpoint (ours or an
official release), keeps the encoder, drops what the target has no use for (decoder, mask tokens,
cls token, final norm), leaves the target's new parts at their neutral init (relative position
zero, layer scale 1), resamples ``pos_embed`` to the target grid, and refuses unknown keys and shape
mismatches by name.  ``tools/convert.py`` adds the other frameworks' formats on top of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from maecore.checkpoint import load_file, unwrap_state_dict
from maecore.cli import UserError
from maecore.vit import VisionTransformer, adapt_pos_embed


@dataclass
class ConversionReport:
    """What a conversion did, key by key (printed as a table by the CLI)."""

    converted: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why
    added: dict[str, str] = field(default_factory=dict)  # key -> how it starts
    resampled: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"converted: {len(self.converted)} keys"]
        for k, why in sorted(self.dropped.items()):
            out.append(f"dropped:   {k}  ({why})")
        for k, how in sorted(self.added.items()):
            out.append(f"new:       {k}  ({how})")
        for k, (a, b) in self.resampled.items():
            out.append(f"resampled: {k}  {tuple(a)} -> {tuple(b)}")
        return out


def why_dropped(key: str) -> str | None:
    """Keys of an MAE checkpoint that no downstream encoder uses, with the reason."""
    if key.startswith("decoder_") or key == "mask_token":
        return "MAE decoder"
    if key == "encoder_mask_token":
        return "MAE encoder mask token (ablation)"
    return None


def read_state(src: str | os.PathLike | dict[str, Any]) -> dict[str, torch.Tensor]:
    obj = load_file(src) if not isinstance(src, dict) else src
    return unwrap_state_dict(obj)


def adapt_to_encoder(
    state: dict[str, torch.Tensor], model: VisionTransformer, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map MAE-encoder-named weights onto ``model`` (whose own keys may sit under ``prefix``)."""
    report = ConversionReport()
    target = {k: v for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    unknown, bad_shape = [], []
    for k, v in state.items():
        why = why_dropped(k)
        if why:
            report.dropped[k] = why
            continue
        if k == "cls_token" and model.cls_token is None:
            report.dropped[k] = "target has no cls token"
            continue
        if k.startswith("norm.") and isinstance(model.norm, nn.Identity):
            report.dropped[k] = "target has no final norm"
            continue
        if k not in target:
            unknown.append(k)
            continue
        if k == "pos_embed" and v.shape != target[k].shape:
            new = adapt_pos_embed(v, model)
            report.resampled[k] = (tuple(v.shape), tuple(new.shape))
            v = new
        if v.shape != target[k].shape:
            bad_shape.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
            continue
        out[k] = v
        report.converted.append(k)
    if unknown:
        raise UserError(f"unknown keys for this encoder: {', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}")
    if bad_shape:
        raise UserError(f"shape mismatch: {'; '.join(bad_shape[:6])}")
    for k in target:
        if k not in out:
            report.added[k] = _neutral_init(k)
    return {prefix + k: v for k, v in out.items()}, report


def _neutral_init(key: str) -> str:
    if "rel_pos" in key or "relative_position" in key:
        return "relative position, zero-initialised"
    if key.endswith("gamma"):
        return "layer scale, initialised to init_values"
    if key.startswith("norm.") or key.startswith("fc_norm."):
        return "new norm, ones/zeros"
    return "new, model's own init"


def load_backbone(model: VisionTransformer, src: str | os.PathLike | dict[str, Any], verbose: bool = False) -> ConversionReport:
    """Load pretrained encoder weights into ``model``; keys the checkpoint lacks keep their init
    (and are listed as new).  Raises :class:`UserError` on unknown keys or shape mismatches."""
    state, report = adapt_to_encoder(read_state(src), model)
    if not report.converted:
        raise UserError("the checkpoint has no encoder weights for this model (nothing would be loaded)")
    model.load_state_dict(state, strict=False)
    if verbose:
        print("\n".join(report.lines()))
    return report
