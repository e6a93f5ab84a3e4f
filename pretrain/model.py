"""MAE (He et al., CVPR 2022): encoder on the visible patches, light decoder with mask tokens.

The computation is the official one, step for step, and the parameters carry the official names, so
released checkpoints load strictly and ours load there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from maecore.models import VisionTransformer, register_model, resolve_model
from maecore.models.layers import Block
from maecore.models.pos_embed import get_2d_sincos_pos_embed, resample_pos_embed

MaskType = Literal["random", "block", "grid"]


# --------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------
def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C) with the official (h, w, p, q, c) layout."""
    n, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], c: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); inverse of :func:`patchify`."""
    gh, gw = grid
    x = x.reshape(x.shape[0], gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, gh * p, gw * p)


# --------------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------------
def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample shuffling by argsort of noise; keeps the ``int(L*(1-ratio))`` lowest-noise patches.

    Returns (x_kept, mask, ids_restore, ids_keep); ``mask`` is 1 for removed patches, in the
    original patch order.  Any mask generator expresses its choice as noise (lower = keep).
    """
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore, ids_keep


def grid_noise(n: int, grid: tuple[int, int], device: torch.device | str = "cpu", generator=None) -> torch.Tensor:
    """Regular-grid masking (paper Table 1f): keep one patch of every 2x2 cell (its top-left).

    Kept patches get noise in [0, 1), the others [1, 2), so argsort keeps the grid first."""
    gh, gw = grid
    keep = torch.zeros(gh, gw, device=device)
    keep[0::2, 0::2] = 1
    u = torch.rand(n, gh * gw, device=device, generator=generator)
    return u + (1 - keep.flatten())[None]


