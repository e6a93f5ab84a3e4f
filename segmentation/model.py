"""UperNet on the MAE ViT (the MAE paper's ADE20K model, as BEiT set it up and mmsegmentation reproduces it).

``backbone``  the shared :class:`maecore.models.vit.VisionTransformer` with per-block BEiT relative position bias
              tables (zero-init), layer scale 1.0, drop path, no final norm, features of 4 blocks;
``neck``      :class:`Feature2Pyramid`: strides 4/8/16/32 from the stride-16 features (x4, x2, x1, x0.5);
``decode_head`` :class:`UPerHead` (PPM on the last level + FPN fusion); ``auxiliary_head`` :class:`FCNHead`
              on level 2.

Module names follow mmseg (``neck.upsample_4x``, ``decode_head.psp_modules``, ``lateral_convs``,
``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``; ``ConvModule`` = ``conv``/``bn``) so the converter only
renames the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maecore.models import VisionTransformer, model_kwargs

IGNORE_INDEX = 255


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Blocks tapped for the 4 levels: the ends of the 4th, 6th, 8th and 12th twelfths of the depth,
    i.e. (3, 5, 7, 11) for ViT-B and (7, 11, 15, 23) for ViT-L (the BEiT/mmseg choices)."""
    idx = [max(0, round(k * depth / 12) - 1) for k in (4, 6, 8)] + [depth - 1]
    for i in range(1, 4):  # strictly increasing where the depth allows (tiny test models)
        idx[i] = min(max(idx[i], idx[i - 1] + 1), depth - 1)
    return tuple(idx)


def build_backbone(
    arch: str = "base",
    img_size: int | Sequence[int] = 512,
    patch_size: int | None = None,
    drop_path_rate: float = 0.1,
    out_indices: Sequence[int] | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    init_values: float | None = 1.0,
    grad_checkpointing: bool = False,
) -> VisionTransformer:
    """The shared encoder set up for UperNet transfer (MAE paper App. A.4 / BEiT): relative position bias
    per block (zero-init, so a converted MAE checkpoint computes the same features), layer scale 1.0,
    cls token kept, learned absolute position table, no final norm."""
    kw = model_kwargs(arch, patch_size, embed_dim, depth, num_heads)  # any registry name or size (maecore.models)
    d, dep, heads, p = kw["embed_dim"], kw["depth"], kw["num_heads"], kw["patch_size"]
    return VisionTransformer(
        img_size=img_size,
        patch_size=p,
        embed_dim=d,
        depth=dep,
        num_heads=heads,
        class_token=True,
        pos_embed="learned",
        final_norm=False,
        drop_path_rate=drop_path_rate,
        init_values=init_values,
        rel_pos="bias",
        out_indices=tuple(out_indices) if out_indices is not None else default_out_indices(dep),
        grad_checkpointing=grad_checkpointing,
    )


