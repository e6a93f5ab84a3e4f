"""Reading checkpoints safely and detecting their format; the atomic writers the formats share.

Nothing here runs code from a file: torch files go through ``torch.load(weights_only=True)``,
detectron2 model-zoo pickles through an unpickler that knows containers and numpy arrays only,
safetensors and HF directories through their own readers.  Which names a state dict uses is asked of
the format records (:func:`maecore.convert.formats.detect_naming`); their ``to_canonical`` maps it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from maecore.checkpoint import load_file, unwrap_state_dict
from maecore.convert import formats
from maecore.convert.keys import key_kind
from maecore.convert.records import Source
from maecore.convert.writers import TRUNK_FORMAT
from maecore.errors import UserError
from maecore.models import SIZES


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Any supported source -> canonical names
# --------------------------------------------------------------------------------------------------
def read_checkpoint(src: str | os.PathLike) -> Any:
    """The object a checkpoint file (or HF model directory) holds, read as :func:`load_source` reads it."""
    p = Path(src)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    return _load_path(p)


def load_source(src: str | os.PathLike | dict[str, Any], fmt: str = "auto", loaded: Any = None) -> Source:
    """Read a checkpoint of any supported format into canonical (official MAE / timm) names.  ``loaded``: the
    object :func:`read_checkpoint` already read from the path ``src`` (it is not read twice)."""
    forced = None if fmt == "auto" else formats.source_format(fmt)
    path = "<state dict>"
    if isinstance(src, dict):
        obj: Any = src
    else:
        p = Path(src)
        path = str(p)
        if loaded is not None:
            obj = loaded
        elif not p.exists():
            raise UserError(f"checkpoint not found: {p}")
        else:
            obj = _load_path(p)
    hints: dict[str, Any] = {}
    config = None
    if not isinstance(src, dict) and Path(src).is_file() and (Path(src).parent / "config.json").is_file():
        obj = {"hf_state": obj, "hf_config_path": Path(src).parent / "config.json"} if _all_tensors(obj) else obj
    if isinstance(obj, dict) and "hf_state" in obj:
        state, config = obj["hf_state"], obj.get("hf_config")
        if "hf_config_path" in obj:  # a weights file next to its config.json
            container = "safetensors" if path.endswith(".safetensors") else "timm"
            naming = formats.detect_naming(list(state))
            if naming is not None and naming.name == "hf":
                try:
                    config = json.loads(Path(obj["hf_config_path"]).read_text())
                except (OSError, ValueError):
                    config = None
        else:
            container = "hf"
    else:
        container = _container(obj)
        if isinstance(obj, dict):
            hints.update(_hints_from_container(obj))
        state = unwrap_state_dict(obj)
    reader = forced if forced is not None else formats.detect_naming(list(state))
    if reader is not None and reader.to_canonical is not None:
        canon, dropped, renamed, read_hints = reader.to_canonical(state, config)
        hints.update(read_hints)
        detected = reader.name
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
    source = Source(canon, detected, path, hints, dropped, renamed)
    if hints.get("layer_norm_eps") not in (None, 1e-6):
        source.notes.append(f"source config says layer_norm_eps={hints['layer_norm_eps']}; our encoder uses 1e-6 "
                            "(features differ slightly from the source model)")
    return source


def _container(obj: Any) -> str:
    """Which format's container a checkpoint object is (its tensors may still use another naming)."""
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
        if args.get("num_heads"):  # our --num_heads override of the named size
            hints["num_heads"] = args["num_heads"]
        elif m and m.group(1) in SIZES:
            hints["num_heads"] = SIZES[m.group(1)].num_heads
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


def read_state(src: str | os.PathLike | dict[str, Any]) -> dict[str, torch.Tensor]:
    """The encoder state of any supported checkpoint, in canonical (official MAE / timm) names."""
    return load_source(src).state
