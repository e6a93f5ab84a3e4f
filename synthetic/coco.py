"""The COCO 2017 instances layout: ``<root>/coco/{train2017,val2017}/*.jpg`` plus
``<root>/coco/annotations/instances_{train,val}2017.json`` (category id = index in SHAPES + 1; a fully visible,
hole-free instance as its polygon, any other as compressed RLE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from synthetic.common import check_count, prepare_dir, save_jpg, scene_stream
from synthetic.scene import Scene, Size, image_hw
from synthetic.shapes import SHAPES, mask_api


def coco_categories() -> list[dict]:
    """COCO ``categories`` entries: ids 1..K in SHAPES order."""
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)]


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


def scene_annotations(scene: Scene, image_id: int, first_ann_id: int) -> list[dict]:
    """COCO instance annotations for a scene (visible masks; polygon or RLE)."""
    anns = []
    for k, (m, lab, poly) in enumerate(zip(scene.masks, scene.labels, scene.polygons, strict=True)):
        if poly is not None:
            segm: list | dict = [poly]
        else:
            rle = mask_api().encode(np.asfortranarray(m.astype(np.uint8)))
            segm = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        anns.append({
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": lab + 1,
            "bbox": _bbox(m),
            "area": float(m.sum()),
            "segmentation": segm,
            "iscrowd": 0,
        })
    return anns


def make_coco(
    root: str | Path,
    n_train: int,
    n_val: int,
    size: Size = 64,
    seed: int = 0,
    *,
    overwrite: bool = False,
    style: str = "cluttered",
) -> Path:
    """Write the COCO 2017 instances layout under ``<root>/coco``; return it."""
    hw = image_hw(size)
    counts = {"train": check_count("n_train", n_train), "val": check_count("n_val", n_val)}
    out = prepare_dir(Path(root) / "coco", overwrite)
    (out / "annotations").mkdir()
    for split, n in counts.items():
        img_dir = out / f"{split}2017"
        img_dir.mkdir()
        images, anns = [], []
        for i, scene in scene_stream(seed, split, n, hw, style):
            image_id = i + 1
            fname = f"{image_id:012d}.jpg"
            save_jpg(scene.image, img_dir / fname)
            images.append({"id": image_id, "file_name": fname, "height": hw[0],
                           "width": hw[1], "license": 1})
            anns += scene_annotations(scene, image_id, len(anns) + 1)
        data = {
            "info": {"description": "maecore synthetic shapes", "version": "1.0",
                     "year": 2024, "contributor": "maecore", "seed": int(seed)},
            "licenses": [{"id": 1, "name": "synthetic, public domain", "url": ""}],
            "images": images,
            "annotations": anns,
            "categories": coco_categories(),
        }
        with open(out / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump(data, f, sort_keys=True, separators=(",", ":"))
    return out
