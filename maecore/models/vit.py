"""The one Vision Transformer encoder every task uses.

Parameter names follow the official MAE / timm layout (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so that
checkpoints move between MAE, timm, detectron2 and mmseg by renaming alone.  Options cover what the
downstream tasks need: masking (pretraining), window attention and decomposed relative position
(ViTDet), relative position bias tables and layer scale (BEiT / mmseg UperNet), multi-level outputs,
frozen leading blocks (linear probe, partial fine-tuning), activation checkpointing.

The named sizes (``vit_tiny_patch16`` … ``vit_huge_patch14``) are registered at the end, each builder
spelling out its size.

The forward API has timm's shape: ``forward_features`` (final tokens), ``forward_intermediates``
(the (B, C, H, W) maps of chosen blocks, for dense heads), ``no_weight_decay`` (names AdamW must not decay).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.utils.checkpoint

from maecore.models.layers import Block, PatchEmbed, RelPos, to_2tuple
from maecore.models.pos_embed import get_2d_sincos_pos_embed, resample_pos_embed
from maecore.models.registry import register_model


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


# --------------------------------------------------------------------------------------------------
# The shared encoder, by size (ViT paper; ViT-Ti/S from DeiT).  These declarations are maecore.models.SIZES.
# --------------------------------------------------------------------------------------------------
@register_model("tiny", patch_size=16, embed_dim=192, depth=12, num_heads=3)
def vit_tiny_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16: 192 wide, 12 blocks, 3 heads."""
    return VisionTransformer(**kwargs)


@register_model("small", patch_size=16, embed_dim=384, depth=12, num_heads=6)
def vit_small_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16: 384 wide, 12 blocks, 6 heads."""
    return VisionTransformer(**kwargs)


@register_model("base", patch_size=16, embed_dim=768, depth=12, num_heads=12)
def vit_base_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16: 768 wide, 12 blocks, 12 heads."""
    return VisionTransformer(**kwargs)


@register_model("large", patch_size=16, embed_dim=1024, depth=24, num_heads=16)
def vit_large_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16: 1024 wide, 24 blocks, 16 heads."""
    return VisionTransformer(**kwargs)


@register_model("huge", patch_size=14, embed_dim=1280, depth=32, num_heads=16)
def vit_huge_patch14(**kwargs: Any) -> VisionTransformer:
    """ViT-H/14: 1280 wide, 32 blocks, 16 heads."""
    return VisionTransformer(**kwargs)