def block_noise(
    n: int,
    grid: tuple[int, int],
    mask_ratio: float,
    min_patches: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """Block-wise masking (BEiT): rectangles of random area and aspect until the masked count is
    reached; noise ranks masked patches last so random_masking keeps exactly the right number."""
    rng = generator or np.random.default_rng()
    gh, gw = grid
    length = gh * gw
    target = length - int(length * (1 - mask_ratio))
    out = np.empty((n, length), dtype=np.float32)
    log_aspect = (np.log(aspect[0]), np.log(aspect[1]))
    for i in range(n):
        m = np.zeros((gh, gw), dtype=bool)
        tries = 0
        while m.sum() < target and tries < 100:
            tries += 1
            left = target - int(m.sum())
            area = rng.uniform(min(min_patches, left), max(min_patches, left))
            ar = np.exp(rng.uniform(*log_aspect))
            h = int(round(np.sqrt(area * ar)))
            w = int(round(np.sqrt(area / ar)))
            if not (0 < h <= gh and 0 < w <= gw):
                continue
            top, lft = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
            m[top : top + h, lft : lft + w] = True
        out[i] = rng.random(length) + m.reshape(-1)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class MaskedAutoencoderViT(VisionTransformer):
    """MAE with a ViT encoder (this class *is* the encoder, so its keys are the official flat ones)."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        mask_type: MaskType = "random",
        encoder_mask_tokens: bool = False,
    ) -> None:
        self.decoder_embed_dim = decoder_embed_dim
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_token=True,
            pos_embed="sincos",
            final_norm=True,
        )
        self.norm_pix_loss = norm_pix_loss
        self.mask_type = mask_type
        # Table 1c ablation: the encoder also sees the masked positions, as mask tokens
        self.encoder_mask_tokens = encoder_mask_tokens
        if encoder_mask_tokens:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        if not hasattr(self, "decoder_pos_embed"):  # called by the encoder's constructor first
            return
        table = get_2d_sincos_pos_embed(self.decoder_embed_dim, self.grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        if self.encoder_mask_tokens:
            nn.init.normal_(self.encoder_mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The encoder's names plus the decoder's mask token and position table and the encoder mask
        token (Table 1c ablation) when present."""
        own = {n for n, _ in self.named_parameters()}
        return super().no_weight_decay() | ({"mask_token", "decoder_pos_embed", "encoder_mask_token"} & own)

    # ---- pieces -----------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return unpatchify(x, self.patch_size, grid or self.grid_size, self.in_chans)

    def make_noise(self, n: int, grid: tuple[int, int], mask_ratio: float, device: torch.device) -> torch.Tensor:
        """Noise for the configured mask generator (random / block / grid)."""
        if self.mask_type == "random":
            return torch.rand(n, grid[0] * grid[1], device=device)
        if self.mask_type == "grid":
            return grid_noise(n, grid, device)
        if self.mask_type == "block":
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from torch's RNG, so runs resume exactly
            return block_noise(n, grid, mask_ratio, generator=np.random.default_rng(seed)).to(device)
        raise ValueError(f"unknown mask type {self.mask_type!r}")

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        x, grid, prefix_pos = self.embed(imgs)
        if noise is None:
            noise = self.make_noise(x.shape[0], grid, mask_ratio, x.device)
        x_kept, mask, ids_restore, _ = random_masking(x, mask_ratio, noise)
        if self.encoder_mask_tokens:
            # every position goes through the encoder; removed ones carry a mask token + position
            pos = self.pos_embed_for(grid)[:, self.pos_embed_prefix :]
            m = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - m) + (self.encoder_mask_token + pos) * m
        else:
            x = x_kept
        x = self.add_prefix(x, prefix_pos)
        x, _ = self.run_blocks(x, grid)
        return self.norm(x), mask, ids_restore, grid

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        if x.shape[1] - 1 < length:  # the encoder saw only the visible patches: add mask tokens, unshuffle
            mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
            x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
            x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            x = torch.cat([x[:, :1], x_], dim=1)
        x = x + resample_pos_embed(self.decoder_pos_embed, grid, self.grid_size, 1)
        for blk in self.decoder_blocks:
            x = blk(x, grid, 1)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE on the removed patches; with ``norm_pix_loss`` targets are normalised per
        patch by their own mean and (unbiased) variance."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore, grid = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, grid)
        return self.forward_loss(imgs, pred, mask), pred, mask


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------
# Registered in maecore.models (one registry), family "mae": importing this module is what makes the mae_vit_*
# names available; each builder spells out its encoder (the vit_* size of the same name, checked there) and
# the official decoder (512 wide, 8 blocks, 16 heads); keyword arguments override them.
@register_model("tiny", family="mae", patch_size=16, embed_dim=192, depth=12, num_heads=3,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
def mae_vit_tiny_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """MAE with a ViT-Ti/16 encoder (192 wide, 12 blocks, 3 heads)."""
    return MaskedAutoencoderViT(**kwargs)


@register_model("small", family="mae", patch_size=16, embed_dim=384, depth=12, num_heads=6,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
def mae_vit_small_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """MAE with a ViT-S/16 encoder (384 wide, 12 blocks, 6 heads)."""
    return MaskedAutoencoderViT(**kwargs)


@register_model("base", family="mae", patch_size=16, embed_dim=768, depth=12, num_heads=12,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
def mae_vit_base_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """MAE with a ViT-B/16 encoder (768 wide, 12 blocks, 12 heads)."""
    return MaskedAutoencoderViT(**kwargs)


@register_model("large", family="mae", patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
def mae_vit_large_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """MAE with a ViT-L/16 encoder (1024 wide, 24 blocks, 16 heads)."""
    return MaskedAutoencoderViT(**kwargs)


@register_model("huge", family="mae", patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
def mae_vit_huge_patch14(**kwargs: Any) -> MaskedAutoencoderViT:
    """MAE with a ViT-H/14 encoder (1280 wide, 32 blocks, 16 heads)."""
    return MaskedAutoencoderViT(**kwargs)


MODELS = {
    f.__name__: f
    for f in (mae_vit_tiny_patch16, mae_vit_small_patch16, mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14)
}


def build_mae(name: str, **kwargs: Any) -> MaskedAutoencoderViT:
    """The MAE ``name`` (any spelling the registry resolves: ``mae_vit_base_patch16``, ``vit_base_patch16``,
    ``base``); an unknown name is an :class:`~maecore.models.UnknownModelError` (a ``ValueError``)."""
    return MODELS[resolve_model(name, "mae").name](**kwargs)

