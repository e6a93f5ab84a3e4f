"""The one Vision Transformer encoder every task uses.

Parameter names follow the official MAE / timm layout (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so that
checkpoints move between MAE, timm, detectron2 and mmseg by renaming alone.  Options cover what the
downstream tasks need: masking (pretraining), window attention and decomposed relative position
(ViTDet), relative position bias tables and layer scale (BEiT / mmseg UperNet), multi-level outputs,
frozen leading blocks (linear probe, partial fine-tuning), activation checkpointing.

The forward API has timm's shape: ``forward_features`` (final tokens), ``forward_intermediates``
(the (B, C, H, W) maps of chosen blocks, for dense heads), ``no_weight_decay`` (names AdamW must not decay).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed

RelPos = Literal["decomposed", "bias"] | None


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


# --------------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------------
def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """concat[sin(pos*w), cos(pos*w)] with w_k = 1/10000^(k/(D/2)), k = 0..D/2-1 (float64)."""
    assert embed_dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid: int | Sequence[int], cls_token: bool = False) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table, (1+H*W or H*W, D).

    The first D/2 channels encode the column (w) coordinate and the last D/2 the row (h), as the
    official code does (its meshgrid puts w first); the cls row is zeros.
    """
    gh, gw = to_2tuple(grid)
    assert embed_dim % 4 == 0, "sin-cos position embedding needs embed_dim divisible by 4"
    ww, hh = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    emb = np.concatenate([sincos_1d(embed_dim // 2, ww), sincos_1d(embed_dim // 2, hh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int] | None, num_prefix: int
) -> torch.Tensor:
    """Bicubic resampling of the patch part of an absolute position table; prefix rows untouched.

    No antialiasing and align_corners=False, as the official MAE ``interpolate_pos_embed`` and
    ViTDet's ``get_abs_pos`` do, so numbers match theirs.
    """
    if old_grid is None:
        side = math.isqrt(pos_embed.shape[1] - num_prefix)
        if side * side != pos_embed.shape[1] - num_prefix:
            raise ValueError(
                f"pos_embed has {pos_embed.shape[1] - num_prefix} patch rows, not a square grid; give old_grid"
            )
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=num_prefix, antialias=False
    )


# --------------------------------------------------------------------------------------------------
# Relative position (ViTDet decomposed, BEiT bias tables)
# --------------------------------------------------------------------------------------------------
def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis, (q, k, C).

    The table holds 2*max(q,k)-1 rows; a table trained for another size is linearly resized (ViTDet)."""
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = rel_pos.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[rel.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias (B, heads, HW, HW) of ViTDet's decomposed relative position.

    q is the *unscaled* query (B, heads, HW, C), as in ViTDet / SAM."""
    h, w = grid
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    b, nh, _, c = q.shape
    r_q = q.reshape(b, nh, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (b, nh, h, w, kh, kw)
    return bias.reshape(b, nh, h * w, h * w)


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """BEiT's index into the bias table, (1+HW, 1+HW): pairwise offsets plus three cls slots."""
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (HW, HW, 2)
    rel[:, :, 0] += gh - 1
    rel[:, :, 1] += gw - 1
    rel[:, :, 0] *= 2 * gw - 1
    num_rel = (2 * gh - 1) * (2 * gw - 1)
    index = torch.zeros((gh * gw + 1, gh * gw + 1), dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_rel  # cls -> token
    index[0:, 0] = num_rel + 1  # token -> cls
    index[0, 0] = num_rel + 2  # cls -> cls
    return index


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------
def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` written out, as the official MAE / timm 0.3 code does.

    Same numbers as SDPA up to rounding, but it materialises the (B, heads, N, N) attention matrix;
    kept for ``tools/benchmark.py --baseline`` and for FLOP counters that do not know SDPA."""
    attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (fused kernels).

    ``fused = False`` (per instance, see :func:`set_fused_attention`) switches to the explicit
    softmax path of the official code instead."""

    fused: bool = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        rel_pos: RelPos = None,
        rel_pos_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos = rel_pos
        self.rel_pos_grid = rel_pos_grid
        # Relative-position parameters start at zero: the MAE paper's choice for transfer, so a
        # converted checkpoint computes exactly what the pretrained encoder computed.
        if rel_pos == "decomposed":
            assert rel_pos_grid is not None
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_grid[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_grid[1] - 1, self.head_dim))
        elif rel_pos == "bias":
            assert rel_pos_grid is not None
            n = (2 * rel_pos_grid[0] - 1) * (2 * rel_pos_grid[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(n, num_heads))
            self.register_buffer("relative_position_index", relative_position_index(rel_pos_grid), persistent=False)
        elif rel_pos is not None:
            raise ValueError(f"unknown rel_pos {rel_pos!r}")

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.rel_pos == "decomposed":
            if num_prefix:
                raise ValueError("decomposed relative position works on patch tokens only (no cls token)")
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, grid)
        elif self.rel_pos == "bias":
            if tuple(grid) != tuple(self.rel_pos_grid) or num_prefix != 1:
                raise ValueError(
                    f"relative position bias table was built for a {self.rel_pos_grid} grid with a cls token; "
                    f"got grid {tuple(grid)} with {num_prefix} prefix tokens"
                )
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0).to(q.dtype)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            x = explicit_attention(q, k, v, bias)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def set_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Switch every :class:`Attention` in ``model`` between SDPA (``True``) and the explicit softmax
    path (``False``); returns how many modules were switched.  Weights are untouched."""
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused = enabled
            n += 1
    return n


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B*nW, ws*ws, C), zero-padding H and W up to multiples of ws (ViTDet)."""
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c), (hp, wp)


def window_unpartition(x: torch.Tensor, ws: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    hp, wp = padded
    h, w = hw
    b = x.shape[0] // ((hp // ws) * (wp // ws))
    x = x.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


class Block(nn.Module):
    """Pre-norm transformer block; optional window attention, relative position and layer scale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        window_size: int = 0,
        rel_pos: RelPos = None,
        rel_pos_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        grid = (window_size, window_size) if window_size else rel_pos_grid
        self.attn = Attention(dim, num_heads, qkv_bias, rel_pos, grid)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attend(self, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        ws = self.window_size
        if not ws:
            return self.attn(x, grid, num_prefix)
        if num_prefix:
            raise ValueError("window attention works on patch tokens only (no cls token)")
        b, _, c = x.shape
        xw, padded = window_partition(x.view(b, grid[0], grid[1], c), ws)
        xw = self.attn(xw, (ws, ws))
        return window_unpartition(xw, ws, padded, grid).reshape(b, -1, c)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._attend(self.norm1(x), grid, num_prefix)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv (``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size[0]
        if x.ndim != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(f"expected images (B, {self.proj.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


# --------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """ViT encoder with the options every task of the toolkit needs.

    Args:
        img_size: the input size the position table is made for (int or (H, W)); other sizes work,
            the table is resampled bicubically at run time.
        pos_embed: ``"learned"`` (fine-tuning), ``"sincos"`` (MAE pretraining: fixed, not trained)
            or ``"none"``.
        class_token: prepend a cls token.  ``pos_embed_cls_slot`` keeps a cls row in the position
            table without a cls token (ViTDet keeps the pretraining table that way).
        final_norm: apply ``norm`` at the end (off for dense tasks, which tap blocks).
        window_size / window_block_indexes: ViTDet window attention in all blocks but the listed
            global ones (``window_block_indexes`` lists the *windowed* blocks).
        rel_pos: ``"decomposed"`` (ViTDet ``rel_pos_h/w``) or ``"bias"`` (BEiT tables); both zero-init.
        init_values: layer scale init (``ls1.gamma``/``ls2.gamma``), None for no layer scale.
        out_indices: the blocks a dense-task trunk taps by default: ``forward_intermediates`` without
            ``indices`` returns their (B, C, H, W) maps, and so does calling the module.  The task
            heads keep their own copy and pass it explicitly; None for a plain encoder.
        rel_pos_grid: patch grid the *global* blocks' relative-position tables are sized for
            (default: the position table's grid).  ViTDet keeps the absolute table at the
            pretraining grid (224/16 = 14) but sizes ``rel_pos_h/w`` for the detection input
            (1024/16 = 64), so its checkpoints load by shape.

    Frozen leading part (:meth:`freeze_leading`): ``frozen_stem`` (patch embedding, cls token, position
    table) and the first ``frozen_blocks`` blocks run as a fixed feature extractor — in eval mode (no drop
    path) and, once the stem is frozen, under ``no_grad`` (nothing before them needs a gradient).
    """

    # class-level defaults: nothing frozen (instances set them through freeze_leading)
    frozen_stem: bool = False
    frozen_blocks: int = 0

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        pos_embed: Literal["learned", "sincos", "none"] = "learned",
        pos_embed_cls_slot: bool | None = None,
        final_norm: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        window_size: int = 0,
        window_block_indexes: Sequence[int] = (),
        rel_pos: RelPos = None,
        out_indices: Sequence[int] | None = None,
        grad_checkpointing: bool = False,
        rel_pos_grid: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = 1 if class_token else 0
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        if self.out_indices is not None and not all(0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices {list(self.out_indices)} must be blocks 0..{depth - 1}")
        self.grad_checkpointing = grad_checkpointing
        self.pos_embed_type = pos_embed

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        cls_slot = class_token if pos_embed_cls_slot is None else pos_embed_cls_slot
        self.pos_embed_prefix = 1 if cls_slot else 0
        if pos_embed == "none":
            self.pos_embed = None
        else:
            table = torch.zeros(1, self.pos_embed_prefix + self.num_patches, embed_dim)
            # the sin-cos table is fixed, but kept as a (frozen) parameter so it sits in the state
            # dict under the official name, as in the released checkpoints
            self.pos_embed = nn.Parameter(table, requires_grad=pos_embed == "learned")

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, as timm (python: works on meta)
        windowed = set(window_block_indexes)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                drop_path=dpr[i],
                init_values=init_values,
                window_size=window_size if i in windowed else 0,
                rel_pos=rel_pos,
                rel_pos_grid=to_2tuple(rel_pos_grid) if rel_pos_grid is not None else self.grid_size,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        self.init_weights()

    # ---- init -------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """MAE init: xavier-uniform Linears and patch conv (viewed as a Linear), std-0.02 tokens."""
        if self.pos_embed is not None:
            if self.pos_embed_type == "sincos":
                table = get_2d_sincos_pos_embed(self.embed_dim, self.grid_size, cls_token=bool(self.pos_embed_prefix))
                self.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- helpers ----------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Exact names of the parameters AdamW must not decay (1-D ones are skipped by
        :func:`maecore.optim.param_groups` anyway): the position table, the cls token and the
        relative-position tables (``rel_pos_h/w``, ``relative_position_bias_table``) this model has."""
        return {
            n for n, _ in self.named_parameters()
            if n in ("pos_embed", "cls_token") or n.endswith((".rel_pos_h", ".rel_pos_w", ".relative_position_bias_table"))
        }

    def layer_id(self, name: str) -> int:
        """BEiT layer-decay id: 0 for the stem (tokens, pos-embed, patch embed), i+1 for block i,
        depth+1 for everything else (final norm, heads)."""
        if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token", "encoder_mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """Position table for a patch grid: resampled bicubically if it differs from the stored one."""
        if self.pos_embed is None:
            return None
        return resample_pos_embed(self.pos_embed, grid, self.grid_size, self.pos_embed_prefix)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def check_indices(self, indices: Sequence[int]) -> tuple[int, ...]:
        """``indices`` as a tuple of block numbers, or a ValueError naming the valid range."""
        out = tuple(int(i) for i in indices)
        bad = [i for i in out if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range: this encoder has blocks 0..{self.depth - 1}")
        return out

    # ---- frozen leading part ----------------------------------------------------------------
    def freeze_leading(self, num_blocks: int, stem: bool = True) -> None:
        """Freeze the stem (``stem``) and the first ``num_blocks`` blocks: no gradients, eval mode in
        training, no autograd graph (linear probe: all blocks; partial fine-tuning: all but the last K)."""
        if not 0 <= num_blocks <= self.depth:
            raise ValueError(f"cannot freeze {num_blocks} blocks of a {self.depth}-block encoder")
        params = [p for blk in self.blocks[:num_blocks] for p in blk.parameters()]
        if stem:
            params += [*self.patch_embed.parameters(), *(p for p in (self.cls_token, self.pos_embed) if p is not None)]
        for p in params:
            p.requires_grad_(False)
        self.frozen_stem = stem
        self.frozen_blocks = num_blocks
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that run as a fixed feature extractor (kept in eval mode by :meth:`train`): the frozen
        stem and leading blocks, and the attention branch of the next block when its attention is frozen
        too (partial fine-tuning of the last MLP only)."""
        if not (self.frozen_stem or self.frozen_blocks):
            return []
        mods: list[nn.Module] = [self.patch_embed] if self.frozen_stem else []
        mods += list(self.blocks[: self.frozen_blocks])
        if self.frozen_blocks < self.depth:
            nxt = self.blocks[self.frozen_blocks]
            if not any(p.requires_grad for p in nxt.parameters()):
                mods.append(nxt)
            elif not any(p.requires_grad for p in nxt.attn.parameters()):
                mods += [nxt.norm1, nxt.attn, nxt.ls1, nxt.drop_path1]
        return mods

    def train(self, mode: bool = True) -> VisionTransformer:
        super().train(mode)
        for m in self.frozen_modules():  # fixed feature extractor: no drop path, no statistics updates
            m.eval()
        return self

    # ---- forward ----------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """Patch tokens with absolute positions added, their grid, and the prefix position rows."""
        x, grid = self.patch_embed(x)
        pos = self.pos_embed_for(grid)
        if pos is None:
            return x, grid, None
        return x + pos[:, self.pos_embed_prefix :], grid, pos[:, : self.pos_embed_prefix]

    def add_prefix(self, x: torch.Tensor, prefix_pos: torch.Tensor | None) -> torch.Tensor:
        if self.cls_token is None:
            return x
        cls = self.cls_token if prefix_pos is None or prefix_pos.shape[1] == 0 else self.cls_token + prefix_pos
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> the blocks' input tokens (B, prefix+HW, D) and the patch grid; no graph if the stem is frozen."""
        with torch.no_grad() if self.frozen_stem else contextlib.nullcontext():
            x, grid, prefix_pos = self.embed(x)
            return self.add_prefix(x, prefix_pos), grid

    def _blocks(
        self, x: torch.Tensor, grid: tuple[int, int], indices: tuple[int, ...], stop_early: bool = False,
        tap: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The one block loop: frozen leading blocks, activation checkpointing, taps (``tap`` of the tokens as
        they leave block i, prefix included; the tokens themselves without ``tap``); with ``stop_early`` it ends
        at the last tapped block.  A tap is made right after its block, once per block however often it is
        asked for: the autograd graph, and so the order in which gradients are summed, is the one of a loop
        that reshapes as it goes — training stays bit-identical to the pre-``forward_intermediates`` code."""
        npre = self.num_prefix_tokens
        taps: dict[int, torch.Tensor] = {}
        want = set(indices)
        end = max(indices) + 1 if (stop_early and indices) else self.depth
        for i, blk in enumerate(self.blocks[:end]):
            if i < self.frozen_blocks:
                with torch.no_grad() if self.frozen_stem else contextlib.nullcontext():
                    x = blk(x, grid, npre)
            elif self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, grid, npre, use_reentrant=False)
            else:
                x = blk(x, grid, npre)
            if i in want:
                taps[i] = x if tap is None else tap(x)
        return x, taps

    def to_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens (B, prefix+HW, D) -> the patch tokens as a (B, D, H, W) map."""
        t = x[:, self.num_prefix_tokens :]
        return t.transpose(1, 2).reshape(t.shape[0], -1, grid[0], grid[1])

    def run_blocks(
        self, x: torch.Tensor, grid: tuple[int, int], out_indices: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All blocks on prepared tokens; returns the last tokens (before ``norm``) and the (B, C, H, W)
        maps of the ``out_indices`` blocks, in the order asked (a block listed twice comes twice)."""
        idx = self.check_indices(out_indices or ())
        x, taps = self._blocks(x, grid, idx, tap=lambda t: self.to_map(t, grid))
        return x, [taps[i] for i in idx]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens after the final ``norm``, (B, prefix+HW, D)."""
        x, grid = self.prepare_tokens(x)
        x, _ = self._blocks(x, grid, ())
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Sequence[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the blocks ``indices`` (default: ``out_indices``, else every block), in the order
        asked — a block listed twice comes twice (a shallow encoder can still feed a 4-level neck).

        Args:
            indices: block numbers 0..depth-1; anything else is a ValueError.
            norm: pass each tapped output through the final ``norm`` (an identity in the dense trunks).
            output_fmt: ``"NCHW"`` patch maps (B, D, H, W), or ``"NLC"`` patch tokens (B, HW, D);
                prefix tokens are left out either way.
            intermediates_only: return only the list; otherwise ``(final tokens after norm, list)``.
            stop_early: with ``intermediates_only``, skip the blocks after the last tapped one (same
                maps, less work; in training the skipped blocks' drop path no longer draws random numbers).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if indices is None:
            indices = self.out_indices if self.out_indices is not None else range(self.depth)
        idx = self.check_indices(indices)
        x, grid = self.prepare_tokens(x)

        def tap(t: torch.Tensor) -> torch.Tensor:
            t = self.norm(t) if norm else t
            return self.to_map(t, grid) if output_fmt == "NCHW" else t[:, self.num_prefix_tokens :]

        x, taps = self._blocks(x, grid, idx, stop_early=stop_early and intermediates_only, tap=tap)
        outs = [taps[i] for i in idx]
        if intermediates_only:
            return outs
        return self.norm(x), outs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Tokens (:meth:`forward_features`); a trunk built with ``out_indices`` returns those blocks'
        (B, C, H, W) maps instead, as a dense backbone module does."""
        if self.out_indices is not None:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return self.forward_features(x)


