"""Mask R-CNN with a plain ViT backbone: ViTDet (Li et al. 2022) and ViT-FPN (MAE paper App. A.3).

``backbone.net``   the shared :class:`maecore.models.vit.VisionTransformer`: no cls token, no final norm,
                   window attention in all blocks but a few global ones, decomposed relative position
                   (zero-init), the pretraining position table (with its cls slot) resampled at run time;
``backbone.simfp_2..5`` (ViTDet) the simple feature pyramid of detectron2's ``SimpleFeaturePyramid``
                   (same module names and layer order, LayerNorm over channels), p6 by max-pool;
``backbone.fpn1..4`` + ``backbone.fpn`` (ViT-FPN) four taps turned into strides 4/8/16/32, then an FPN;
the rest       torchvision's :class:`~torchvision.models.detection.MaskRCNN` (2-conv RPN, 4conv1fc box
               head and 4-conv mask head with LayerNorm, RoIAlign, NMS).

The trunk's names are detectron2's ViT names under ``backbone.net.`` (``backbone.net.blocks.3.attn.rel_pos_h``),
so weights move between the two by renaming the heads only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from maecore.models import VisionTransformer, model_kwargs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LEVELS = ("p2", "p3", "p4", "p5", "p6")


def default_global_blocks(depth: int) -> tuple[int, ...]:
    """Blocks with global attention: the last of each quarter, i.e. ViTDet's {2,5,8,11} (B),
    {5,11,17,23} (L) and {7,15,23,31} (H)."""
    q = max(depth // 4, 1)
    return tuple(sorted({min(q * (k + 1) - 1, depth - 1) for k in range(4)}))


def fpn_taps(depth: int) -> tuple[int, ...]:
    """ViT-FPN taps: after blocks d/4, d/2, 3d/4 and d (0-based indices)."""
    return tuple(sorted({max(round(depth * k / 4) - 1, 0) for k in (1, 2, 3, 4)}))


def build_trunk(
    arch: str = "base",
    image_size: int = 1024,
    pretrain_img_size: int = 224,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    window_size: int = 14,
    global_blocks: Sequence[int] | None = None,
    drop_path_rate: float = 0.1,
    out_indices: Sequence[int] | None = None,
    grad_checkpointing: bool = False,
) -> VisionTransformer:
    """The shared encoder set up as ViTDet's trunk.

    The absolute position table stays at the pretraining grid with its cls slot (so MAE weights load
    unchanged) and is resampled bicubically to the input grid at run time; the global blocks'
    ``rel_pos_h/w`` are sized for the detection input grid, the windowed ones for the window."""
    kw = model_kwargs(arch, patch_size, embed_dim, depth, num_heads)  # any registry name or size (maecore.models)
    d, dep, heads, p = kw["embed_dim"], kw["depth"], kw["num_heads"], kw["patch_size"]
    if image_size % p:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {p}")
    glob = set(default_global_blocks(dep) if global_blocks is None else global_blocks)
    if any(not 0 <= i < dep for i in glob):
        raise ValueError(f"global blocks {sorted(glob)} out of range for depth {dep}")
    windowed = [i for i in range(dep) if i not in glob] if window_size else []
    return VisionTransformer(
        img_size=pretrain_img_size,
        patch_size=p,
        embed_dim=d,
        depth=dep,
        num_heads=heads,
        class_token=False,
        pos_embed="learned",
        pos_embed_cls_slot=True,
        final_norm=False,
        drop_path_rate=drop_path_rate,
        window_size=window_size,
        window_block_indexes=windowed,
        rel_pos="decomposed",
        rel_pos_grid=image_size // p,
        out_indices=tuple(out_indices) if out_indices is not None else (dep - 1,),
        grad_checkpointing=grad_checkpointing,
    )


class Conv2dNorm(nn.Conv2d):
    """A conv followed by its norm, stored as ``.norm`` (detectron2's ``Conv2d(norm=...)`` layout)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, norm: nn.Module, padding: int = 0) -> None:
        super().__init__(cin, cout, kernel_size, padding=padding, bias=False)
        self.norm = norm
        # detectron2's c2_xavier_fill: kaiming-uniform(a=1), zero bias
        nn.init.kaiming_uniform_(self.weight, a=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from the last stride-``p`` map: ×4 (ConvT, LN, GELU, ConvT), ×2 (ConvT), ×1,
    ×0.5 (max-pool), each then 1×1 conv + LN and 3×3 conv + LN; p6 = max-pool(p5, 1, stride 2).

    Modules are ``simfp_{log2 stride}`` as in detectron2 (for patch 16: ``simfp_2`` … ``simfp_5``).
    ``in_index`` is the block that feeds the pyramid (default: the trunk's last ``out_indices`` block,
    else its last block — ViTDet's ``last_feat``)."""

    def __init__(self, net: VisionTransformer, out_channels: int = 256, scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 in_index: int | None = None) -> None:
        super().__init__()
        self.net = net
        if in_index is None:
            in_index = net.out_indices[-1] if net.out_indices else net.depth - 1
        self.in_index = net.check_indices((in_index,))[0]
        dim = net.embed_dim
        self.out_channels = out_channels
        self.stage_names: list[str] = []
        self.strides: list[int] = []
        for scale in scale_factors:
            if scale == 4.0:
                layers: list[nn.Module] = [
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                ]
                cin = dim // 4
            elif scale == 2.0:
                layers, cin = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, cin = [], dim
            elif scale == 0.5:
                layers, cin = [nn.MaxPool2d(2, 2)], dim
            else:
                raise ValueError(f"unsupported pyramid scale {scale}")
            layers += [
                Conv2dNorm(cin, out_channels, 1, LayerNorm2d(out_channels)),
                Conv2dNorm(out_channels, out_channels, 3, LayerNorm2d(out_channels), padding=1),
            ]
            stride = int(net.patch_size / scale)
            name = f"simfp_{stride.bit_length() - 1}"
            self.add_module(name, nn.Sequential(*layers))
            self.stage_names.append(name)
            self.strides.append(stride)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        top = self.net.forward_intermediates(x, (self.in_index,), intermediates_only=True)[0]
        feats = [getattr(self, n)(top) for n in self.stage_names]
        feats.append(F.max_pool2d(feats[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(LEVELS, feats))


class ViTFPN(nn.Module):
    """The MAE paper's ViT-FPN (after Li et al. 2021): maps after blocks d/4, d/2, 3d/4, d become
    strides p/4, p/2, p, 2p by (ConvT, LN, GELU, ConvT) / ConvT / identity / max-pool (``fpn1..4``,
    the BEiT / MAE detection names), then a standard FPN with p6 by max-pool.  ``out_indices``: the 4
    tapped blocks (default: the trunk's ``out_indices``)."""

    def __init__(self, net: VisionTransformer, out_channels: int = 256, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        taps = out_indices if out_indices is not None else net.out_indices
        if taps is None or len(taps) != 4:
            raise ValueError("ViT-FPN needs a trunk with 4 out_indices")
        self.out_indices = net.check_indices(taps)
        self.net = net
        dim = net.embed_dim
        self.out_channels = out_channels
        # LayerNorm rather than BEiT's SyncBN: independent of the (small) per-GPU detection batch
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2), LayerNorm2d(dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, stride=2)
        )
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)
        self.fpn = FeaturePyramidNetwork([dim] * 4, out_channels, extra_blocks=LastLevelMaxPool())
        self.strides = [net.patch_size // 4, net.patch_size // 2, net.patch_size, net.patch_size * 2]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.net.forward_intermediates(x, self.out_indices, intermediates_only=True)
        ops = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        out = self.fpn(OrderedDict((LEVELS[i], op(m)) for i, (op, m) in enumerate(zip(ops, maps))))
        return OrderedDict(zip(LEVELS, out.values()))


class ViTMaskRCNN(MaskRCNN):
    """torchvision's :class:`~torchvision.models.detection.MaskRCNN` whose backbone holds the ViT trunk as
    ``backbone.net``; it knows which of its parameters AdamW must not decay."""

    def no_weight_decay(self) -> set[str]:
        """The trunk's position table and ``rel_pos_h/w`` tables, as full names (``backbone.net.…``): with the
        1-D parameters (norms, biases), what ``--wd_rule uniform`` exempts.  ViTDet's own rule is
        :meth:`vitdet_no_weight_decay`."""
        return {f"backbone.net.{n}" for n in self.backbone.net.no_weight_decay()}

    def vitdet_no_weight_decay(self) -> set[str]:
        """What detectron2's ViTDet B/L optimizer exempts: ``get_default_optimizer_params`` with
        ``weight_decay_norm=0.0`` (``configs/common/optim.py``) and ``overrides={"pos_embed": {"weight_decay": 0.0}}``
        (``mask_rcnn_vitdet_b_100ep.py``) gives no weight decay to the position table and to the parameters of
        ``torch.nn`` norm modules, which in ViTDet are only the trunk's ``nn.LayerNorm``s (the pyramid and the heads
        use detectron2's own ``LayerNorm``, not a torch norm type).  Biases, ``rel_pos_h/w`` and everything else
        decay.  Full names; every other parameter, 1-D or not, decays (``param_groups(..., decay_1d=True)``)."""
        net = self.backbone.net
        names = {f"backbone.net.{n}" for n, _ in net.named_parameters() if n.rsplit(".", 1)[-1] == "pos_embed"}
        for mod_name, mod in net.named_modules():
            if isinstance(mod, nn.LayerNorm):
                names |= {f"backbone.net.{mod_name}.{n}" for n, _ in mod.named_parameters(recurse=False)}
        return names


class PaddedInputTransform(GeneralizedRCNNTransform):
    """torchvision's normalise-and-batch step *without* its resize: LSJ already produced fixed-size,
    padded images, and resizing again would change the recipe (and cost time)."""

    def resize(self, image: torch.Tensor, target: dict | None = None):  # noqa: D102
        return image, target


def build_detector(
    num_classes: int,
    backbone: str = "vitdet",
    arch: str = "base",
    image_size: int = 1024,
    pretrain_img_size: int = 224,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    window_size: int = 14,
    global_blocks: Sequence[int] | None = None,
    drop_path_rate: float = 0.1,
    out_channels: int = 256,
    fc_dim: int = 1024,
    grad_checkpointing: bool = False,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    rpn_batch_size_per_image: int = 256,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 1000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
    box_score_thresh: float = 0.05,
    detections_per_img: int = 100,
) -> ViTMaskRCNN:
    """Mask R-CNN with a ViTDet (``backbone="vitdet"``) or ViT-FPN (``"vitfpn"``) backbone.

    ``num_classes`` counts the object classes (background is added).  Heads follow ViTDet:
    2-conv RPN, 4conv1fc box head and 4-conv mask head, LayerNorm after every head conv; the head convs
    are ``out_channels`` wide and its fc ``fc_dim`` (256 and 1024 in every recipe but ``demo``)."""
    dep = model_kwargs(arch, depth=depth)["depth"]
    taps = fpn_taps(dep) if backbone == "vitfpn" else None
    net = build_trunk(arch, image_size, pretrain_img_size, patch_size, embed_dim, depth, num_heads, window_size,
                      global_blocks, drop_path_rate, taps, grad_checkpointing)
    if backbone == "vitdet":
        body: nn.Module = SimpleFeaturePyramid(net, out_channels)
    elif backbone == "vitfpn":
        if len(set(taps)) != 4:  # type: ignore[arg-type]
            raise ValueError(f"ViT-FPN needs depth >= 4 (got {dep})")
        body = ViTFPN(net, out_channels)
    else:
        raise ValueError(f"unknown backbone {backbone!r}: use vitdet or vitfpn")
    if len(anchor_sizes) != len(LEVELS):
        raise ValueError(f"need {len(LEVELS)} anchor sizes (one per level p2-p6), got {len(anchor_sizes)}")

    norm: Callable[[int], nn.Module] = LayerNorm2d
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(LEVELS))
    model = ViTMaskRCNN(
        body,
        num_classes=None,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(out_channels, 3, conv_depth=2),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(list(LEVELS[:4]), output_size=7, sampling_ratio=0),
        box_head=FastRCNNConvFCHead((out_channels, 7, 7), [out_channels] * 4, [fc_dim], norm_layer=norm),
        box_predictor=FastRCNNPredictor(fc_dim, num_classes + 1),
        box_batch_size_per_image=box_batch_size_per_image,
        box_score_thresh=box_score_thresh,
        box_detections_per_img=detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(list(LEVELS[:4]), output_size=14, sampling_ratio=0),
        mask_head=MaskRCNNHeads(out_channels, [out_channels] * 4, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(out_channels, out_channels, num_classes + 1),
    )
    # fixed-size LSJ inputs: no second resize; pad batches to the largest stride
    model.transform = PaddedInputTransform(image_size, image_size, list(IMAGENET_MEAN), list(IMAGENET_STD),
                                           size_divisible=max(32, 2 * net.patch_size))
    return model


def layer_id_fn(model: MaskRCNN) -> Callable[[str], int]:
    """ViTDet's layer-decay rule: pos-embed and patch embed are layer 0, block i is layer i+1, and
    everything outside the trunk (pyramid, RPN, heads) is layer depth+1 (full lr).
    Use with ``param_groups(..., num_layers=depth + 1)``."""
    net: VisionTransformer = model.backbone.net
    prefix = "backbone.net."

    def layer_id(name: str) -> int:
        if name.startswith(prefix):
            return net.layer_id(name[len(prefix):])
        return net.depth + 1

    return layer_id


__all__ = [
    "PaddedInputTransform",
    "SimpleFeaturePyramid",
    "ViTFPN",
    "ViTMaskRCNN",
    "build_detector",
    "build_trunk",
    "default_global_blocks",
    "fpn_taps",
    "layer_id_fn",
]
