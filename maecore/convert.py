"""Carry pretrained weights into any encoder built from :class:`maecore.vit.VisionTransformer`, and
between the formats other frameworks load.

``load_backbone(model, src)`` is what every task calls: it reads an MAE checkpoint (ours, an official
release, timm, HF ViTMAE, a detectron2 / mmseg file, or a trunk file written by ``tools/convert.py``),
keeps the encoder, drops what the target has no use for (decoder, mask tokens, cls token, final norm,
classifier), leaves the target's new parts at their neutral init (relative position zero, layer scale
1), resamples ``pos_embed`` to the target grid, and refuses unknown keys and shape mismatches by name.

Everything goes through one *canonical* naming, the official MAE / timm one (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``, ``fc_norm``, ``head``, ``decoder_*``, ``mask_token``): readers map a source into it
(:func:`load_source`), :func:`convert` maps it into a target format, :func:`write_converted` writes
the file.  ``tools/convert.py`` is the command line on top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from maecore.checkpoint import load_file, save_atomic, unwrap_state_dict
from maecore.errors import UserError
from maecore.vit import ARCHS, VisionTransformer, adapt_pos_embed, resample_pos_embed

TRUNK_FORMAT = "maecore-trunk"
TASKS = ("classification", "detection", "segmentation")
TARGETS = ("official", "timm", "hf", "safetensors", "detectron2", "mmdet", "mmseg", *TASKS)
SOURCES = ("auto", "ours", "official", "timm", "hf", "detectron2", "mmdet", "mmseg", "safetensors", "trunk")
D2_PREFIX = "backbone.net."


# ==================================================================================================
# Report
# ==================================================================================================
@dataclass
class ConversionReport:
    """What a conversion did, key by key (printed as a table by the CLI)."""

    converted: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why
    added: dict[str, str] = field(default_factory=dict)  # key -> how it starts
    resampled: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)  # source key -> written key (only where they differ)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"converted: {len(self.converted)} keys"]
        for k, why in sorted(self.dropped.items()):
            out.append(f"dropped:   {k}  ({why})")
        for k, how in sorted(self.added.items()):
            out.append(f"new:       {k}  ({how})")
        for k, (a, b) in self.resampled.items():
            out.append(f"resampled: {k}  {tuple(a)} -> {tuple(b)}")
        return out

    def table(self) -> str:
        """The report as a table, one row per group of keys (``blocks.*.attn.qkv`` stands for every block's
        weight and bias)."""
        rows: list[tuple[str, str, str]] = [("converted", f"{len(self.converted)} keys", "")]
        prefixed: dict[str, int] = defaultdict(int)
        ren: dict[tuple[str, str], int] = defaultdict(int)
        for a, b in self.renamed.items():
            if b != a and b.endswith("." + a):
                prefixed[b[: len(b) - len(a)]] += 1
            else:
                ren[(_module(a), _module(b))] += 1
        for pre, n in sorted(prefixed.items()):
            rows.append(("renamed", "*", f"-> {pre}*  ({_n_keys(n)})"))
        for (a, b), n in sorted(ren.items()):
            rows.append(("renamed", a, f"-> {b}  ({_n_keys(n)})"))
        for label, items in (("dropped", self.dropped), ("new", self.added)):
            by_why: dict[str, list[str]] = defaultdict(list)
            for k, why in items.items():
                by_why[why].append(k)
            for why, keys in sorted(by_why.items()):
                mods = sorted({_module(k, coarse=label == "dropped") for k in keys})
                shown = ", ".join(mods[:6]) + (" …" if len(mods) > 6 else "")
                rows.append((label, f"{shown} ({_n_keys(len(keys))})", why))
        for k, (a, b) in self.resampled.items():
            how = "timm resample_patch_embed" if k.startswith("patch_embed") else "bicubic"
            rows.append(("resampled", k, f"{tuple(a)} -> {tuple(b)} ({how})"))
        for n in self.notes:
            rows.append(("note", "", n))
        w0 = max(len(r[0]) for r in rows)
        w1 = min(64, max(len(r[1]) for r in rows))
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)


_NUM = re.compile(r"\.(\d+)\.")


def _pattern(key: str) -> str:
    return _NUM.sub(".*.", key, count=1)  # the block index only (mmseg's ffn.layers.0.0 stays)


def _n_keys(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"


def _module(key: str, coarse: bool = False) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.*.attn.qkv`` (the parameter's module, any block), or
    ``blocks.*`` when ``coarse``."""
    key = _pattern(key)
    if coarse and ".*." in key:
        return key.split(".*.", 1)[0] + ".*"
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


# ==================================================================================================
# Canonical (official MAE / timm) key names
# ==================================================================================================
_SUB = r"(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
_EXTRA = r"(?:attn\.rel_pos_h|attn\.rel_pos_w|attn\.relative_position_bias_table|ls1\.gamma|ls2\.gamma)"
_KINDS: list[tuple[str, re.Pattern]] = [
    ("cls_token", re.compile(r"cls_token")),
    ("pos_embed", re.compile(r"pos_embed")),
    ("stem", re.compile(r"patch_embed\.proj\.(?:weight|bias)")),
    ("block", re.compile(rf"blocks\.\d+\.{_SUB}")),
    ("extra", re.compile(rf"blocks\.\d+\.{_EXTRA}")),
    ("norm", re.compile(r"norm\.(?:weight|bias)")),
    ("fc_norm", re.compile(r"fc_norm\.(?:weight|bias)")),
    ("head", re.compile(r"head\.(?:weight|bias)")),
    ("mask_token", re.compile(r"mask_token")),
    ("decoder", re.compile(rf"decoder_(?:embed\.(?:weight|bias)|pos_embed|blocks\.\d+\.{_SUB}"
                           r"|norm\.(?:weight|bias)|pred\.(?:weight|bias))")),
    ("encoder_mask_token", re.compile(r"encoder_mask_token")),
]


