"""ViT classifiers for the three transfer protocols of the MAE paper.

:class:`VisionTransformerClassifier` *is* the shared encoder (flat official keys) plus ``fc_norm`` and
``head``, exactly as the official ``models_vit``: with global pooling the encoder's final ``norm`` is
replaced by a new ``fc_norm`` after the average; with the cls token the final ``norm`` is kept.

Protocol helpers:

* :func:`setup_linear_probe` freezes the encoder and puts ``BatchNorm1d(affine=False)`` + Linear on
  top (paper App. A.1);
* :func:`setup_partial_finetune` freezes all but the last K blocks (K = 0.5: the MLP sub-block of the
  last block only; paper §4.3).

Frozen parts are the encoder's frozen leading part (:meth:`~maecore.models.vit.VisionTransformer.freeze_leading`):
they run under ``no_grad`` and stay in eval mode (no drop path, BN statistics untouched).

Forward, as timm: ``forward_features`` (the encoder's tokens after its final norm) → ``forward_head``
(pooling, ``fc_norm``, ``head``; ``pre_logits=True`` stops before ``head``: the features a linear probe caches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from maecore.convert import ConversionReport, load_backbone
from maecore.errors import UserError
from maecore.models import VisionTransformer, model_kwargs


class VisionTransformerClassifier(VisionTransformer):
    """ViT + (``fc_norm``) + linear ``head``.

    Args:
        num_classes: outputs of ``head``.
        global_pool: average the patch tokens (default, as the official fine-tuning) instead of taking
            the cls token.
        fc_norm: a new LayerNorm after the pooling, replacing the encoder's final ``norm`` (official
            fine-tuning with global pooling).  ``None`` means "= global_pool".  ``False`` with global
            pooling averages tokens *after* the pretrained ``norm`` — what a linear probe wants, since a
            frozen, never-trained ``fc_norm`` would sit in front of its head otherwise.
        head_init_std: trunc-normal std of the head weights (2e-5 fine-tuning, 0.01 linear probe).
        other kwargs: :class:`~maecore.models.vit.VisionTransformer` (``drop_path_rate``, ``img_size``…).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        global_pool: bool = True,
        fc_norm: bool | None = None,
        head_init_std: float = 2e-5,
        **kwargs,
    ) -> None:
        use_fc_norm = global_pool if fc_norm is None else fc_norm
        kwargs.setdefault("pos_embed", "learned")  # fine-tuning learns the (sin-cos initialised) table
        kwargs["class_token"] = True  # MAE encoders always have one (pooling may ignore it)
        kwargs["final_norm"] = not use_fc_norm
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.head_init_std = head_init_std
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(self.embed_dim, num_classes)
        self.reset_head()

    def reset_head(self, std: float | None = None) -> None:
        """New head (trunc-normal weights, zero bias) and ``fc_norm`` — done after loading a backbone,
        as the official code does."""
        std = self.head_init_std if std is None else std
        lin = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        nn.init.trunc_normal_(lin.weight, std=std)
        nn.init.zeros_(lin.bias)
        if isinstance(self.fc_norm, nn.LayerNorm):
            self.fc_norm.reset_parameters()

    # ---- forward ----------------------------------------------------------------------------
    # forward_features is the encoder's: tokens (B, 1+HW, D) after ``norm`` (an identity under fc_norm)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from :meth:`forward_features` -> logits (B, classes); with ``pre_logits`` the pooled
        feature (B, D) that ``head`` sees (global average of the patch tokens or the cls token, then ``fc_norm``)."""
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits from images (B, C, H, W), or from cached pre-logits features (B, D) (linear probe)."""
        if x.ndim == 2:
            return self.head(x)
        return self.forward_head(self.forward_features(x))


def build_classifier(
    model: str,
    num_classes: int,
    img_size: int | Sequence[int] = 224,
    patch_size: int | None = None,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    **kwargs,
) -> VisionTransformerClassifier:
    """The classifier of a registered size (``vit_base_patch16``, ``base``…; see :mod:`maecore.models`) with
    optional size overrides; other kwargs go to :class:`VisionTransformerClassifier`."""
    kw: dict = model_kwargs(model, patch_size, embed_dim, depth, num_heads)
    kw.update(kwargs)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if size[0] % kw["patch_size"] or size[1] % kw["patch_size"]:
        raise UserError(f"input size {size[0]}x{size[1]} is not a multiple of the patch size {kw['patch_size']}")
    return VisionTransformerClassifier(num_classes=num_classes, img_size=size, **kw)


def load_pretrained(model: VisionTransformerClassifier, path: str, verbose: bool = False) -> ConversionReport:
    """Pretrained MAE encoder (ours or official, any input size) into ``model``; then a fresh head
    and ``fc_norm``, as the official fine-tuning does after ``load_state_dict``."""
    report = load_backbone(model, path, verbose=verbose)
    model.reset_head()
    return report


# --------------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------------
def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def setup_linear_probe(model: VisionTransformerClassifier, head_init_std: float = 0.01) -> None:
    """Frozen encoder; head = ``BatchNorm1d(affine=False, eps=1e-6)`` + Linear (official linprobe).

    The BN whitens the features (MAE features are not normalised the way a linear classifier
    trained with LARS wants); without affine parameters it stays a linear map at test time."""
    freeze(model)
    lin = model.head if isinstance(model.head, nn.Linear) else model.head[-1]
    model.head = nn.Sequential(nn.BatchNorm1d(lin.in_features, affine=False, eps=1e-6), lin)
    for p in lin.parameters():
        p.requires_grad_(True)
    model.freeze_leading(model.depth)
    model.reset_head(head_init_std)


def setup_partial_finetune(model: VisionTransformerClassifier, tune_blocks: float) -> int:
    """Tune the last ``tune_blocks`` blocks, the final norm (``norm``/``fc_norm``) and the head;
    ``0.5`` tunes the MLP sub-block (``norm2`` + ``mlp``) of the last block only.  Returns the
    number of tuned parameters."""
    depth = model.depth
    if tune_blocks < 0 or tune_blocks > depth or (tune_blocks != int(tune_blocks) and tune_blocks != 0.5):
        raise UserError(f"tune_blocks={tune_blocks}: the blocks to tune must be 0.5 or an integer in [0, {depth}]")
    if tune_blocks >= depth:  # full fine-tuning
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    freeze(model)
    tuned: list[nn.Module] = [model.norm, model.fc_norm, model.head]
    if tune_blocks == 0.5:
        last = model.blocks[depth - 1]
        tuned += [last.norm2, last.mlp, last.ls2]
        n_frozen = depth - 1
    else:
        n_frozen = depth - int(tune_blocks)
        tuned += list(model.blocks[n_frozen:])
    for m in tuned:
        for p in m.parameters():
            p.requires_grad_(True)
    model.freeze_leading(n_frozen)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

