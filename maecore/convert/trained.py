"""Trained task checkpoints of this toolkit: which task a checkpoint belongs to, and the whole trained model
(not only its trunk) in the formats the other frameworks load.

Told from the keys: a classifier is the encoder with ``head`` (a linear probe's ``head.0`` BatchNorm +
``head.1`` Linear); a detector holds the trunk under ``backbone.net.`` and torchvision's ``rpn.`` /
``roi_heads.``; a segmentor the trunk under ``backbone.`` and mmseg's ``decode_head.``; an MAE its decoder.

Exports (``python -m maecore.convert CKPT -o DST --to …`` on a trained checkpoint; every tensor of the file is
read back and compared with the checkpoint after writing):

* **classification -> timm**: a timm ``VisionTransformer`` state dict with the trained ``head`` (and
  ``fc_norm``), or, when DST is a folder, timm's local model folder (``model.safetensors`` + ``config.json``
  with the architecture, its arguments, the class names and the evaluation preprocessing:
  ``timm.create_model("local-dir:DST", pretrained=True)``).  Pooling follows the checkpoint: average +
  ``fc_norm`` (fine-tuning: ``global_pool='avg'``), average after the final norm (a probe:
  ``global_pool='avg', fc_norm=False``) or the cls token (``global_pool='token'``).  A linear probe's
  ``BatchNorm1d(affine=False)`` + Linear is one affine map at test time and is folded into one ``head``
  (in float64).  Same logits as our classifier (tests).
* **segmentation -> mmseg**: the whole UperNet as mmsegmentation's ``EncoderDecoder`` (``{'state_dict': …,
  'meta': …}``): the backbone renamed to mmseg's ``MAE`` (``layers.i.ln1``, ``gamma_1``, ``ffn.layers.0.0``…,
  as ``--to mmseg`` does for a trunk) plus each layer's ``relative_position_index`` buffer (mmseg stores it);
  ``neck.*``, ``decode_head.*``, ``auxiliary_head.*`` already carry mmseg's names and are copied as they are.
  The shipped config ``segmentation/configs/mmseg/`` loads it with the recorded overrides (``meta
  ['config_overrides']``, and the report's ``--cfg-options`` words): the sizes of the checkpoint's model and
  every value the config derives from its 512 crop (:func:`mmseg_crop_overrides`).  Read back into our
  segmentor: the same logits (tests).
* **detection -> detectron2**: the ViTDet Mask R-CNN as detectron2's ``GeneralizedRCNN``
  (``{'model': …}``, or a model-zoo ``.pkl``).  The trunk (``backbone.net.*``) and the simple feature pyramid
  (``backbone.simfp_*``) have detectron2's names already; the heads are renamed and re-laid-out:

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maecore.checkpoint import checkpoint_args, save_atomic, unwrap_state_dict
from maecore.convert.io import save_safetensors
from maecore.convert.keys import Arch, infer_arch
from maecore.convert.pipeline import Converted
from maecore.convert.report import ConversionReport
from maecore.errors import UserError

TASKS = ("classification", "detection", "segmentation")
TASK_COMMANDS = {t: f"python -m {t}" for t in TASKS}
# the framework each trained task goes to whole (other targets take the trunk, as for any encoder)
EXPORTS = {"classification": "timm", "segmentation": "mmseg", "detection": "detectron2"}


# ---- which task ----------------------------------------------------------------------------------
def _state_keys(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                return _state_keys(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return [k.removeprefix("module.") for k in obj]
    return []


def task_of_keys(keys: Iterable[str]) -> str | None:
    """``classification``, ``detection``, ``segmentation``, ``pretrain`` (an MAE) or ``None`` from state-dict keys."""
    keys = list(keys)
    starts = lambda *p: any(k.startswith(p) for k in keys)  # noqa: E731
    # our own names only: an mmseg UperNet (backbone.layers.*) or a detectron2 detector (proposal_generator.*) is not ours
    if starts("decode_head.") and "backbone.patch_embed.proj.weight" in keys:
        return "segmentation"
    if starts("rpn.head.") and "backbone.net.patch_embed.proj.weight" in keys:
        return "detection"
    if starts("decoder_embed.", "decoder_blocks."):
        return "pretrain"
    if ("head.weight" in keys or "head.1.weight" in keys) and "patch_embed.proj.weight" in keys:
        return "classification"
    return None


def task_of(obj: Any) -> str | None:
    """The task of a checkpoint object (ours, or a bare state dict with our task's keys); see :func:`task_of_keys`."""
    return task_of_keys(_state_keys(obj))


def describe_task(task: str | None) -> str:
    return {
        "classification": "a trained classification checkpoint",
        "detection": "a trained detection checkpoint",
        "segmentation": "a trained segmentation checkpoint",
        "pretrain": "an MAE pretraining checkpoint (fine-tune it first)",
        None: "not a trained task checkpoint of this toolkit",
    }[task]


def trained_route(obj: Any, to: str) -> str | None:
    """The task whose whole trained model ``--to to`` writes (see :data:`EXPORTS`), or ``None`` when the
    conversion is the ordinary encoder one.  A classifier takes this route when it is ours (saved args) or a
    linear probe (whose BatchNorm head no encoder format holds)."""
    task = task_of(obj)
    if task is None or EXPORTS.get(task) != to:
        return None
    if task == "classification" and checkpoint_args(obj) is None and "head.1.weight" not in _state_keys(obj):
        return None  # a plain timm-style classifier: the encoder path already keeps head and fc_norm
    return task


# ---- shared -----------------------------------------------------------------------------------------
@dataclass
class TrainedExport(Converted):
    """A trained task model converted whole: ``source_state`` (our names) is what the written file must give back."""

    task: str = ""
    source_state: dict[str, torch.Tensor] = field(default_factory=dict)


def _heads(args: dict[str, Any], dim: int) -> tuple[int, bool]:
    """The encoder's attention heads from the saved model flags (a state dict does not record them)."""
    from maecore.convert.keys import guess_heads
    from maecore.models import model_kwargs

    try:
        kw = model_kwargs(args.get("model") or args.get("arch") or "base", args.get("patch_size"), args.get("embed_dim"),
                          args.get("depth"), args.get("num_heads"))
    except UserError:
        return guess_heads(dim), True
    return (kw["num_heads"], False) if kw["embed_dim"] == dim else (guess_heads(dim), True)


def _arch(trunk: dict[str, torch.Tensor], args: dict[str, Any], **hints: Any) -> Arch:
    dim = int(trunk["patch_embed.proj.weight"].shape[0])
    heads, guessed = _heads(args, dim)
    arch = infer_arch(trunk, {"num_heads": heads, **hints})
    arch.heads_guessed = guessed
    return arch


# ---- classification -> timm -------------------------------------------------------------------------
TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def _fold_probe_head(state: dict[str, torch.Tensor], rep: ConversionReport) -> dict[str, torch.Tensor]:
    """A linear probe's ``head.0`` (BatchNorm1d, affine=False, eps 1e-6) + ``head.1`` (Linear) as one Linear."""
    out = {k: v for k, v in state.items() if not k.startswith("head.")}
    mean, var = state["head.0.running_mean"].double(), state["head.0.running_var"].double()
    w, b = state["head.1.weight"].double(), state["head.1.bias"].double()
    inv = 1.0 / torch.sqrt(var + 1e-6)  # classification.model.setup_linear_probe's BatchNorm1d eps
    out["head.weight"] = (w * inv[None, :]).to(state["head.1.weight"].dtype)
    out["head.bias"] = (b - (w * (mean * inv)[None, :]).sum(1)).to(state["head.1.bias"].dtype)
    rep.renamed.update({"head.1.weight": "head.weight", "head.1.bias": "head.bias"})
    for k in ("head.0.running_mean", "head.0.running_var"):
        rep.dropped[k] = "the probe's BatchNorm statistics, folded into head"
    if "head.0.num_batches_tracked" in state:
        rep.dropped["head.0.num_batches_tracked"] = "BatchNorm step counter (no role at test time)"
    rep.notes.append("the probe's BatchNorm1d(affine=False) + Linear folded into one head (float64, exact up to rounding)")
    return out


def classification_to_timm(state: dict[str, torch.Tensor], args: dict[str, Any]) -> TrainedExport:
    """Our classifier (fine-tuned, partially fine-tuned or probed) as a timm ``VisionTransformer`` state dict,
    and the timm arguments that build it (``conv.config``)."""
    rep = ConversionReport()
    src = dict(state)
    if "head.1.weight" in src:
        src = _fold_probe_head(src, rep)
    bad = [k for k in src if "rel_pos" in k or "relative_position" in k]
    if bad:
        raise UserError(f"timm's VisionTransformer has no relative position: {', '.join(bad[:3])}")
    arch = _arch(src, args)
    if "fc_norm.weight" in src:
        pool, fc_norm = "avg", None
    elif args.get("global_pool"):  # averaged after the final norm (a probe): timm avg without fc_norm
        pool, fc_norm = "avg", False
    else:
        pool, fc_norm = "token", None
    num_classes = int(src["head.weight"].shape[0])
    model_args: dict[str, Any] = {
        "img_size": arch.img_size[0] if arch.img_size[0] == arch.img_size[1] else list(arch.img_size),
        "patch_size": arch.patch_size, "embed_dim": arch.embed_dim, "depth": arch.depth, "num_heads": arch.num_heads,
        "mlp_ratio": arch.mlp_hidden / arch.embed_dim, "class_token": True, "global_pool": pool,
    }
    if fc_norm is False:
        model_args["fc_norm"] = False
    if any(k.endswith(".gamma") for k in src):
        model_args["init_values"] = 1.0  # layer scale present (its trained values are in the file)
    out = dict(src)  # timm's names are the canonical ones (ours)
    rep.converted = list(out)
    size = TIMM_SIZES.get(arch.embed_dim, "base")
    architecture = f"vit_{size}_patch{arch.patch_size}_224"
    try:
        import timm

        if not timm.is_model(architecture):
            architecture = f"vit_{size}_patch16_224" if timm.is_model(f"vit_{size}_patch16_224") else "vit_base_patch16_224"
    except ImportError:
        pass
    shown = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    rep.notes.append(f"timm: VisionTransformer({shown}, num_classes={num_classes}) "
                     f"= timm.create_model({architecture!r}, num_classes={num_classes}, <the same arguments>)")
    classes = [str(c) for c in (args.get("classes") or [])][:num_classes]
    input_size = arch.img_size
    crop_pct = args.get("crop_pct") or (224 / 256 if max(input_size) <= 224 else 1.0)  # classification.data's rule
    config = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": arch.embed_dim,
        "global_pool": pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, *input_size], "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": crop_pct,
            "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": num_classes,
            "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }
    if len(classes) == num_classes:
        config["label_names"] = classes
    return TrainedExport("timm", out, rep, arch, meta={"source_pool": pool}, config=config, task="classification",
                         source_state=src)