def key_kind(key: str) -> str | None:
    """Which part of an MAE/ViT a canonical key belongs to, or None for a key no ViT has."""
    for kind, pat in _KINDS:
        if pat.fullmatch(key):
            return kind
    return None


def why_dropped(key: str) -> str | None:
    """Keys of an MAE checkpoint that no downstream encoder uses, with the reason."""
    if key.startswith("decoder_") or key == "mask_token":
        return "MAE decoder"
    if key == "encoder_mask_token":
        return "MAE encoder mask token (ablation)"
    return None


def _is_neutral(key: str, v: torch.Tensor) -> bool:
    """Relative-position tables at zero and layer scale at one compute nothing: safe to drop."""
    if key.endswith("gamma"):
        return bool(torch.all(v == 1))
    return bool(torch.all(v == 0))


def _neutral_why(key: str) -> str:
    return "layer scale 1 (identity)" if key.endswith("gamma") else "zero relative position (no effect)"


def _block_index(key: str) -> int:
    return int(key.split(".")[1])


# ==================================================================================================
# Architecture read from shapes
# ==================================================================================================
HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # the published sizes


@dataclass
class Arch:
    embed_dim: int
    depth: int
    patch_size: int
    in_chans: int
    mlp_hidden: int
    grid: tuple[int, int]
    pos_prefix: int
    num_heads: int
    heads_guessed: bool
    decoder_dim: int | None = None
    decoder_depth: int = 0
    decoder_hidden: int | None = None
    decoder_heads: int | None = None
    decoder_grid_prefix: int = 1

    @property
    def img_size(self) -> tuple[int, int]:
        return (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)


def _grid_of(n_rows: int, prefer_prefix: int, hint: tuple[int, int] | None = None) -> tuple[tuple[int, int], int]:
    """(grid, prefix rows) of an n-row position table."""
    for p in (prefer_prefix, 1 - prefer_prefix):
        if hint and hint[0] * hint[1] == n_rows - p:
            return hint, p
    for p in (prefer_prefix, 1 - prefer_prefix):
        s = math.isqrt(max(n_rows - p, 0))
        if s > 0 and s * s == n_rows - p:
            return (s, s), p
    raise UserError(f"pos_embed has {n_rows} rows: not a square patch grid (with or without a cls slot); give --img-size")


