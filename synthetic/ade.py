"""The ADE20K layout: ``<root>/ade/ADEChallengeData2016/{images,annotations}/{training,validation}/
ADE_{train,val}_%08d.{jpg,png}`` (0 = background, ``i + 1`` = ``SHAPES[i]``, so ``reduce_zero_label`` applies).
Image i of a split is the same scene as COCO's image i."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from synthetic.common import check_count, prepare_dir, save_jpg, scene_stream
from synthetic.scene import Size, image_hw

ADE_DIRNAME = "ADEChallengeData2016"


def make_ade20k(
    root: str | Path,
    n_train: int,
    n_val: int,
    size: Size = 64,
    seed: int = 0,
    *,
    overwrite: bool = False,
    style: str = "cluttered",
) -> Path:
    """Write the ADE20K layout under ``<root>/ade/ADEChallengeData2016``; return ``<root>/ade``."""
    hw = image_hw(size)
    counts = {"train": check_count("n_train", n_train), "val": check_count("n_val", n_val)}
    out = prepare_dir(Path(root) / "ade", overwrite)
    base = out / ADE_DIRNAME
    for split, n in counts.items():
        sub = {"train": "training", "val": "validation"}[split]
        img_dir, ann_dir = base / "images" / sub, base / "annotations" / sub
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for i, scene in scene_stream(seed, split, n, hw, style):
            stem = f"ADE_{split}_{i + 1:08d}"
            save_jpg(scene.image, img_dir / f"{stem}.jpg")
            Image.fromarray(scene.semantic).save(ann_dir / f"{stem}.png", format="PNG")
    return out
