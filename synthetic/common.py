"""What the three layout writers share: the seeded RNG streams, the scene sequence COCO and ADE20K both
write, output folders, JPEG files and count checks."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from synthetic.scene import Scene, render_scene

TASKS: tuple[str, ...] = ("imagenet", "coco", "ade")
JPEG_QUALITY = 95
# Separate RNG streams per task/split so that changing one count never
# changes the content generated for another task or split.
_STREAM = {"imagenet": 0, "scenes": 1}
_SPLIT = {"train": 0, "val": 1}

# plain COCO / ADE scenes: 1-3 objects, none a distractor of a patch or two (at 64 px / patch 8 the cluttered
# scenes' 1-5 % objects cover 1-3 patches, too few to read a shape from), all large enough to classify
SCENE_PLAIN_MAIN_AREA = (0.14, 0.28)
SCENE_PLAIN_OTHER_AREA = (0.06, 0.14)


def rng_stream(seed: int, task: str, split: str, *extra: int) -> np.random.Generator:
    """The RNG of one task's split (``extra``: e.g. the class), independent of every other stream."""
    return np.random.default_rng([int(seed), _STREAM[task], _SPLIT[split], *extra])


def scene_stream(seed: int, split: str, n: int, hw: tuple[int, int], style: str = "cluttered") -> Iterator[tuple[int, Scene]]:
    """Scenes 0..n-1 of a split, as COCO and ADE20K write them."""
    # COCO and ADE share this stream: image i of a split is the same scene in
    # both layouts, which lets tests cross-check them file by file.
    rng = rng_stream(seed, "scenes", split)
    sizes = {"main_area": SCENE_PLAIN_MAIN_AREA, "other_area": SCENE_PLAIN_OTHER_AREA, "max_objects": 3} if style == "plain" else {}
    for i in range(n):
        yield i, render_scene(rng, hw, style=style, **sizes)


def prepare_dir(path: Path, overwrite: bool) -> Path:
    """An empty ``path`` to write a layout into (a non-empty one is replaced only with ``overwrite``)."""
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_jpg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="JPEG", quality=JPEG_QUALITY)


def check_count(name: str, n: int) -> int:
    """``n`` as an int, or ValueError naming ``name`` when it is not a non-negative integer."""
    if int(n) != n or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    return int(n)