def infer_arch(state: dict[str, torch.Tensor], hints: dict[str, Any] | None = None) -> Arch:
    """Sizes of the encoder (and decoder) that produced a canonical state dict."""
    hints = hints or {}
    try:
        proj = state["patch_embed.proj.weight"]
    except KeyError:
        raise UserError("not a ViT encoder checkpoint: no patch embedding (patch_embed.proj.weight)") from None
    if proj.ndim != 4:
        raise UserError(f"shape mismatch: patch_embed.proj.weight {tuple(proj.shape)} is not a conv kernel (D, C, p, p)")
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    blocks = {_block_index(k) for k in state if k.startswith("blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    if blocks != set(range(depth)):
        raise UserError(f"blocks are not numbered 0..{depth - 1}: missing {sorted(set(range(depth)) - blocks)[:8]}")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    hidden = int(fc1.shape[0]) if fc1 is not None else 4 * dim
    hint_grid = None
    if hints.get("img_size"):
        h, w = _hw(hints["img_size"])
        hint_grid = (h // patch, w // patch)
    if "pos_embed" in state:
        pe = state["pos_embed"]
        if pe.ndim != 3:
            raise UserError(f"shape mismatch: pos_embed {tuple(pe.shape)} is not (1, N, D)")
        grid, prefix = _grid_of(pe.shape[1], 1 if ("cls_token" in state or hints.get("pos_prefix") == 1) else 0, hint_grid)
    else:
        grid, prefix = hint_grid or (14, 14), 0
    heads = hints.get("num_heads")
    guessed = heads is None
    if heads is None:
        heads = HEADS_BY_DIM.get(dim, max(1, dim // 64))
    arch = Arch(dim, depth, patch, in_chans, hidden, grid, prefix, int(heads), guessed)
    if "decoder_embed.weight" in state:
        arch.decoder_dim = int(state["decoder_embed.weight"].shape[0])
        dblocks = {_block_index(k) for k in state if k.startswith("decoder_blocks.")}
        arch.decoder_depth = max(dblocks) + 1 if dblocks else 0
        dfc1 = state.get("decoder_blocks.0.mlp.fc1.weight")
        arch.decoder_hidden = int(dfc1.shape[0]) if dfc1 is not None else 4 * arch.decoder_dim
        dh = hints.get("decoder_num_heads")
        arch.decoder_heads = int(dh) if dh else (16 if arch.decoder_dim % 16 == 0 else max(1, arch.decoder_dim // 32))
    return arch


def _hw(x: Any) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    if isinstance(x, (list, tuple)) and len(x) == 1:
        return (int(x[0]), int(x[0]))
    a, b = x
    return (int(a), int(b))


def check_shapes(state: dict[str, torch.Tensor], arch: Arch) -> None:
    """Every canonical key must have the shape its architecture implies; mismatches name the keys."""
    d, h = arch.embed_dim, arch.mlp_hidden
    exp: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,), "norm.bias": (d,), "fc_norm.weight": (d,), "fc_norm.bias": (d,),
        "encoder_mask_token": (1, 1, d),
    }

    def block(prefix: str, dim: int, hid: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}norm1.weight": (dim,), f"{prefix}norm1.bias": (dim,), f"{prefix}norm2.weight": (dim,),
                f"{prefix}norm2.bias": (dim,), f"{prefix}attn.qkv.weight": (3 * dim, dim), f"{prefix}attn.qkv.bias": (3 * dim,),
                f"{prefix}attn.proj.weight": (dim, dim), f"{prefix}attn.proj.bias": (dim,), f"{prefix}mlp.fc1.weight": (hid, dim),
                f"{prefix}mlp.fc1.bias": (hid,), f"{prefix}mlp.fc2.weight": (dim, hid), f"{prefix}mlp.fc2.bias": (dim,),
                f"{prefix}ls1.gamma": (dim,), f"{prefix}ls2.gamma": (dim,)}

    for i in range(arch.depth):
        exp.update(block(f"blocks.{i}.", d, h))
    if arch.decoder_dim:
        dd, dh = arch.decoder_dim, arch.decoder_hidden or 4 * arch.decoder_dim
        exp.update({"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
                    "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                    "decoder_pred.weight": (arch.patch_size**2 * arch.in_chans, dd),
                    "decoder_pred.bias": (arch.patch_size**2 * arch.in_chans,)})
        for j in range(arch.decoder_depth):
            exp.update(block(f"decoder_blocks.{j}.", dd, dh))
    bad = []
    for k, v in state.items():
        want = exp.get(k)
        if k == "pos_embed" or k == "decoder_pos_embed":
            dim = d if k == "pos_embed" else (arch.decoder_dim or -1)
            if v.ndim != 3 or v.shape[0] != 1 or v.shape[2] != dim:
                bad.append(f"{k} {tuple(v.shape)} vs (1, N, {dim})")
            continue
        if k == "head.weight" and (v.ndim != 2 or v.shape[1] != d):
            bad.append(f"{k} {tuple(v.shape)} vs (classes, {d})")
        if k == "head.bias" and "head.weight" in state and tuple(v.shape) != (state["head.weight"].shape[0],):
            bad.append(f"{k} {tuple(v.shape)} vs ({state['head.weight'].shape[0]},)")
        if want is not None and tuple(v.shape) != want:
            bad.append(f"{k} {tuple(v.shape)} vs {want}")
    if bad:
        raise UserError(f"shape mismatch: {'; '.join(bad[:6])}{' …' if len(bad) > 6 else ''}")


# ==================================================================================================
# Reading: any supported source -> canonical names
# ==================================================================================================
@dataclass
class Source:
    """A checkpoint read into canonical names."""

    state: dict[str, torch.Tensor]
    fmt: str
    path: str = "<state dict>"
    hints: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 model-zoo ``.pkl`` files: containers and numpy arrays, nothing else.

    Any other global (a function, a class with ``__reduce__``) is refused before it can run."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _load_pkl(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load (not plain checkpoint data): {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise UserError(f"{path}: not a readable pickle checkpoint (truncated?): {type(e).__name__}: {e}") from None


def _load_path(path: Path) -> Any:
    if path.is_dir():
        return _load_hf_dir(path)
    if path.suffix == ".pkl":
        obj = _load_pkl(path)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            import numpy as np

            obj = dict(obj)
            obj["model"] = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                            for k, v in obj["model"].items()}
        return obj
    # official training checkpoints (checkpoint-N.pth) store their flags as an argparse.Namespace:
    # plain data, so it is allowed; any other object is still refused by weights_only loading
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_file(path)


def _load_hf_dir(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise UserError(f"{path}: a directory, but no model.safetensors or pytorch_model.bin in it (HF layout expected)")
    obj = load_file(weights)
    out: dict[str, Any] = {"hf_state": unwrap_state_dict(obj) if not _all_tensors(obj) else obj}
    if cfg_path.is_file():
        try:
            out["hf_config"] = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{cfg_path}: not readable JSON ({e})") from None
    return out


def _all_tensors(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _naming(keys: list[str]) -> str:
    """Which naming scheme a key set uses."""
    if any(k.startswith(D2_PREFIX) for k in keys):
        return "detectron2"
    if any(re.match(r"(vit\.)?(embeddings\.|encoder\.layer\.|layers\.\d+\.(attention|layernorm_))", k) for k in keys) or any(
        k.startswith("decoder.decoder_") for k in keys
    ):
        return "hf"
    if any(re.match(r"(backbone\.)?(layers\.\d+\.ln1|patch_embed\.projection)", k) for k in keys):
        return "mmseg"
    return "mae"


def load_source(src: str | os.PathLike | dict[str, Any], fmt: str = "auto") -> Source:
    """Read a checkpoint of any supported format into canonical (official MAE / timm) names."""
    if fmt not in SOURCES:
        raise UserError(f"unknown source format {fmt!r}; choose from {', '.join(SOURCES)}")
    path = "<state dict>"
    if isinstance(src, dict):
        obj: Any = src
    else:
        p = Path(src)
        path = str(p)
        if not p.exists():
            raise UserError(f"checkpoint not found: {p}")
        obj = _load_path(p)
    hints: dict[str, Any] = {}
    hf_config = None
    if not isinstance(src, dict) and Path(src).is_file() and (Path(src).parent / "config.json").is_file():
        obj = {"hf_state": obj, "hf_config_path": Path(src).parent / "config.json"} if _all_tensors(obj) else obj
    if isinstance(obj, dict) and "hf_state" in obj:
        state, hf_config = obj["hf_state"], obj.get("hf_config")
        if "hf_config_path" in obj:  # a weights file next to its config.json
            container = "safetensors" if path.endswith(".safetensors") else "timm"
            if _naming(list(state)) == "hf":
                try:
                    hf_config = json.loads(Path(obj["hf_config_path"]).read_text())
                except (OSError, ValueError):
                    hf_config = None
        else:
            container = "hf"
    else:
        container = _container(obj)
        if isinstance(obj, dict):
            hints.update(_hints_from_container(obj))
        state = unwrap_state_dict(obj)
    naming = _naming(list(state))
    if fmt in ("hf",) or (fmt == "auto" and naming == "hf"):
        canon, dropped, renamed = _from_hf(state)
        if hf_config:
            hints.update(_hints_from_hf_config(hf_config))
        detected = "hf"
    elif fmt == "detectron2" or (fmt == "auto" and naming == "detectron2"):
        canon, dropped, renamed = _from_detectron2(state)
        detected = "detectron2"
        hints["pos_prefix"] = 1
    elif fmt == "mmseg" or (fmt == "auto" and naming == "mmseg"):
        canon, dropped, renamed = _from_mmseg(state)
        detected = "mmseg"
    else:
        canon, dropped, renamed = dict(state), {}, {}
        detected = fmt if fmt != "auto" else container
        if detected in ("mmseg", "hf"):  # a container of MAE-named tensors
            detected = "official"
        if detected == "timm" and path.endswith(".safetensors"):
            detected = "safetensors"
    unknown = [k for k in canon if key_kind(k) is None]
    if unknown:
        raise UserError(f"unknown keys for a ViT/MAE checkpoint ({detected}): {', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}")
    canon = {k: v for k, v in canon.items()}
    source = Source(canon, detected, path, hints, dropped, renamed)
    if hints.get("layer_norm_eps") not in (None, 1e-6):
        source.notes.append(f"source config says layer_norm_eps={hints['layer_norm_eps']}; our encoder uses 1e-6 "
                            "(features differ slightly from the source model)")
    return source


def _container(obj: Any) -> str:
    if not isinstance(obj, dict):
        return "unknown"
    meta = obj.get("meta")
    if isinstance(meta, dict) and meta.get("format") == TRUNK_FORMAT:
        return "trunk"
    if "model" in obj and isinstance(obj.get("args"), dict) and "optimizer" in obj:
        return "ours"
    if "model" in obj:
        return "official"
    if "state_dict" in obj:
        return "mmseg"
    return "timm"


def _hints_from_container(obj: dict[str, Any]) -> dict[str, Any]:
    """Sizes a checkpoint records besides its tensors (our args, official Namespace args, trunk meta)."""
    hints: dict[str, Any] = {}
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, dict):
        m = re.match(r"mae_vit_(\w+?)_patch(\d+)$", str(args.get("model", "")))
        if m and m.group(1) in ARCHS:
            hints["num_heads"] = ARCHS[m.group(1)][2]
        for k in ("decoder_num_heads", "norm_pix_loss", "mask_ratio"):
            if args.get(k) is not None:
                hints[k] = args[k]
        if args.get("input_size") is not None:
            hints["img_size"] = args["input_size"]
    meta = obj.get("meta")
    if isinstance(meta, dict):
        for k in ("num_heads", "img_size", "decoder_num_heads"):
            if meta.get(k) is not None and not (k == "num_heads" and meta.get("num_heads_guessed")):
                hints[k] = meta[k]
    return hints


def _hints_from_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    h: dict[str, Any] = {}
    for ours, theirs in (("num_heads", "num_attention_heads"), ("decoder_num_heads", "decoder_num_attention_heads"),
                         ("img_size", "image_size"), ("layer_norm_eps", "layer_norm_eps"), ("mask_ratio", "mask_ratio"),
                         ("norm_pix_loss", "norm_pix_loss")):
        if cfg.get(theirs) is not None:
            h[ours] = cfg[theirs]
    return h


# ---- HF ViTMAE ---------------------------------------------------------------------------------
# Hub layout (transformers 4.x, and what 5.x reads): vit.encoder.layer.i.attention.attention.query …
# transformers 5.x in-memory layout: vit.layers.i.attention.q_proj … (both are read).
_HF_SUB = [
    (re.compile(r"layernorm_before\.(weight|bias)"), "norm1.{}"),
    (re.compile(r"layernorm_after\.(weight|bias)"), "norm2.{}"),
    (re.compile(r"attention\.output\.dense\.(weight|bias)"), "attn.proj.{}"),
    (re.compile(r"attention\.o_proj\.(weight|bias)"), "attn.proj.{}"),
    (re.compile(r"intermediate\.dense\.(weight|bias)"), "mlp.fc1.{}"),
    (re.compile(r"mlp\.fc1\.(weight|bias)"), "mlp.fc1.{}"),
    (re.compile(r"output\.dense\.(weight|bias)"), "mlp.fc2.{}"),
    (re.compile(r"mlp\.fc2\.(weight|bias)"), "mlp.fc2.{}"),
]
_HF_QKV = re.compile(r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)")
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
_HF_LAYER = re.compile(r"(?:(?:vit\.)?(?:encoder\.layer|layers)|decoder\.(?:decoder_layers|decoder_encoder\.layer))\.(\d+)\.(.+)")


def _from_hf(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for k, v in state.items():
        top = k[4:] if k.startswith("vit.") else k
        if top in _HF_TOP:
            out[_HF_TOP[top]] = v
            renamed[k] = _HF_TOP[top]
            continue
        m = _HF_LAYER.fullmatch(k)
        if not m:
            unknown.append(k)
            continue
        prefix = "decoder_blocks" if k.startswith("decoder.") else "blocks"
        i, sub = m.group(1), m.group(2)
        mq = _HF_QKV.fullmatch(sub)
        if mq:
            part = mq.group(1) or {"q": "query", "k": "key", "v": "value"}[mq.group(2)]
            qkv[(f"{prefix}.{i}.attn.qkv.{mq.group(3)}", k[: len(k) - len(sub)] + "attention")][part] = v
            continue
        for pat, fmt in _HF_SUB:
            ms = pat.fullmatch(sub)
            if ms:
                new = f"{prefix}.{i}." + fmt.format(ms.group(1))
                out[new] = v
                renamed[k] = new
                break
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"unknown keys for HF ViTMAE: {', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}")
    for (new, src_prefix), parts in qkv.items():
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise UserError(f"HF attention {src_prefix} lacks {', '.join(missing)} (q, k and v are needed to build qkv)")
        out[new] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
        renamed[f"{src_prefix}.{{query,key,value}}.{new.rsplit('.', 1)[1]}"] = new
    return out, {}, renamed


def _to_hf(state: dict[str, torch.Tensor], with_prefix: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    inv = {v: k for k, v in _HF_TOP.items()}
    vit = "vit." if with_prefix else ""
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    sub_names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for k, v in state.items():
        if k in inv:
            new = inv[k] if inv[k].startswith("decoder.") else vit + inv[k]
            out[new] = v
            renamed[k] = new
            continue
        m = re.fullmatch(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)", k)
        if not m:
            raise UserError(f"no HF ViTMAE name for {k}")
        base = f"{vit}encoder.layer.{m.group(2)}." if m.group(1) == "blocks" else f"decoder.decoder_layers.{m.group(2)}."
        sub, wb = m.group(3), m.group(4)
        if sub == "attn.qkv":
            for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{base}attention.attention.{part}.{wb}"] = t.clone()
            renamed[k] = f"{base}attention.attention.{{query,key,value}}.{wb}"
        else:
            new = f"{base}{sub_names[sub]}.{wb}"
            out[new] = v
            renamed[k] = new
    return out, renamed


def hf_config(arch: Arch, with_decoder: bool, hints: dict[str, Any]) -> dict[str, Any]:
    """config.json of a ViTMAE export.  layer_norm_eps is 1e-6 (MAE's); HF's default 1e-12 would change
    every LayerNorm."""
    img = arch.img_size
    cfg: dict[str, Any] = {
        "architectures": ["ViTMAEForPreTraining" if with_decoder else "ViTMAEModel"],
        "model_type": "vit_mae",
        "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": arch.mlp_hidden,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": img[0] if img[0] == img[1] else list(img),
        "patch_size": arch.patch_size,
        "num_channels": arch.in_chans,
        "qkv_bias": True,
        "mask_ratio": float(hints.get("mask_ratio", 0.75)),
        "norm_pix_loss": bool(hints.get("norm_pix_loss", False)),
    }
    if with_decoder:
        cfg.update(decoder_hidden_size=arch.decoder_dim, decoder_num_hidden_layers=arch.decoder_depth,
                   decoder_num_attention_heads=arch.decoder_heads, decoder_intermediate_size=arch.decoder_hidden)
    return cfg


# ---- detectron2 ViTDet ---------------------------------------------------------------------------
def _from_detectron2(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    out, dropped, renamed = {}, {}, {}
    for k, v in state.items():
        if k.startswith(D2_PREFIX):
            out[k[len(D2_PREFIX):]] = v
            renamed[k] = k[len(D2_PREFIX):]
        else:
            dropped[k] = "detectron2 detector part outside backbone.net (pyramid / RPN / ROI heads)"
    return out, dropped, renamed


# ---- mmsegmentation MAE / BEiT backbone ----------------------------------------------------------
_MM_SUB = [("norm1", "ln1"), ("norm2", "ln2"), ("mlp.fc1", "ffn.layers.0.0"), ("mlp.fc2", "ffn.layers.1"),
           ("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2")]


def _to_mmseg_key(k: str) -> str:
    if k.startswith("patch_embed.proj."):
        return "patch_embed.projection." + k.split(".")[-1]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
    if not m:
        return k
    sub = m.group(2)
    for ours, theirs in _MM_SUB:
        if sub == ours or sub.startswith(ours + "."):
            sub = theirs + sub[len(ours):]
            break
    return f"layers.{m.group(1)}.{sub}"


def _from_mmseg(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    out, dropped, renamed = {}, {}, {}
    for k, v in state.items():
        kk = k[len("backbone."):] if k.startswith("backbone.") else k
        if kk.startswith(("decode_head.", "auxiliary_head.", "neck.")):
            dropped[k] = "mmseg decode/auxiliary head or neck (not part of the ViT)"
            continue
        if kk.endswith("relative_position_index"):
            dropped[k] = "index buffer (rebuilt from the grid)"
            continue
        if kk.startswith("patch_embed.projection."):
            new = "patch_embed.proj." + kk.split(".")[-1]
        elif kk.startswith("layers."):
            i, sub = kk.split(".", 2)[1:]
            for ours, theirs in _MM_SUB:
                if sub == theirs or sub.startswith(theirs + "."):
                    sub = ours + sub[len(theirs):]
                    break
            new = f"blocks.{i}.{sub}"
        elif kk.startswith("ln1."):  # final_norm=True stores the final norm as ln1
            new = "norm." + kk.split(".")[-1]
        else:
            new = kk
        out[new] = v
        if new != k:
            renamed[k] = new
    return out, dropped, renamed


# ==================================================================================================
# Converting: canonical -> target
# ==================================================================================================
@dataclass
class Converted:
    """A conversion ready to be written."""

    target: str
    state: dict[str, torch.Tensor]
    report: ConversionReport
    arch: Arch
    meta: dict[str, Any] = field(default_factory=dict)
    hf_config: dict[str, Any] | None = None


# what each target keeps of each canonical part (True keep, str = drop with this reason)
_POLICY: dict[str, dict[str, bool | str]] = {
    "official": dict(cls_token=True, norm=True, fc_norm=True, head=True, decoder=True, mask_token=True),
    "safetensors": dict(cls_token=True, norm=True, fc_norm=True, head=True, decoder=True, mask_token=True),
    "timm": dict(cls_token=True, norm=True, fc_norm=True, head=True),
    "hf": dict(cls_token=True, norm=True, decoder=True, mask_token=True),
    "classification": dict(cls_token=True, norm=True, fc_norm=True),
    "detection": dict(),
    "segmentation": dict(cls_token=True),
    "detectron2": dict(),
    "mmdet": dict(),
    "mmseg": dict(cls_token=True),
}
# which relative-position / layer-scale extras a target can hold
_EXTRAS: dict[str, tuple[str, ...]] = {
    "safetensors": ("rel_pos_h", "rel_pos_w", "relative_position_bias_table", "gamma"),
    "detection": ("rel_pos_h", "rel_pos_w"),
    "detectron2": ("rel_pos_h", "rel_pos_w"),
    "mmdet": ("rel_pos_h", "rel_pos_w"),
    "segmentation": ("relative_position_bias_table", "gamma"),
    "mmseg": ("relative_position_bias_table", "gamma"),
}
_WHY = {
    "cls_token": "ViTDet runs without a cls token (its pos_embed keeps the cls slot)",
    "norm": "dense tasks tap blocks without the final norm",
    "fc_norm": "classifier norm, not part of the backbone",
    "head": "classification head (re-initialised for a new task)",
    "decoder": "MAE decoder (pretraining only)",
    "mask_token": "MAE mask token (pretraining only)",
    "encoder_mask_token": "MAE encoder mask token (ablation, pretraining only)",
}


def convert(
    source: Source,
    to: str,
    *,
    img_size: int | tuple[int, int] | None = None,
    pool: str | None = None,
    fc_norm: str = "reinit",
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    patch_size: int | None = None,
) -> Converted:
    """Map a canonical source onto a target format.  Raises :class:`UserError` on anything that
    would not load or would silently lose trained weights."""
    if to not in TARGETS:
        raise UserError(f"unknown target {to!r}; choose from {', '.join(TARGETS)}")
    hints = dict(source.hints)
    if num_heads:
        hints["num_heads"] = num_heads
    if decoder_num_heads:
        hints["decoder_num_heads"] = decoder_num_heads
    state = source.state
    arch = infer_arch(state, hints)
    check_shapes(state, arch)
    rep = ConversionReport(dropped=dict(source.dropped), notes=list(source.notes))
    policy = _POLICY[to]
    has_norm, has_fc_norm = "norm.weight" in state, "fc_norm.weight" in state
    if to == "timm":
        pool = pool or ("avg" if has_fc_norm and not has_norm else "token")
        if pool not in ("token", "avg"):
            raise UserError(f"--pool must be token or avg, not {pool!r}")
    if fc_norm not in ("reinit", "copy"):
        raise UserError(f"--fc-norm must be reinit or copy, not {fc_norm!r}")

    out: dict[str, torch.Tensor] = {}
    refused = []
    for k, v in state.items():
        kind = key_kind(k)
        if kind in ("pos_embed", "stem", "block"):
            out[k] = v
            continue
        if kind == "extra":
            name = "gamma" if k.endswith("gamma") else k.rsplit(".", 1)[-1]
            if name in _EXTRAS.get(to, ()):
                out[k] = v
            elif _is_neutral(k, v):
                rep.dropped[k] = _neutral_why(k)
            else:
                refused.append(k)
            continue
        if kind == "norm" and to == "timm" and pool == "avg":
            rep.dropped[k] = "timm avg pooling has no final norm (uses fc_norm)"
            if fc_norm == "copy" and not has_fc_norm:
                new = "fc_norm." + k.split(".")[-1]
                out[new] = v
                rep.renamed[k] = new
            continue
        if kind == "fc_norm" and to == "timm" and pool == "token":
            rep.dropped[k] = "timm token pooling has no fc_norm"
            continue
        if kind == "fc_norm" and to == "classification" and fc_norm == "reinit":
            rep.dropped[k] = "fc_norm re-initialised, as the official fine-tuning does (--fc-norm copy keeps it)"
            continue
        keep = policy.get(kind, False)
        if keep is True:
            out[k] = v
        else:
            rep.dropped[k] = _WHY.get(kind, "not used by this target")
    if refused:
        raise UserError(f"{to} has no place for trained relative-position / layer-scale weights: "
                        f"{', '.join(refused[:6])}{' …' if len(refused) > 6 else ''}")
    if to == "classification" and fc_norm == "copy" and has_norm and not has_fc_norm:
        for wb in ("weight", "bias"):
            out[f"fc_norm.{wb}"] = state[f"norm.{wb}"]
            rep.renamed[f"norm.{wb}"] = f"fc_norm.{wb}"
        rep.notes.append("fc_norm initialised from the final norm (--fc-norm copy)")

    target_img = _hw(img_size) if img_size is not None else arch.img_size
    if patch_size and patch_size != arch.patch_size:
        # e.g. ViTDet-H: MAE ViT-H/14 weights run with 16x16 patches.  timm's resampling keeps each
        # token's projection of a resized patch (FlexiViT's pseudo-inverse); the table below follows
        # the new grid of the same image size.
        from timm.layers import resample_patch_embed

        if any(key_kind(k) in ("decoder", "mask_token") for k in out):
            raise UserError("--patch-size changes what the MAE decoder predicts; use it for encoder-only targets")
        w = out["patch_embed.proj.weight"]
        out["patch_embed.proj.weight"] = resample_patch_embed(w, [patch_size, patch_size], verbose=False)
        rep.resampled["patch_embed.proj.weight"] = (tuple(w.shape), tuple(out["patch_embed.proj.weight"].shape))
        arch.patch_size = patch_size
    # position tables: ViTDet-style targets keep the cls slot; everything else keeps what it has
    if "pos_embed" in out:
        pe = out["pos_embed"]
        if to in ("detection", "detectron2", "mmdet") and arch.pos_prefix == 0:
            out["pos_embed"] = torch.cat([pe.new_zeros(1, 1, pe.shape[2]), pe], dim=1)
            rep.notes.append("pos_embed had no cls slot: a zero row was added (ViTDet expects one)")
            arch.pos_prefix = 1
        new_grid = (target_img[0] // arch.patch_size, target_img[1] // arch.patch_size)
        if new_grid != arch.grid:
            before = tuple(out["pos_embed"].shape)
            out["pos_embed"] = resample_pos_embed(out["pos_embed"], new_grid, arch.grid, arch.pos_prefix)
            rep.resampled["pos_embed"] = (before, tuple(out["pos_embed"].shape))
            if "decoder_pos_embed" in out:
                before = tuple(out["decoder_pos_embed"].shape)
                out["decoder_pos_embed"] = resample_pos_embed(out["decoder_pos_embed"], new_grid, arch.grid, 1)
                rep.resampled["decoder_pos_embed"] = (before, tuple(out["decoder_pos_embed"].shape))
            arch.grid = new_grid
    if to in ("detectron2", "mmdet") and arch.img_size != (224, 224):
        rep.notes.append(f"set ViT(pretrain_img_size={arch.img_size[0]}) in the config: the position table is "
                         f"{arch.grid[0]}x{arch.grid[1]} patches of {arch.patch_size}")
    if arch.heads_guessed and to in ("hf", *TASKS):
        rep.notes.append(f"num_heads={arch.num_heads} guessed from width {arch.embed_dim} (pass --num-heads if different)")

    conv = Converted(to, {}, rep, arch)
    written, renamed = _rename_for(to, out, arch)
    if to == "hf":
        conv.hf_config = hf_config(arch, "decoder_embed.weight" in out, hints)
    rep.renamed.update({a: b for a, b in renamed.items() if a != b})
    rep.converted = list(written)
    conv.state = written
    _list_new_keys(to, written, arch, rep, pool)
    return conv


def _rename_for(to: str, out: dict[str, torch.Tensor], arch: Arch) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if to == "hf":
        if "decoder_embed.weight" in out and arch.decoder_depth == 0:
            raise UserError("decoder without blocks cannot be exported to HF ViTMAE")
        return _to_hf(out, with_prefix="decoder_embed.weight" in out)
    if to == "detectron2":
        return {D2_PREFIX + k: v for k, v in out.items()}, {k: D2_PREFIX + k for k in out}
    if to == "mmseg":
        return {_to_mmseg_key(k): v for k, v in out.items()}, {k: _to_mmseg_key(k) for k in out}
    return dict(out), {}


def _list_new_keys(to: str, written: dict[str, torch.Tensor], arch: Arch, rep: ConversionReport, pool: str | None) -> None:
    """Keys the target model has that the file leaves to the model's own (neutral) init."""
    new: dict[str, str] = {}
    for i in range(arch.depth):
        if to in ("detection", "detectron2", "mmdet"):
            pre = D2_PREFIX if to == "detectron2" else ""
            for n in ("rel_pos_h", "rel_pos_w"):
                k = f"{pre}blocks.{i}.attn.{n}"
                if k not in written:
                    new[k] = "decomposed relative position, zero-initialised (use_rel_pos=True)"
        if to in ("segmentation", "mmseg"):
            table = f"layers.{i}.attn.relative_position_bias_table" if to == "mmseg" else f"blocks.{i}.attn.relative_position_bias_table"
            if table not in written:
                new[table] = "relative position bias, zero-initialised (MAE)"
            for a, b in (("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2")):
                k = f"layers.{i}.{b}" if to == "mmseg" else f"blocks.{i}.{a}"
                if k not in written:
                    new[k] = "layer scale = init_values (1.0 in the MAE recipe: identity)"
    if to == "timm":
        if pool == "avg" and "fc_norm.weight" not in written:
            new.update({"fc_norm.weight": "timm init (official MAE fine-tuning re-initialises fc_norm)",
                        "fc_norm.bias": "timm init (official MAE fine-tuning re-initialises fc_norm)"})
        if "head.weight" not in written:
            new.update({"head.weight": "classifier, timm init", "head.bias": "classifier, timm init"})
    if to == "classification":
        for k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
            if k not in written:
                new[k] = "task model's own init (avg-pool mode)" if k.startswith("fc_norm") else "task model's own init"
    rep.added.update(new)


def trunk_meta(conv: Converted, source: Source) -> dict[str, Any]:
    a = conv.arch
    return {
        "format": TRUNK_FORMAT,
        "task": conv.target,
        "source": source.path,
        "source_format": source.fmt,
        "img_size": list(a.img_size),
        "patch_size": a.patch_size,
        "embed_dim": a.embed_dim,
        "depth": a.depth,
        "num_heads": a.num_heads,
        "num_heads_guessed": a.heads_guessed,
        "mlp_hidden": a.mlp_hidden,
        "pos_embed_cls_slot": bool(a.pos_prefix),
        "converter": "tools/convert.py",
    }


# ==================================================================================================
# Writing
# ==================================================================================================
def _atomic_bytes(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    plain = {k: v.detach().contiguous().clone() for k, v in state.items()}
    _atomic_bytes(path, lambda tmp: save_file(plain, tmp, metadata={"format": "pt", **(metadata or {})}))


def write_converted(conv: Converted, source: Source, dst: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write a conversion to ``dst`` (a directory for ``hf``); never overwrites without ``force``."""
    dst = Path(dst)
    to = conv.target
    if to == "hf":
        if dst.exists() and not dst.is_dir():
            raise UserError(f"{dst} exists and is not a directory (hf writes a directory)")
        if dst.is_dir() and any(dst.iterdir()) and not force:
            raise UserError(f"{dst} is not empty (use --force to overwrite)")
        dst.mkdir(parents=True, exist_ok=True)
        cfg = dict(conv.hf_config or {})
        save_safetensors(conv.state, dst / "model.safetensors")
        _atomic_bytes(dst / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
        return [dst / "config.json", dst / "model.safetensors"]
    if dst.is_dir():
        raise UserError(f"{dst} is a directory; give a file name")
    if dst.exists() and not force:
        raise UserError(f"{dst} exists (use --force to overwrite)")
    if to == "safetensors" or dst.suffix == ".safetensors":
        if to not in ("safetensors", "timm"):
            raise UserError(f"{to} files are torch checkpoints; use a .pth name (safetensors holds flat tensors only)")
        save_safetensors(conv.state, dst, {"source": source.path, "source_format": source.fmt})
    elif to == "detectron2" and dst.suffix == ".pkl":
        zoo = {"model": {k: v.detach().cpu().numpy() for k, v in conv.state.items()},
               "__author__": "maecore tools/convert.py", "matching_heuristics": False}

        def dump(tmp: str) -> None:
            with open(tmp, "wb") as f:
                pickle.dump(zoo, f, protocol=4)

        _atomic_bytes(dst, dump)
    elif to == "timm":
        save_atomic(conv.state, dst)  # a bare state dict, as timm's hub weights are
    elif to == "mmseg":
        save_atomic({"state_dict": conv.state, "meta": {"converter": "tools/convert.py", "source": source.path}}, dst)
    elif to in TASKS:
        save_atomic({"model": conv.state, "meta": trunk_meta(conv, source)}, dst)
    else:  # official, detectron2 (.pth), mmdet: {'model': ...}
        save_atomic({"model": conv.state}, dst)
    return [dst]


# ==================================================================================================
# What the tasks call
# ==================================================================================================
def read_state(src: str | os.PathLike | dict[str, Any]) -> dict[str, torch.Tensor]:
    """The encoder state of any supported checkpoint, in canonical (official MAE / timm) names."""
    return load_source(src).state


def adapt_to_encoder(
    state: dict[str, torch.Tensor], model: VisionTransformer, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map MAE-encoder-named weights onto ``model`` (whose own keys may sit under ``prefix``)."""
    report = ConversionReport()
    target = {k: v for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    unknown, bad_shape = [], []
    for k, v in state.items():
        why = why_dropped(k)
        if why:
            report.dropped[k] = why
            continue
        if k == "cls_token" and model.cls_token is None:
            report.dropped[k] = "target has no cls token"
            continue
        if k.startswith("norm.") and isinstance(model.norm, nn.Identity):
            report.dropped[k] = "target has no final norm"
            continue
        if k.startswith("fc_norm.") and k not in target:
            report.dropped[k] = "target has no fc_norm (token pooling or a dense task)"
            continue
        if k.startswith("head.") and k not in target:
            report.dropped[k] = "classification head (target has none)"
            continue
        if k not in target and key_kind(k) == "extra" and _is_neutral(k, v):
            report.dropped[k] = _neutral_why(k)
            continue
        if k not in target:
            unknown.append(k)
            continue
        if k == "pos_embed" and v.shape != target[k].shape:
            try:
                new = adapt_pos_embed(v, model)
            except ValueError as e:
                raise UserError(f"pos_embed {tuple(v.shape)}: {e}") from None
            report.resampled[k] = (tuple(v.shape), tuple(new.shape))
            v = new
        if v.shape != target[k].shape:
            bad_shape.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
            continue
        out[k] = v
        report.converted.append(k)
    if unknown:
        raise UserError(f"unknown keys for this encoder: {', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}")
    if bad_shape:
        raise UserError(f"shape mismatch: {'; '.join(bad_shape[:6])}")
    for k in target:
        if k not in out:
            report.added[k] = _neutral_init(k)
    return {prefix + k: v for k, v in out.items()}, report


def _neutral_init(key: str) -> str:
    if "rel_pos" in key or "relative_position" in key:
        return "relative position, zero-initialised"
    if key.endswith("gamma"):
        return "layer scale, initialised to init_values"
    if key.startswith("norm.") or key.startswith("fc_norm."):
        return "new norm, ones/zeros"
    return "new, model's own init"


def load_backbone(model: VisionTransformer, src: str | os.PathLike | dict[str, Any], verbose: bool = False) -> ConversionReport:
    """Load pretrained encoder weights into ``model``; keys the checkpoint lacks keep their init
    (and are listed as new).  ``src`` may be any format :func:`load_source` reads.  Raises
    :class:`UserError` on unknown keys or shape mismatches."""
    source = load_source(src)
    state, report = adapt_to_encoder(source.state, model)
    if not report.converted:
        raise UserError("the checkpoint has no encoder weights for this model (nothing would be loaded)")
    report.dropped.update(source.dropped)
    model.load_state_dict(state, strict=False)
    if verbose:
        print("\n".join(report.lines()))
    return report
