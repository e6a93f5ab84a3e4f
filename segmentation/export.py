"""A trained segmentor of this toolkit whole, as mmsegmentation's ``EncoderDecoder``, and the way back
(``python -m pipeline.convert CKPT -o DST --to mmseg``; the task-independent part is :mod:`maecore.convert.trained`).

The file is ``{'state_dict': …, 'meta': …}``: the backbone renamed to mmseg's ``MAE`` (``layers.i.ln1``,
``gamma_1``, ``ffn.layers.0.0``…, as ``--to mmseg`` does for a trunk) plus each layer's
``relative_position_index`` buffer (mmseg stores it); ``neck.*``, ``decode_head.*``, ``auxiliary_head.*`` already
carry mmseg's names and are copied as they are.  The shipped config ``segmentation/configs/mmseg/`` loads it with
the recorded overrides (``meta['config_overrides']``, and the report's ``--cfg-options`` words): the sizes of the
checkpoint's model, the blocks it taps (:func:`segmentation.model.default_out_indices` when trained without
``--out_indices``) and every value the config derives from its 512 crop (:func:`mmseg_crop_overrides`, with the
evaluation's own stride and test scale).  Read back into our segmentor (:func:`import_state`): the same logits
(tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from maecore.checkpoint import save_atomic
from maecore.convert.formats.mmseg import _mmseg_key, _to_canonical
from maecore.convert.report import ConversionReport
from maecore.convert.trained import TrainedExport, trunk_arch, write_trained
from maecore.errors import UserError
from maecore.models.layers import relative_position_index
from segmentation.evaluate import default_stride, eval_scale
from segmentation.model import default_out_indices

MMSEG_CONFIG = "segmentation/configs/mmseg/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"


def export(state: dict[str, torch.Tensor], args: dict[str, Any]) -> TrainedExport:
    """Our UperNet as mmsegmentation's ``EncoderDecoder`` state dict (see the module docstring)."""
    rep = ConversionReport()
    trunk = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    arch = trunk_arch(trunk, args)
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
        "model.backbone.out_indices": tuple(args.get("out_indices") or default_out_indices(arch.depth)),
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


def mmseg_crop_overrides(crop: tuple[int, int], args: dict[str, Any]) -> dict[str, Any]:
    """Every value of the shipped mmseg config that follows the crop (512 there), set for ``crop`` = (h, w) and
    the checkpoint's training pipeline, as mmengine's ``merge_from_dict`` / ``--cfg-options`` keys.

    The config's top-level ``crop_size`` is substituted when the file is read, so setting it afterwards changes
    nothing: each copy is named (the model's ``data_preprocessor`` and ``test_cfg``, each dataloader's
    pipeline).  The test view is ours (:mod:`segmentation.evaluate`): resized to fit (4·w, h) keeping the ratio
    (:func:`~segmentation.evaluate.eval_scale`), padded to at least the crop, windows every ``--stride`` (default
    :func:`~segmentation.evaluate.default_stride`, 2/3 of the crop: 341 for 512).  A stride left at 341 for a
    64-px crop would leave pixels that no window covers (mmseg's ``slide_inference`` asserts)."""
    h, w = crop
    stride = tuple(int(s) for s in (2 * [args["stride"]] if args.get("stride") else default_stride((h, w))))
    test_scale = eval_scale((h, w))  # mmcv's (w, h) order; keep_ratio uses only its long and short bounds
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


def import_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmseg ``EncoderDecoder`` state dict of our UperNet (as :func:`export` writes it) in our names: the
    backbone renamed back, the index buffers (rebuilt from the grid) left out."""
    out = {}
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    canon = _to_canonical(backbone, None).state
    out.update({f"backbone.{k}": v for k, v in canon.items()})
    out.update({k: v for k, v in state.items() if k.startswith(("neck.", "decode_head.", "auxiliary_head."))})
    return out


def write(conv: TrainedExport, dst: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write ``conv`` as an mmengine checkpoint (never over a file without ``force``), then read it back through
    :func:`import_state` and compare every tensor with the checkpoint."""
    return write_trained(conv, dst, force, _save, import_state)


def _save(conv: TrainedExport, dst: Path, force: bool) -> list[Path]:
    save_atomic({"state_dict": conv.state, "meta": conv.meta}, dst)  # mmengine's checkpoint layout
    return [dst]
