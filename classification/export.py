"""A trained classifier of this toolkit whole, as timm's ``VisionTransformer`` (``python -m pipeline.convert CKPT -o DST
--to timm``; the task-independent part is :mod:`maecore.convert.trained`).

The file is a timm state dict with the trained ``head`` (and ``fc_norm``), or, when DST is a folder, timm's local
model folder (``model.safetensors`` + ``config.json`` with the architecture, its arguments, the class names and the
evaluation preprocessing: ``timm.create_model("local-dir:DST", pretrained=True)``).  Pooling follows the
checkpoint: average + ``fc_norm`` (fine-tuning: ``global_pool='avg'``), average after the final norm (a probe:
``global_pool='avg', fc_norm=False``) or the cls token (``global_pool='token'``).  A linear probe's
``BatchNorm1d(affine=False)`` + Linear is one affine map at test time and is folded into one ``head`` (in
float64).  Same logits as our classifier (tests).  timm's names are ours, so there is no way back to write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from classification.data import default_crop_pct
from maecore.checkpoint import save_atomic
from maecore.convert.report import ConversionReport
from maecore.convert.trained import TrainedExport, trunk_arch, write_trained
from maecore.convert.writers import save_safetensors
from maecore.errors import UserError

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


def export(state: dict[str, torch.Tensor], args: dict[str, Any]) -> TrainedExport:
    """Our classifier (fine-tuned, partially fine-tuned or probed) as a timm ``VisionTransformer`` state dict,
    and the timm arguments that build it (``conv.config``)."""
    rep = ConversionReport()
    src = dict(state)
    if "head.1.weight" in src:
        src = _fold_probe_head(src, rep)
    bad = [k for k in src if "rel_pos" in k or "relative_position" in k]
    if bad:
        raise UserError(f"timm's VisionTransformer has no relative position: {', '.join(bad[:3])}")
    arch = trunk_arch(src, args)
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
    crop_pct = args.get("crop_pct") or default_crop_pct(input_size)  # the evaluation's centre crop
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


def write(conv: TrainedExport, dst: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write ``conv`` to ``dst``: a timm state dict (``.pth`` …, ``.safetensors``) or, with no suffix, timm's local
    model folder; never over a file or a model without ``force``; every tensor is read back and compared."""
    dst = Path(dst)
    folder = not dst.suffix
    if folder and dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a folder (a timm model folder was asked for: no file suffix)")
    return write_trained(conv, dst, force, _save, folder=folder)


def _save(conv: TrainedExport, dst: Path, force: bool) -> list[Path]:
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
