"""The ImageNet folder layout ``<root>/imagenet/{train,val}/<shape>/*.jpg`` (class = the shape with the largest
visible area)."""

from __future__ import annotations

from pathlib import Path

from synthetic.common import check_count, prepare_dir, rng_stream, save_jpg
from synthetic.scene import Size, image_hw, render_scene
from synthetic.shapes import SHAPES

# ImageNet photos are object-centric: the labelled object fills a good part of the frame.
IMAGENET_MAIN_AREA = (0.22, 0.40)
# plain style: one object, larger (a 64-px frame at 8-px patches gives it ~20-35 patches, not 14-26)
IMAGENET_PLAIN_AREA = (0.30, 0.55)


def make_imagenet(
    root: str | Path,
    n_train_per_class: int,
    n_val_per_class: int,
    size: Size = 64,
    seed: int = 0,
    *,
    overwrite: bool = False,
    style: str = "cluttered",
) -> Path:
    """Write ``<root>/imagenet/{train,val}/<shape>/*.jpg``; return ``<root>/imagenet``.

    ``style="plain"``: one flat-coloured object per image on a gradient (see STYLES)."""
    h, w = image_hw(size)
    counts = {"train": check_count("n_train_per_class", n_train_per_class),
              "val": check_count("n_val_per_class", n_val_per_class)}
    out = prepare_dir(Path(root) / "imagenet", overwrite)
    for split, n in counts.items():
        for label, name in enumerate(SHAPES):
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            # One stream per class: per-class counts don't shift other classes.
            rng = rng_stream(seed, "imagenet", split, label)
            for i in range(n):
                scene = (render_scene(rng, (h, w), dominant=label, main_area=IMAGENET_PLAIN_AREA, style=style, max_objects=1)
                         if style == "plain" else render_scene(rng, (h, w), dominant=label, main_area=IMAGENET_MAIN_AREA))
                save_jpg(scene.image, d / f"{name}_{i:05d}.jpg")
    return out
