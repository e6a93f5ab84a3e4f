"""The canonical (official MAE / timm) key names: which part of an MAE/ViT a key is, why a model may
not need it, and the architecture a state dict's shapes imply.

This is the one home of these facts: the converter, the task loader and pretraining (an MAE rebuilt
from a checkpoint) all ask here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from maecore.errors import UserError

# --------------------------------------------------------------------------------------------------
# Key taxonomy
# --------------------------------------------------------------------------------------------------
_SUB = r"(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
_EXTRA = r"(?:attn\.rel_pos_h|attn\.rel_pos_w|attn\.relative_position_bias_table|ls1\.gamma|ls2\.gamma)"
_KINDS: list[tuple[str, re.Pattern]] = [
    ("cls_token", re.compile(r"cls_token")),
    ("pos_embed", re.compile(r"pos_embed")),
    ("stem", re.compile(r"patch_embed\.proj\.(?:weight|bias)")),
    ("block", re.compile(rf"blocks\.\d+\.{_SUB}")),
    ("extra", re.compile(rf"blocks\.\d+\.{_EXTRA}")),
    ("norm", re.compile(r"norm\.(?:weight|bias)")),
    ("fc_norm", re.compile(r"fc_norm\.(?:weight|bias)")),
    ("head", re.compile(r"head\.(?:weight|bias)")),
    ("mask_token", re.compile(r"mask_token")),
    ("decoder", re.compile(rf"decoder_(?:embed\.(?:weight|bias)|pos_embed|blocks\.\d+\.{_SUB}"
                           r"|norm\.(?:weight|bias)|pred\.(?:weight|bias))")),
    ("encoder_mask_token", re.compile(r"encoder_mask_token")),
]

# why a converted file leaves a part out, unless its format says more precisely (Format.why)
DROP_REASONS: dict[str, str] = {
    "fc_norm": "classifier norm, not part of the backbone",
    "head": "classification head (re-initialised for a new task)",
    "decoder": "MAE decoder (pretraining only)",
    "mask_token": "MAE mask token (pretraining only)",
    "encoder_mask_token": "MAE encoder mask token (ablation, pretraining only)",
}


def key_kind(key: str) -> str | None:
    """Which part of an MAE/ViT a canonical key belongs to, or None for a key no ViT has."""
    for kind, pat in _KINDS:
        if pat.fullmatch(key):
            return kind
    return None


def is_decoder_key(key: str) -> bool:
    """Keys of an MAE checkpoint that belong to the decoder (absent from encoder-only releases)."""
    return key.startswith("decoder_") or key == "mask_token"


def why_dropped(key: str) -> str | None:
    """Keys of an MAE checkpoint that no downstream encoder uses, with the reason."""
    if is_decoder_key(key):
        return "MAE decoder"
    if key == "encoder_mask_token":
        return "MAE encoder mask token (ablation)"
    return None


def is_neutral(key: str, v: torch.Tensor) -> bool:
    """Relative-position tables at zero and layer scale at one compute nothing: safe to drop."""
    if key.endswith("gamma"):
        return bool(torch.all(v == 1))
    return bool(torch.all(v == 0))


def neutral_why(key: str) -> str:
    return "layer scale 1 (identity)" if key.endswith("gamma") else "zero relative position (no effect)"


def block_index(key: str) -> int:
    return int(key.split(".")[1])


# --------------------------------------------------------------------------------------------------
# Architecture read from shapes
# --------------------------------------------------------------------------------------------------
# embed dim -> heads of the published sizes (a state dict does not record the head count)
HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def guess_heads(dim: int) -> int:
    """Encoder heads of a ``dim``-wide ViT when nothing records them: the published size's, else 64-d heads."""
    return HEADS_BY_DIM.get(dim, max(1, dim // 64))


def guess_decoder_heads(dim: int) -> int:
    """MAE decoder heads when nothing records them: 16 as every release, else 32-d heads."""
    return 16 if dim % 16 == 0 else max(1, dim // 32)


@dataclass
class Arch:
    embed_dim: int
    depth: int
    patch_size: int
    in_chans: int
    mlp_hidden: int
    grid: tuple[int, int]
    pos_prefix: int
    num_heads: int
    heads_guessed: bool
    decoder_dim: int | None = None
    decoder_depth: int = 0
    decoder_hidden: int | None = None
    decoder_heads: int | None = None
    decoder_grid_prefix: int = 1

    @property
    def img_size(self) -> tuple[int, int]:
        return (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)

    def mae_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs of the MAE (``pretrain.model.MaskedAutoencoderViT``) with these sizes."""
        h, w = self.img_size
        kw: dict[str, Any] = dict(img_size=h if h == w else (h, w), patch_size=self.patch_size, in_chans=self.in_chans,
                                  embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)
        if self.decoder_dim:
            kw.update(decoder_embed_dim=self.decoder_dim, decoder_num_heads=self.decoder_heads, decoder_depth=self.decoder_depth)
        return kw


def _grid_of(n_rows: int, prefer_prefix: int, hint: tuple[int, int] | None = None) -> tuple[tuple[int, int], int]:
    """(grid, prefix rows) of an n-row position table."""
    for p in (prefer_prefix, 1 - prefer_prefix):
        if hint and hint[0] * hint[1] == n_rows - p:
            return hint, p
    for p in (prefer_prefix, 1 - prefer_prefix):
        s = math.isqrt(max(n_rows - p, 0))
        if s > 0 and s * s == n_rows - p:
            return (s, s), p
    raise UserError(f"pos_embed has {n_rows} rows: not a square patch grid (with or without a cls slot); give --img-size")


def hw(x: Any) -> tuple[int, int]:
    """An image size given as N, [N] or (H, W)."""
    if isinstance(x, int):
        return (x, x)
    if isinstance(x, (list, tuple)) and len(x) == 1:
        return (int(x[0]), int(x[0]))
    a, b = x
    return (int(a), int(b))


def infer_arch(state: dict[str, torch.Tensor], hints: dict[str, Any] | None = None) -> Arch:
    """Sizes of the encoder (and decoder) that produced a canonical state dict.  ``hints`` are what a
    checkpoint records besides its tensors (``num_heads``, ``decoder_num_heads``, ``img_size``,
    ``pos_prefix``); head counts it does not record are guessed (``Arch.heads_guessed``)."""
    hints = hints or {}
    try:
        proj = state["patch_embed.proj.weight"]
    except KeyError:
        raise UserError("not a ViT encoder checkpoint: no patch embedding (patch_embed.proj.weight)") from None
    if proj.ndim != 4:
        raise UserError(f"shape mismatch: patch_embed.proj.weight {tuple(proj.shape)} is not a conv kernel (D, C, p, p)")
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    blocks = {block_index(k) for k in state if k.startswith("blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    if blocks != set(range(depth)):
        raise UserError(f"blocks are not numbered 0..{depth - 1}: missing {sorted(set(range(depth)) - blocks)[:8]}")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    hidden = int(fc1.shape[0]) if fc1 is not None else 4 * dim
    hint_grid = None
    if hints.get("img_size"):
        h, w = hw(hints["img_size"])
        hint_grid = (h // patch, w // patch)
    if "pos_embed" in state:
        pe = state["pos_embed"]
        if pe.ndim != 3:
            raise UserError(f"shape mismatch: pos_embed {tuple(pe.shape)} is not (1, N, D)")
        grid, prefix = _grid_of(pe.shape[1], 1 if ("cls_token" in state or hints.get("pos_prefix") == 1) else 0, hint_grid)
    else:
        grid, prefix = hint_grid or (14, 14), 0
    heads = hints.get("num_heads")
    guessed = heads is None
    if heads is None:
        heads = guess_heads(dim)
    arch = Arch(dim, depth, patch, in_chans, hidden, grid, prefix, int(heads), guessed)
    if "decoder_embed.weight" in state:
        arch.decoder_dim = int(state["decoder_embed.weight"].shape[0])
        dblocks = {block_index(k) for k in state if k.startswith("decoder_blocks.")}
        arch.decoder_depth = max(dblocks) + 1 if dblocks else 0
        dfc1 = state.get("decoder_blocks.0.mlp.fc1.weight")
        arch.decoder_hidden = int(dfc1.shape[0]) if dfc1 is not None else 4 * arch.decoder_dim
        dh = hints.get("decoder_num_heads")
        arch.decoder_heads = int(dh) if dh else guess_decoder_heads(arch.decoder_dim)
    return arch


def check_shapes(state: dict[str, torch.Tensor], arch: Arch) -> None:
    """Every canonical key must have the shape its architecture implies; mismatches name the keys."""
    d, h = arch.embed_dim, arch.mlp_hidden
    exp: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,), "norm.bias": (d,), "fc_norm.weight": (d,), "fc_norm.bias": (d,),
        "encoder_mask_token": (1, 1, d),
    }

    def block(prefix: str, dim: int, hid: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}norm1.weight": (dim,), f"{prefix}norm1.bias": (dim,), f"{prefix}norm2.weight": (dim,),
                f"{prefix}norm2.bias": (dim,), f"{prefix}attn.qkv.weight": (3 * dim, dim), f"{prefix}attn.qkv.bias": (3 * dim,),
                f"{prefix}attn.proj.weight": (dim, dim), f"{prefix}attn.proj.bias": (dim,), f"{prefix}mlp.fc1.weight": (hid, dim),
                f"{prefix}mlp.fc1.bias": (hid,), f"{prefix}mlp.fc2.weight": (dim, hid), f"{prefix}mlp.fc2.bias": (dim,),
                f"{prefix}ls1.gamma": (dim,), f"{prefix}ls2.gamma": (dim,)}

    for i in range(arch.depth):
        exp.update(block(f"blocks.{i}.", d, h))
    if arch.decoder_dim:
        dd, dh = arch.decoder_dim, arch.decoder_hidden or 4 * arch.decoder_dim
        exp.update({"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
                    "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                    "decoder_pred.weight": (arch.patch_size**2 * arch.in_chans, dd),
                    "decoder_pred.bias": (arch.patch_size**2 * arch.in_chans,)})
        for j in range(arch.decoder_depth):
            exp.update(block(f"decoder_blocks.{j}.", dd, dh))
    bad = []
    for k, v in state.items():
        want = exp.get(k)
        if k == "pos_embed" or k == "decoder_pos_embed":
            dim = d if k == "pos_embed" else (arch.decoder_dim or -1)
            if v.ndim != 3 or v.shape[0] != 1 or v.shape[2] != dim:
                bad.append(f"{k} {tuple(v.shape)} vs (1, N, {dim})")
            continue
        if k == "head.weight" and (v.ndim != 2 or v.shape[1] != d):
            bad.append(f"{k} {tuple(v.shape)} vs (classes, {d})")
        if k == "head.bias" and "head.weight" in state and tuple(v.shape) != (state["head.weight"].shape[0],):
            bad.append(f"{k} {tuple(v.shape)} vs ({state['head.weight'].shape[0]},)")
        if want is not None and tuple(v.shape) != want:
            bad.append(f"{k} {tuple(v.shape)} vs {want}")
    if bad:
        raise UserError(f"shape mismatch: {'; '.join(bad[:6])}{' …' if len(bad) > 6 else ''}")