class ConvModule(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU, named as mmcv's ``ConvModule`` (``conv``, ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)


class Feature2Pyramid(nn.Module):
    """Four maps of one stride (16) -> strides 4, 8, 16, 32 (mmseg ``Feature2Pyramid``; BEiT's fpn1-4)."""

    def __init__(self, embed_dim: int, rescales: Sequence[float] = (4, 2, 1, 0.5)) -> None:
        super().__init__()
        self.rescales = tuple(rescales)
        for k in self.rescales:
            if k == 4:
                self.upsample_4x = nn.Sequential(
                    nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2),
                    nn.BatchNorm2d(embed_dim),
                    nn.GELU(),
                    nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2),
                )
            elif k == 2:
                self.upsample_2x = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2))
            elif k == 1:
                self.identity = nn.Identity()
            elif k == 0.5:
                self.downsample_2x = nn.MaxPool2d(2, 2)
            elif k == 0.25:
                self.downsample_4x = nn.MaxPool2d(4, 4)
            else:
                raise ValueError(f"unsupported rescale {k} (use 4, 2, 1, 0.5, 0.25)")
        names = {4: "upsample_4x", 2: "upsample_2x", 1: "identity", 0.5: "downsample_2x", 0.25: "downsample_4x"}
        self._ops = [names[k] for k in self.rescales]

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self._ops):
            raise ValueError(f"Feature2Pyramid expects {len(self._ops)} maps, got {len(feats)}")
        return [getattr(self, op)(f) for op, f in zip(self._ops, feats)]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """UperNet (Xiao et al. 2018): pyramid pooling on the coarsest level, FPN top-down fusion, all
    levels upsampled to stride 4, concatenated, fused by a 3x3 conv, dropout, 1x1 classifier."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1)) for s in pool_scales
        )
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's decode-head init
        nn.init.zeros_(self.conv_seg.bias)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [resize(m(x), x.shape[-2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.psp_forward(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize(o, size) for o in outs[1:]], dim=1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: ``num_convs`` 3x3 ConvModules, dropout, 1x1 classifier (mmseg ``FCNHead``,
    ``concat_input=False``)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *[ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs)]
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy ignoring 255, averaged over the labelled pixels; 0 (not NaN) for a batch with
    none (an all-background crop), so one such batch cannot stop a run as non-finite."""
    valid = (target != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / valid.clamp(min=1)


class UperNetViT(nn.Module):
    """ViT backbone + Feature2Pyramid + UperNet decode head (+ FCN auxiliary head for training).

    ``out_indices``: the blocks whose maps feed the neck, one per level (default: the backbone's
    ``out_indices``)."""

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        channels: int = 768,
        aux_channels: int = 256,
        aux_in_index: int = 2,
        aux_weight: float = 0.4,
        rescales: Sequence[float] = (4, 2, 1, 0.5),
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        taps = out_indices if out_indices is not None else backbone.out_indices
        if taps is None or len(taps) != len(rescales):
            raise ValueError(f"backbone must tap {len(rescales)} blocks (out_indices), got {taps}")
        self.out_indices = backbone.check_indices(taps)
        self.backbone = backbone
        self.num_classes = num_classes
        d = backbone.embed_dim
        self.neck = Feature2Pyramid(d, rescales)
        self.decode_head = UPerHead([d] * len(rescales), channels, num_classes, pool_scales, dropout)
        self.aux_in_index = aux_in_index
        self.aux_weight = aux_weight
        self.auxiliary_head = FCNHead(d, aux_channels, num_classes, 1, dropout) if aux_weight > 0 else None

    @property
    def window(self) -> tuple[int, int]:
        """The input size the relative position tables are built for (the training crop)."""
        return self.backbone.img_size

    def layer_id(self, name: str) -> int:
        """BEiT layer-decay id over the whole model: backbone names by the encoder's rule, neck and
        heads the top id (depth + 1, i.e. lr scale 1)."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone.") :])
        return self.backbone.depth + 1

    def no_weight_decay(self) -> set[str]:
        """The backbone's position table, cls token and relative position bias tables (``backbone.…``);
        norms and biases are 1-D and skipped by ``param_groups`` anyway."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """The neck's pyramid from the maps of the ``out_indices`` blocks."""
        return self.neck(self.backbone.forward_intermediates(img, self.out_indices, intermediates_only=True))

    def forward(self, img: torch.Tensor, target: torch.Tensor | None = None):
        """Without ``target``: logits (B, classes, H, W) at the input size (decode head only).
        With ``target`` (B, H, W): ``(loss, logs)`` for training (through ``forward`` so DDP sees it)."""
        if target is not None:
            return self.forward_train(img, target)
        return resize(self.decode_head(self.features(img)), img.shape[-2:])

    def forward_train(self, img: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts; logits are upsampled to the label size before the loss (mmseg)."""
        feats = self.features(img)
        logits = resize(self.decode_head(feats), target.shape[-2:])
        loss_decode = cross_entropy(logits, target)
        logs = {"loss_decode": loss_decode.detach()}
        loss = loss_decode
        if self.auxiliary_head is not None:
            aux = resize(self.auxiliary_head(feats[self.aux_in_index]), target.shape[-2:])
            loss_aux = cross_entropy(aux, target)
            loss = loss + self.aux_weight * loss_aux
            logs["loss_aux"] = loss_aux.detach()
        with torch.no_grad():  # pixel accuracy of the decode head on labelled pixels
            valid = target != IGNORE_INDEX
            correct = ((logits.argmax(1) == target) & valid).sum()
            logs["pix_acc"] = correct.float() / valid.sum().clamp(min=1)
        return loss, logs


def build_segmentor(
    arch: str = "base",
    num_classes: int = 150,
    crop_size: int | Sequence[int] = 512,
    patch_size: int | None = None,
    drop_path_rate: float = 0.1,
    channels: int = 768,
    aux_channels: int = 256,
    aux_weight: float = 0.4,
    out_indices: Sequence[int] | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    grad_checkpointing: bool = False,
) -> UperNetViT:
    backbone = build_backbone(
        arch, crop_size, patch_size, drop_path_rate, out_indices, embed_dim, depth, num_heads,
        grad_checkpointing=grad_checkpointing,
    )
    return UperNetViT(backbone, num_classes, channels, aux_channels, aux_weight=aux_weight)


def maybe_sync_batchnorm(model: nn.Module, device: torch.device | str = "cuda") -> nn.Module:
    """SyncBatchNorm under torchrun (the per-GPU batch is 2 in the reference recipe), BatchNorm otherwise.
    torch's SyncBatchNorm runs on GPUs only, so a CPU (gloo) run keeps per-process BatchNorm."""
    from maecore import distributed as du

    if du.is_dist() and torch.device(device).type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
