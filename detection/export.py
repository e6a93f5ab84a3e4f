"""A trained ViTDet Mask R-CNN of this toolkit whole, as detectron2's ``GeneralizedRCNN``, and the way back
(``python -m pipeline.convert CKPT -o DST --to detectron2``; the task-independent part is
:mod:`maecore.convert.trained`).

The file is ``{'model': …, 'meta': …}``, or a model-zoo ``.pkl``.  The trunk (``backbone.net.*``) and the simple feature
pyramid (``backbone.simfp_*``) have detectron2's names already; the heads are renamed and re-laid-out:

============================================  ==================================================
ours (torchvision ``MaskRCNN``)               detectron2 (``StandardROIHeads``)
============================================  ==================================================
``rpn.head.conv.{i}.0``                       ``proposal_generator.rpn_head.conv.conv{i}``
``rpn.head.cls_logits`` / ``bbox_pred``       ``…rpn_head.objectness_logits`` / ``anchor_deltas``
``roi_heads.box_head.{i}.0`` / ``.{i}.1``     ``roi_heads.box_head.conv{i+1}`` / ``.conv{i+1}.norm``
``roi_heads.box_head.5`` (after Flatten)      ``roi_heads.box_head.fc1``
``box_predictor.cls_score`` (K+1 rows,        ``box_predictor.cls_score`` (K+1 rows, background
background **first**)                         **last**): rows reordered [1..K, 0]
``box_predictor.bbox_pred`` (4(K+1) rows,     ``box_predictor.bbox_pred`` (4K rows): the background's
background's 4 first)                         4 rows dropped (never used at test time)
``roi_heads.mask_head.{i}.0`` / ``.{i}.1``    ``roi_heads.mask_head.mask_fcn{i+1}`` / ``.norm``
``mask_predictor.conv5_mask``                 ``roi_heads.mask_head.deconv``
``mask_predictor.mask_fcn_logits`` (K+1)      ``roi_heads.mask_head.predictor`` (K): background dropped
============================================  ==================================================

Per class, the box deltas are (dx, dy, dw, dh) with weights (10, 10, 5, 5) in both; RPN anchors are
ordered by aspect ratio (0.5, 1, 2) per location in both.  What the two frameworks *compute* differently,
so that detectron2's detections are close to ours but not equal: (1) torchvision's ``MultiScaleRoIAlign``
samples with ``aligned=False``, detectron2's ViTDet config uses ``ROIAlignV2`` (``aligned=True``, half a
pixel apart) — set ``pooler_type="ROIAlign"`` for the box and mask poolers (the report says so) to match;
(2) torchvision rounds its cell anchors to whole pixels, detectron2 does not (e.g. size 32, ratio 0.5:
45x23 vs 45.25x22.63); (3) masks are pasted into the image differently (torchvision: interpolation of a
1-pixel-padded mask; detectron2: ``grid_sample``), which moves mask borders by up to a pixel;
(4) degenerate boxes are filtered at 1e-3 (proposals) / 1e-2 (detections) pixels in torchvision, at 0 in
detectron2; (5) our test view resizes with ``F.interpolate`` (antialiased when shrinking), detectron2 with
PIL.  The round trip back into our detector gives the same detections (tests).
detectron2 names the pyramid's levels by stride (``p<log2 stride>``): the shipped config's p2-p6 hold for patch
16 only, so for another patch size the level values are recorded too (:func:`pyramid_levels`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from maecore.checkpoint import save_atomic
from maecore.convert.formats import target_format
from maecore.convert.keys import Arch
from maecore.convert.report import ConversionReport
from maecore.convert.trained import TrainedExport, trunk_arch, write_trained
from maecore.errors import UserError

_D2_RENAMES = [
    (re.compile(r"rpn\.head\.conv\.(\d+)\.0\.(weight|bias)"), lambda m: f"proposal_generator.rpn_head.conv.conv{m[1]}.{m[2]}"),
    (re.compile(r"rpn\.head\.cls_logits\.(weight|bias)"), lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}"),
    (re.compile(r"rpn\.head\.bbox_pred\.(weight|bias)"), lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}"),
    (re.compile(r"roi_heads\.box_head\.(\d+)\.0\.weight"), lambda m: f"roi_heads.box_head.conv{int(m[1]) + 1}.weight"),
    (re.compile(r"roi_heads\.box_head\.(\d+)\.1\.(weight|bias)"), lambda m: f"roi_heads.box_head.conv{int(m[1]) + 1}.norm.{m[2]}"),
    (re.compile(r"roi_heads\.mask_head\.(\d+)\.0\.weight"), lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.weight"),
    (re.compile(r"roi_heads\.mask_head\.(\d+)\.1\.(weight|bias)"),
     lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.norm.{m[2]}"),
    (re.compile(r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)"), lambda m: f"roi_heads.mask_head.deconv.{m[1]}"),
]
_BOX_FC = re.compile(r"roi_heads\.box_head\.(\d+)\.(weight|bias)")


def export(state: dict[str, torch.Tensor], args: dict[str, Any]) -> TrainedExport:
    """Our ViTDet Mask R-CNN as detectron2's ``GeneralizedRCNN`` state dict (see the module docstring)."""
    rep = ConversionReport()
    if any(k.startswith(("backbone.fpn", "backbone.fpn1")) for k in state):
        raise UserError("a ViT-FPN detector (--backbone vitfpn) has no detectron2 counterpart; only ViTDet (--backbone vitdet) "
                        "converts to detectron2")
    num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1
    fc_index = sorted({int(m[1]) for k in state if (m := _BOX_FC.fullmatch(k))})
    out: dict[str, torch.Tensor] = {}
    unknown = []
    order = torch.tensor([*range(1, num_classes + 1), 0])
    for k, v in state.items():
        new = None
        if k.startswith(("backbone.net.", "backbone.simfp_")):
            new = k  # detectron2's names already (detection/model.py)
        elif k.startswith("roi_heads.box_predictor.cls_score."):
            new, v = k, v[order]
            if k.endswith("weight"):
                rep.notes.append("roi_heads.box_predictor.cls_score: rows reordered [1..K, 0] (the background is first in "
                                 "torchvision, last in detectron2)")
        elif k.startswith("roi_heads.box_predictor.bbox_pred."):
            new, v = k, v[4:]
            rep.dropped[k + " [rows 0:4]"] = "torchvision's background box deltas (unused at test time; detectron2 has none)"
        elif k.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            new, v = "roi_heads.mask_head.predictor." + k.rsplit(".", 1)[1], v[1:]
            rep.dropped[k + " [channel 0]"] = "torchvision's background mask channel (unused; detectron2 has none)"
        elif m := _BOX_FC.fullmatch(k):
            new = f"roi_heads.box_head.fc{fc_index.index(int(m[1])) + 1}.{m[2]}"
        else:
            for pat, fn in _D2_RENAMES:
                if m := pat.fullmatch(k):
                    new = fn(m)
                    break
        if new is None:
            unknown.append(k)
            continue
        out[new] = v
        if new != k:
            rep.renamed[k] = new
    if unknown:
        raise UserError(f"unknown keys for a ViTDet detector: {', '.join(unknown[:6])}")
    rep.converted = list(out)
    trunk = {k[len("backbone.net."):]: v for k, v in state.items() if k.startswith("backbone.net.")}
    arch = trunk_arch(trunk, args, pos_prefix=1)
    cfg = _lazyconfig(state, args, arch, num_classes)
    cfg.update(pyramid_levels(arch.patch_size, _simfp_stages(state)))
    rep.notes.append("detectron2 LazyConfig (detection/configs/detectron2/) with " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    rep.notes.append("not identical in detectron2 (see detection/export.py): anchors (torchvision rounds them), "
                     "mask pasting, box filtering at 1e-3/1e-2 px, test resize (F.interpolate vs PIL); RoIAlign matches "
                     "only with pooler_type='ROIAlign' (aligned=False), set above")
    meta = {"converter": "tools/convert.py", "task": "detection", "config_overrides": _jsonable(cfg),
            "category_ids": args.get("category_ids"), "category_names": args.get("category_names")}
    # what the file gives back: the checkpoint, with zeros for the background's box deltas and mask channel (dropped)
    back = dict(state)
    for k in ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"):
        back[k] = torch.cat([torch.zeros_like(back[k][:4]), back[k][4:]])
    for k in ("roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias"):
        back[k] = torch.cat([torch.zeros_like(back[k][:1]), back[k][1:]])
    return TrainedExport("detectron2", out, rep, arch, meta=meta, task="detection", source_state=back)


def _lazyconfig(state: dict[str, torch.Tensor], args: dict[str, Any], arch: Arch, num_classes: int) -> dict[str, Any]:
    """The LazyConfig values (``mask_rcnn_vitdet.py`` names) that build the checkpoint's detector."""
    size = int(args.get("input_size") or 1024)
    window = int(args.get("window_size") or 0)
    rel = [int(state[f"backbone.net.blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(arch.depth)]
    grid = size // arch.patch_size
    windowed = [i for i, n in enumerate(rel) if window and n == 2 * window - 1 and window != grid]
    channels = int(state["rpn.head.cls_logits.weight"].shape[1])
    fc = [int(v.shape[0]) for k, v in state.items() if _BOX_FC.fullmatch(k) and k.endswith("weight")]
    anchors = args.get("anchor_sizes") or [32, 64, 128, 256, 512]
    return {
        "model.backbone.net.img_size": size, "model.backbone.net.pretrain_img_size": arch.img_size[0],
        "model.backbone.net.patch_size": arch.patch_size, "model.backbone.net.embed_dim": arch.embed_dim,
        "model.backbone.net.depth": arch.depth, "model.backbone.net.num_heads": arch.num_heads,
        "model.backbone.net.mlp_ratio": arch.mlp_hidden / arch.embed_dim, "model.backbone.net.window_size": window,
        "model.backbone.net.window_block_indexes": windowed, "model.backbone.square_pad": size,
        "model.backbone.out_channels": channels, "model.proposal_generator.head.in_channels": channels,
        "model.proposal_generator.anchor_generator.sizes": [[int(a)] for a in anchors],
        "model.proposal_generator.post_nms_topk": (int(args.get("rpn_post_nms_top_n_train") or 1000),
                                                   int(args.get("rpn_post_nms_top_n_test") or 1000)),
        "model.proposal_generator.pre_nms_topk": (int(args.get("rpn_pre_nms_top_n_train") or 2000),
                                                  int(args.get("rpn_pre_nms_top_n_test") or 1000)),
        "model.roi_heads.num_classes": num_classes,
        "model.roi_heads.box_head.input_shape.channels": channels, "model.roi_heads.box_head.conv_dims": [channels] * 4,
        "model.roi_heads.box_head.fc_dims": fc, "model.roi_heads.box_predictor.input_shape.channels": fc[-1],
        "model.roi_heads.mask_head.input_shape.channels": channels, "model.roi_heads.mask_head.conv_dims": [channels] * 5,
        "model.roi_heads.box_predictor.test_score_thresh": float(args.get("score_thresh", 0.05)),
        "model.roi_heads.box_predictor.test_topk_per_image": int(args.get("detections_per_img") or 100),
        "model.roi_heads.box_pooler.pooler_type": "ROIAlign", "model.roi_heads.mask_pooler.pooler_type": "ROIAlign",
    }


def _simfp_stages(state: dict[str, torch.Tensor]) -> list[int]:
    """The pyramid's stages as its module names give them (``backbone.simfp_3.…`` -> 3), finest first."""
    return sorted({int(m[1]) for k in state if (m := re.match(r"backbone\.simfp_(\d+)\.", k))})


# detectron2's mask_rcnn_vitdet.py (through mask_rcnn_fpn.py) is written for patch 16: levels p2-p5 and p6
D2_LEVELS = ("p2", "p3", "p4", "p5", "p6")


def pyramid_levels(patch_size: int, stages: list[int] | None = None) -> dict[str, Any]:
    """The LazyConfig values that name the pyramid's levels, for a trunk of ``patch_size`` (``{}`` for 16).

    detectron2's ``SimpleFeaturePyramid`` names each level ``p<log2 stride>`` and its top block adds the next
    one, so scales (4, 2, 1, 0.5) give p2-p5 + p6 for patch 16 but p1-p4 + p5 for patch 8 (strides 2-32), while the
    config's top block, RPN, RoI heads and poolers name p2-p6 and strides 4-64.  Ours holds five levels in the same
    order whatever their strides, so the same weights run once these are set.  ``stages``: the checkpoint's
    ``simfp_*`` numbers, which must be the ones detectron2 builds for this patch size."""
    first = patch_size.bit_length() - 3  # log2 of the finest stride, patch / 4
    if patch_size < 4 or patch_size & (patch_size - 1):
        raise UserError(f"patch size {patch_size}: detectron2's pyramid levels need strides that are powers of two "
                        "(patch / 4 ... 2 x patch), so only patch sizes 4, 8, 16, 32, ... convert to detectron2")
    if stages is not None and stages != list(range(first, first + 4)):
        found = ", ".join(f"simfp_{i}" for i in stages)
        raise UserError(f"pyramid modules {found or 'none'} do not match patch size {patch_size} (detectron2 builds "
                        f"simfp_{first} to simfp_{first + 3})")
    levels = [f"p{first + i}" for i in range(5)]
    if tuple(levels) == D2_LEVELS:
        return {}
    strides = [2 ** (first + i) for i in range(5)]
    scales = [1.0 / s for s in strides[:4]]  # exact: powers of two
    return {
        # the top block pools the last of the four levels (an argument of last_level_max_pool in the shipped mask_rcnn_vitdet_b_100ep.py)
        "model.backbone.top_block.in_feature": levels[3],
        "model.proposal_generator.in_features": levels,
        "model.proposal_generator.anchor_generator.strides": strides,
        "model.roi_heads.box_in_features": levels[:4], "model.roi_heads.box_pooler.scales": scales,
        "model.roi_heads.mask_in_features": levels[:4], "model.roi_heads.mask_pooler.scales": scales,
    }


def import_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detectron2 state dict of our detector (as :func:`export` writes it) in our names: the
    background row of ``cls_score`` moves back to the front; the background's box deltas and mask channel, which
    detectron2 does not have and torchvision never uses at test time, start at zero."""
    inverse: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(("backbone.net.", "backbone.simfp_")):
            out[k] = v
            continue
        if k.startswith("roi_heads.box_predictor.cls_score."):
            out[k] = torch.cat([v[-1:], v[:-1]])
            continue
        if k.startswith("roi_heads.box_predictor.bbox_pred."):
            out[k] = torch.cat([v.new_zeros((4, *v.shape[1:])), v])
            continue
        if k.startswith("roi_heads.mask_head.predictor."):
            out["roi_heads.mask_predictor.mask_fcn_logits." + k.rsplit(".", 1)[1]] = torch.cat([v.new_zeros((1, *v.shape[1:])), v])
            continue
        inverse[k] = k
    n_convs = sum(1 for k in state if re.fullmatch(r"roi_heads\.box_head\.conv\d+\.weight", k))
    for k in inverse:
        new = _from_d2_name(k, n_convs)
        if new is None:
            raise UserError(f"unknown keys for a detectron2 ViTDet Mask R-CNN: {k}")
        out[new] = state[k]
    return out


def _from_d2_name(k: str, n_convs: int) -> str | None:
    rules = [
        (r"proposal_generator\.rpn_head\.conv\.conv(\d+)\.(weight|bias)", lambda m: f"rpn.head.conv.{m[1]}.0.{m[2]}"),
        (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", lambda m: f"rpn.head.cls_logits.{m[1]}"),
        (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", lambda m: f"rpn.head.bbox_pred.{m[1]}"),
        (r"roi_heads\.box_head\.conv(\d+)\.weight", lambda m: f"roi_heads.box_head.{int(m[1]) - 1}.0.weight"),
        (r"roi_heads\.box_head\.conv(\d+)\.norm\.(weight|bias)", lambda m: f"roi_heads.box_head.{int(m[1]) - 1}.1.{m[2]}"),
        # torchvision's Sequential: n convs, Flatten, then (Linear, ReLU) per fc: fc1 -> index n + 1
        (r"roi_heads\.box_head\.fc(\d+)\.(weight|bias)", lambda m: f"roi_heads.box_head.{n_convs + 2 * int(m[1]) - 1}.{m[2]}"),
        (r"roi_heads\.mask_head\.mask_fcn(\d+)\.weight", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.weight"),
        (r"roi_heads\.mask_head\.mask_fcn(\d+)\.norm\.(weight|bias)", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.1.{m[2]}"),
        (r"roi_heads\.mask_head\.deconv\.(weight|bias)", lambda m: f"roi_heads.mask_predictor.conv5_mask.{m[1]}"),
    ]
    for pat, fn in rules:
        if m := re.fullmatch(pat, k):
            return fn(m)
    return None


def write(conv: TrainedExport, dst: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write ``conv`` as a detectron2 checkpoint (``.pkl``: the model zoo's pickle; never over a file without
    ``force``), then read it back through :func:`import_state` and compare every tensor with the checkpoint."""
    return write_trained(conv, dst, force, _save, import_state)


def _save(conv: TrainedExport, dst: Path, force: bool) -> list[Path]:
    if dst.suffix == ".pkl":
        return target_format("detectron2").write(conv, None, dst, force)  # the model-zoo pickle (numpy arrays)
    save_atomic({"model": conv.state, "meta": conv.meta}, dst)
    return [dst]


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))