def _write_timm(conv: TrainedExport, dst: Path, force: bool) -> list[Path]:
    if dst.suffix == ".safetensors":
        save_safetensors(conv.state, dst, {"format": "pt"})
        return [dst]
    if dst.suffix:
        save_atomic(conv.state, dst)  # a bare state dict, as timm's own weight files
        return [dst]
    # no suffix: timm's local model folder
    files = [dst / "model.safetensors", dst / "config.json"]
    if any(f.exists() for f in files) and not force:
        raise UserError(f"{dst} already holds a model (use --force to overwrite)")
    dst.mkdir(parents=True, exist_ok=True)
    save_safetensors(conv.state, files[0], {"format": "pt"})
    tmp = files[1].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(conv.config, indent=2))
    os.replace(tmp, files[1])
    return files


# ---- segmentation -> mmseg ---------------------------------------------------------------------------
def segmentation_to_mmseg(state: dict[str, torch.Tensor], args: dict[str, Any]) -> TrainedExport:
    """Our UperNet as mmsegmentation's ``EncoderDecoder`` state dict (see the module docstring)."""
    from maecore.convert.formats.mmseg import _mmseg_key
    from maecore.models.layers import relative_position_index

    rep = ConversionReport()
    trunk = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    arch = _arch(trunk, args)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state.items():
        if k.startswith("backbone."):
            new = "backbone." + _mmseg_key(k[len("backbone."):])
        elif k.startswith(("neck.", "decode_head.", "auxiliary_head.")):
            new = k  # mmseg's own module names (segmentation/model.py)
        else:
            unknown.append(k)
            continue
        out[new] = v
        if new != k:
            rep.renamed[k] = new
    if unknown:
        raise UserError(f"unknown keys for a segmentation checkpoint: {', '.join(unknown[:6])}")
    index = relative_position_index(arch.grid)
    for i in range(arch.depth):
        if f"backbone.layers.{i}.attn.relative_position_bias_table" in out:
            k = f"backbone.layers.{i}.attn.relative_position_index"
            out[k] = index.clone()
            rep.added[k] = "relative position index buffer (mmseg saves it; the same BEiT layout as ours)"
    rep.converted = list(out)
    num_classes = int(state["decode_head.conv_seg.weight"].shape[0])
    h, w = arch.img_size
    cfg = {
        "model.backbone.img_size": (h, w), "model.backbone.patch_size": arch.patch_size,
        "model.backbone.embed_dims": arch.embed_dim, "model.backbone.num_layers": arch.depth,
        "model.backbone.num_heads": arch.num_heads, "model.backbone.mlp_ratio": arch.mlp_hidden // arch.embed_dim,
        "model.backbone.out_indices": tuple(args.get("out_indices") or _default_out_indices(arch.depth)),
        "model.neck.embed_dim": arch.embed_dim, "model.decode_head.in_channels": [arch.embed_dim] * 4,
        "model.decode_head.channels": int(state["decode_head.conv_seg.weight"].shape[1]),
        "model.decode_head.num_classes": num_classes,
    }
    if "auxiliary_head.conv_seg.weight" in state:
        cfg.update({"model.auxiliary_head.in_channels": arch.embed_dim,
                    "model.auxiliary_head.channels": int(state["auxiliary_head.conv_seg.weight"].shape[1]),
                    "model.auxiliary_head.num_classes": num_classes})
    else:
        cfg["model.auxiliary_head"] = None
        rep.notes.append("trained without the auxiliary FCN head (--aux_weight 0): set auxiliary_head=None")
    cfg.update(mmseg_crop_overrides((h, w), args))
    rep.notes.append(f"{MMSEG_CONFIG} with --cfg-options " + " ".join(cfg_options(cfg)))
    # tuples stay tuples (mmcv's Resize and RandomResize reject lists): cfg.merge_from_dict(meta["config_overrides"])
    meta: dict[str, Any] = {"converter": "tools/convert.py", "task": "segmentation", "config_overrides": cfg}
    if num_classes != 150:  # else mmseg's ADE20K names and palette apply
        meta["dataset_meta"] = {"classes": [str(i) for i in range(num_classes)]}
    return TrainedExport("mmseg", out, rep, arch, meta=meta, task="segmentation", source_state=dict(state))


