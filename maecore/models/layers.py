"""The building blocks of the ViT encoder: attention (SDPA or the official explicit softmax), ViTDet's
decomposed relative position and window attention, BEiT's relative position bias table, the pre-norm
block and the patch embedding.  Module and parameter names are the official MAE / timm ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp

RelPos = Literal["decomposed", "bias"] | None


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


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
