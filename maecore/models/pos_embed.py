"""Absolute position embeddings: MAE's fixed 2-D sin-cos table and the bicubic resampling of a table to
another patch grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed

from maecore.models.layers import to_2tuple


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
