"""The whole world: the requested layouts under one root."""

from __future__ import annotations

from pathlib import Path

from synthetic.ade import make_ade20k
from synthetic.coco import make_coco
from synthetic.common import TASKS
from synthetic.imagenet import make_imagenet
from synthetic.scene import STYLES, Size


def make_world(
    root: str | Path,
    *,
    size: Size = 64,
    n_train: int = 40,
    n_val: int = 10,
    seed: int = 0,
    tasks: tuple[str, ...] | list[str] = TASKS,
    overwrite: bool = False,
    style: str = "cluttered",
) -> dict[str, Path]:
    """Write the requested layouts under ``root``; return ``{task: path}``.

    ``n_train``/``n_val`` are images per class for ImageNet and images per
    split for COCO and ADE20K.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tuple(tasks)}")
    makers = {"imagenet": make_imagenet, "coco": make_coco, "ade": make_ade20k}
    root = Path(root)
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return {t: makers[t](root, n_train, n_val, size, seed, overwrite=overwrite, style=style)
            for t in TASKS if t in tasks}
