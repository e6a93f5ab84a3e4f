"""Checkpoints are data: plain dicts of tensors and numbers, written atomically, read with
``weights_only=True``."""

from __future__ import annotations

import argparse
import os
import pickle
import random
import tempfile
import zipfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maecore import distributed as du
from maecore.cli import fill_from_checkpoint, upgrade_saved_args
from maecore.errors import UserError


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save to a temp file beside ``path``, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint safely; any unreadable, truncated or code-carrying file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_st

        try:
            return load_st(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refused to load (not plain checkpoint data): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint (truncated or another format?): {first}") from None


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ours/official ``{'model': …}``, mm*'s ``{'state_dict': …}``,
    or a bare state dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                return unwrap_state_dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    raise UserError("no state dict found in checkpoint (expected a 'model' or 'state_dict' entry of tensors)")


def checkpoint_args(obj: Any) -> dict[str, Any] | None:
    """The run's args a training checkpoint of this toolkit stores (``Trainer.state_dict()['args']``), or
    ``None`` for a file without them (a converted or officially released checkpoint, a bare state dict)."""
    args = obj.get("args") if isinstance(obj, dict) else None
    return args if isinstance(args, dict) else None


def load_for_eval(path: str | os.PathLike, args: argparse.Namespace, parser: argparse.ArgumentParser, keys: Sequence[str],
                  given: Collection[str] = ()) -> Any:
    """``--eval --resume PATH``: load the checkpoint and set the model flags ``keys`` on ``args`` from the
    args saved in it, except those written on the command line (``given``); rank 0 says which it took.  Args
    saved before the CLIs shared one vocabulary (``arch``, ``image_size``, ``crop_size``, ``nb_classes``) count
    under today's names (``model``, ``input_size``, ``num_classes``)."""
    ckpt = load_file(path)
    fill_from_checkpoint(parser, args, upgrade_saved_args(checkpoint_args(ckpt)), keys, given, source=str(path),
                         log=print if du.is_main() else None)
    return ckpt


# ---- RNG state, so a resumed run continues the same random stream -------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
