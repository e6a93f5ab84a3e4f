"""HF transformers ``ViTMAE``: a directory with ``config.json`` and ``model.safetensors``.

Hub layout (transformers 4.x, and what 5.x reads): ``vit.encoder.layer.i.attention.attention.query`` …;
transformers 5.x in-memory layout: ``vit.layers.i.attention.q_proj`` … (both are read).  HF keeps q, k
and v apart where MAE has one ``qkv``: they are split on the way out and concatenated on the way in,
bit for bit.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from maecore.convert.formats import Canonical, Format, State
from maecore.convert.keys import Arch
from maecore.convert.writers import atomic_write, save_safetensors
from maecore.errors import UserError

_SUB = [
    (re.compile(r"layernorm_before\.(weight|bias)"), "norm1.{}"),
    (re.compile(r"layernorm_after\.(weight|bias)"), "norm2.{}"),
    (re.compile(r"attention\.output\.dense\.(weight|bias)"), "attn.proj.{}"),
    (re.compile(r"attention\.o_proj\.(weight|bias)"), "attn.proj.{}"),
    (re.compile(r"intermediate\.dense\.(weight|bias)"), "mlp.fc1.{}"),
    (re.compile(r"mlp\.fc1\.(weight|bias)"), "mlp.fc1.{}"),
    (re.compile(r"output\.dense\.(weight|bias)"), "mlp.fc2.{}"),
    (re.compile(r"mlp\.fc2\.(weight|bias)"), "mlp.fc2.{}"),
]
_QKV = re.compile(r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)")
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
_LAYER = re.compile(r"(?:(?:vit\.)?(?:encoder\.layer|layers)|decoder\.(?:decoder_layers|decoder_encoder\.layer))\.(\d+)\.(.+)")
_NAMING = re.compile(r"(vit\.)?(embeddings\.|encoder\.layer\.|layers\.\d+\.(attention|layernorm_))")
# config.json field -> our hint
_CONFIG_HINTS = (("num_heads", "num_attention_heads"), ("decoder_num_heads", "decoder_num_attention_heads"),
                 ("img_size", "image_size"), ("layer_norm_eps", "layer_norm_eps"), ("mask_ratio", "mask_ratio"),
                 ("norm_pix_loss", "norm_pix_loss"))


def _detect(keys: Sequence[str]) -> bool:
    return any(_NAMING.match(k) for k in keys) or any(k.startswith("decoder.decoder_") for k in keys)


def _to_canonical(state: State, config: dict[str, Any] | None) -> Canonical:
    out: State = {}
    renamed: dict[str, str] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for k, v in state.items():
        top = k[4:] if k.startswith("vit.") else k
        if top in _TOP:
            out[_TOP[top]] = v
            renamed[k] = _TOP[top]
            continue
        m = _LAYER.fullmatch(k)
        if not m:
            unknown.append(k)
            continue
        prefix = "decoder_blocks" if k.startswith("decoder.") else "blocks"
        i, sub = m.group(1), m.group(2)
        mq = _QKV.fullmatch(sub)
        if mq:
            part = mq.group(1) or {"q": "query", "k": "key", "v": "value"}[mq.group(2)]
            qkv[(f"{prefix}.{i}.attn.qkv.{mq.group(3)}", k[: len(k) - len(sub)] + "attention")][part] = v
            continue
        for pat, fmt in _SUB:
            ms = pat.fullmatch(sub)
            if ms:
                new = f"{prefix}.{i}." + fmt.format(ms.group(1))
                out[new] = v
                renamed[k] = new
                break
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"unknown keys for HF ViTMAE: {', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}")
    for (new, src_prefix), parts in qkv.items():
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise UserError(f"HF attention {src_prefix} lacks {', '.join(missing)} (q, k and v are needed to build qkv)")
        out[new] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
        renamed[f"{src_prefix}.{{query,key,value}}.{new.rsplit('.', 1)[1]}"] = new
    hints = {ours: config[theirs] for ours, theirs in _CONFIG_HINTS if config.get(theirs) is not None} if config else {}
    return Canonical(out, {}, renamed, hints)


def _from_canonical(state: State, arch: Arch) -> tuple[State, dict[str, str]]:
    with_decoder = "decoder_embed.weight" in state
    if with_decoder and arch.decoder_depth == 0:
        raise UserError("decoder without blocks cannot be exported to HF ViTMAE")
    inv = {v: k for k, v in _TOP.items()}
    vit = "vit." if with_decoder else ""  # ViTMAEForPreTraining nests the encoder; ViTMAEModel is it
    out: State = {}
    renamed: dict[str, str] = {}
    sub_names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for k, v in state.items():
        if k in inv:
            new = inv[k] if inv[k].startswith("decoder.") else vit + inv[k]
            out[new] = v
            renamed[k] = new
            continue
        m = re.fullmatch(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)", k)
        if not m:
            raise UserError(f"no HF ViTMAE name for {k}")
        base = f"{vit}encoder.layer.{m.group(2)}." if m.group(1) == "blocks" else f"decoder.decoder_layers.{m.group(2)}."
        sub, wb = m.group(3), m.group(4)
        if sub == "attn.qkv":
            for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{base}attention.attention.{part}.{wb}"] = t.clone()
            renamed[k] = f"{base}attention.attention.{{query,key,value}}.{wb}"
        else:
            new = f"{base}{sub_names[sub]}.{wb}"
            out[new] = v
            renamed[k] = new
    return out, renamed


def hf_config(arch: Arch, with_decoder: bool, hints: dict[str, Any]) -> dict[str, Any]:
    """config.json of a ViTMAE export.  layer_norm_eps is 1e-6 (MAE's); HF's default 1e-12 would change
    every LayerNorm."""
    img = arch.img_size
    cfg: dict[str, Any] = {
        "architectures": ["ViTMAEForPreTraining" if with_decoder else "ViTMAEModel"],
        "model_type": "vit_mae",
        "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": arch.mlp_hidden,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": img[0] if img[0] == img[1] else list(img),
        "patch_size": arch.patch_size,
        "num_channels": arch.in_chans,
        "qkv_bias": True,
        "mask_ratio": float(hints.get("mask_ratio", 0.75)),
        "norm_pix_loss": bool(hints.get("norm_pix_loss", False)),
    }
    if with_decoder:
        cfg.update(decoder_hidden_size=arch.decoder_dim, decoder_num_hidden_layers=arch.decoder_depth,
                   decoder_num_attention_heads=arch.decoder_heads, decoder_intermediate_size=arch.decoder_hidden)
    return cfg


def _write(conv, source, dst: Path, force: bool) -> list[Path]:
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a directory (hf writes a directory)")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise UserError(f"{dst} is not empty (use --force to overwrite)")
    dst.mkdir(parents=True, exist_ok=True)
    cfg = dict(conv.config or {})
    save_safetensors(conv.state, dst / "model.safetensors")
    atomic_write(dst / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
    return [dst / "config.json", dst / "model.safetensors"]


FORMATS = (
    Format("hf", order=2, source_order=4, detect=_detect, to_canonical=_to_canonical,
           keep=frozenset({"cls_token", "norm", "decoder", "mask_token"}), records_heads=True, from_canonical=_from_canonical,
           config=lambda arch, kept, hints: hf_config(arch, "decoder_embed.weight" in kept, hints), write=_write, directory=True),
)