def _default_out_indices(depth: int) -> tuple[int, ...]:
    """The blocks a segmentor trained without ``--out_indices`` taps: the rule of
    ``segmentation.model.default_out_indices`` (which ``maecore`` cannot import; a test keeps the two equal)."""
    idx = [max(0, round(k * depth / 12) - 1) for k in (4, 6, 8)] + [depth - 1]
    for i in range(1, 4):
        idx[i] = min(max(idx[i], idx[i - 1] + 1), depth - 1)
    return tuple(idx)


MMSEG_CONFIG = "segmentation/configs/mmseg/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"


def mmseg_crop_overrides(crop: tuple[int, int], args: dict[str, Any]) -> dict[str, Any]:
    """Every value of the shipped mmseg config that follows the crop (512 there), set for ``crop`` = (h, w) and
    the checkpoint's training pipeline, as mmengine's ``merge_from_dict`` / ``--cfg-options`` keys.

    The config's top-level ``crop_size`` is substituted when the file is read, so setting it afterwards changes
    nothing: each copy is named (the model's ``data_preprocessor`` and ``test_cfg``, each dataloader's
    pipeline).  The test view is ours (``segmentation.evaluate``): resized to fit (4·w, h) keeping the ratio,
    padded to at least the crop, windows every ``--stride`` (default 2/3 of the crop: 341 for 512).  A stride
    left at 341 for a 64-px crop would leave pixels that no window covers (mmseg's ``slide_inference`` asserts)."""
    h, w = crop
    stride = tuple(int(s) for s in (2 * [args["stride"]] if args.get("stride") else (h * 2 // 3, w * 2 // 3)))
    test_scale = (4 * w, h)  # mmcv's (w, h) order; keep_ratio uses only its long and short bounds
    out: dict[str, Any] = {
        "crop_size": (h, w),
        "model.data_preprocessor.size": (h, w),  # training batches padded to the crop
        "model.data_preprocessor.test_cfg.size": (h, w),  # test images padded to at least the crop
        "model.test_cfg.crop_size": (h, w),
        "model.test_cfg.stride": stride,
        # train_pipeline: LoadImageFromFile, LoadAnnotations, RandomResize, RandomCrop, RandomFlip, ...
        "train_dataloader.dataset.pipeline.2.scale": tuple(int(v) for v in args.get("scale") or test_scale),
        "train_dataloader.dataset.pipeline.3.crop_size": (h, w),
    }
    if args.get("ratio_range"):
        out["train_dataloader.dataset.pipeline.2.ratio_range"] = tuple(float(v) for v in args["ratio_range"])
    if args.get("cat_max_ratio"):
        out["train_dataloader.dataset.pipeline.3.cat_max_ratio"] = float(args["cat_max_ratio"])
    for loader in ("val_dataloader", "test_dataloader"):  # test_pipeline: LoadImageFromFile, Resize, ...
        out[f"{loader}.dataset.pipeline.1.scale"] = test_scale
    return out


def cfg_options(overrides: dict[str, Any]) -> list[str]:
    """``key=value`` words that mmengine's ``--cfg-options`` (``DictAction``) parses back to the same values."""
    def literal(v: Any) -> str:
        if isinstance(v, tuple):
            return "(" + ",".join(literal(x) for x in v) + ("," if len(v) == 1 else "") + ")"
        if isinstance(v, list):
            return "[" + ",".join(literal(x) for x in v) + "]"
        return str(v)

    return [f"{k}={literal(v)}" for k, v in overrides.items()]


def _write_mmseg(conv: TrainedExport, dst: Path, force: bool) -> list[Path]:
    save_atomic({"state_dict": conv.state, "meta": conv.meta}, dst)  # mmengine's checkpoint layout
    return [dst]


def mmseg_to_segmentation(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmseg ``EncoderDecoder`` state dict of our UperNet (as :func:`segmentation_to_mmseg` writes it) in our
    names: the backbone renamed back, the index buffers (rebuilt from the grid) left out."""
    from maecore.convert.formats.mmseg import _to_canonical

    out = {}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    canon = _to_canonical(backbone, None).state
    out.update({f"backbone.{k}": v for k, v in canon.items()})
    out.update({k: v for k, v in state.items() if k.startswith(("neck.", "decode_head.", "auxiliary_head."))})
    return out


# ---- detection -> detectron2 ---------------------------------------------------------------------------
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


def detection_to_detectron2(state: dict[str, torch.Tensor], args: dict[str, Any]) -> TrainedExport:
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
    arch = _arch(trunk, args, pos_prefix=1)
    cfg = _lazyconfig(state, args, arch, num_classes)
    cfg.update(pyramid_levels(arch.patch_size, _simfp_stages(state)))
    rep.notes.append("detectron2 LazyConfig (detection/configs/detectron2/) with " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    rep.notes.append("not identical in detectron2 (see maecore/convert/trained.py): anchors (torchvision rounds them), "
                     "mask pasting, box filtering at 1e-3/1e-2 px, test resize (F.interpolate vs PIL); RoIAlign matches "
                     "only with pooler_type='ROIAlign' (aligned=False), set above")
    meta = {"converter": "tools/convert.py", "task": "detection", "config_overrides": _jsonable(cfg),
            "category_ids": args.get("category_ids"), "category_names": args.get("category_names")}
    return TrainedExport("detectron2", out, rep, arch, meta=meta, task="detection", source_state=dict(state))


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


def detectron2_to_detection(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detectron2 state dict of our detector (as :func:`detection_to_detectron2` writes it) in our names: the
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


def _write_detectron2(conv: TrainedExport, dst: Path, force: bool) -> list[Path]:
    if dst.suffix == ".pkl":
        from maecore.convert.formats import target_format

        return target_format("detectron2").write(conv, None, dst, force)  # the model-zoo pickle (numpy arrays)
    save_atomic({"model": conv.state, "meta": conv.meta}, dst)
    return [dst]


# ---- the route ----------------------------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def convert_trained(obj: Any, task: str) -> TrainedExport:
    """The whole trained ``task`` model of checkpoint ``obj`` in the format :data:`EXPORTS` names for it."""
    state = unwrap_state_dict(obj)
    args = checkpoint_args(obj) or {}
    if task == "classification":
        return classification_to_timm(state, args)
    if task == "segmentation":
        return segmentation_to_mmseg(state, args)
    if task == "detection":
        return detection_to_detectron2(state, args)
    raise UserError(f"no whole-model export for {task}")


def write_trained(conv: TrainedExport, dst: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write ``conv`` to ``dst`` (never over a file without ``force``), then read it back and check that every
    tensor gives the checkpoint's own (see :func:`read_back`)."""
    dst = Path(dst)
    directory = conv.target == "timm" and not dst.suffix
    if not directory:
        if dst.is_dir():
            raise UserError(f"{dst} is a directory; give a file name")
        if dst.exists() and not force:
            raise UserError(f"{dst} exists (use --force to overwrite)")
    elif dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a folder (a timm model folder was asked for: no file suffix)")
    writer = {"timm": _write_timm, "mmseg": _write_mmseg, "detectron2": _write_detectron2}[conv.target]
    written = writer(conv, dst, force)
    n = read_back(conv, written[0])
    conv.report.notes.append(f"read back: all {n} tensors of {written[0].name} give the checkpoint's own, bit for bit")
    return written


def read_back(conv: TrainedExport, path: Path) -> int:
    """Load a written export, map it back to our names and compare with the source, tensor by tensor."""
    from maecore.convert.io import _load_path

    obj = _load_path(path)
    state = unwrap_state_dict(obj)
    if conv.target == "mmseg":
        back, expect = mmseg_to_segmentation(state), conv.source_state
    elif conv.target == "detectron2":
        back = detectron2_to_detection(state)
        expect = dict(conv.source_state)
        for k in ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"):
            expect[k] = torch.cat([torch.zeros_like(expect[k][:4]), expect[k][4:]])
        for k in ("roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias"):
            expect[k] = torch.cat([torch.zeros_like(expect[k][:1]), expect[k][1:]])
    else:
        back, expect = state, conv.state
    missing = sorted(set(expect) - set(back))
    extra = sorted(set(back) - set(expect))
    differ = [k for k in expect if k in back and not torch.equal(back[k].cpu(), expect[k].cpu())]
    if missing or extra or differ:
        raise UserError(f"{path}: read back differs from the checkpoint (missing {missing[:3]}, extra {extra[:3]}, "
                        f"changed {differ[:3]})")
    return len(back)
