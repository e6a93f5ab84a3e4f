"""Writing converted files atomically (a temporary file beside the target, then one rename: never half a
file), and the format tag of the task trunk files.  Below the format records and the readers
(:mod:`maecore.convert.io`), which both use it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TRUNK_FORMAT = "maecore-trunk"  # meta["format"] of the task trunk files this converter writes


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` a temp file beside ``path``, then rename it over ``path``: never half a file."""
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
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata={"format": "pt", **(metadata or {})}))
