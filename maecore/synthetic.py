"""Synthetic "shapes" world: one scene generator, three real on-disk layouts.

Every scene holds 1-4 textured shapes on a textured background. Later objects
occlude earlier ones, so each instance mask is its *visible* part. The same
generator feeds:

* ImageNet layout  ``<root>/imagenet/{train,val}/<shape>/*.jpg`` (class = the
  shape with the largest visible area),
* COCO layout      ``<root>/coco/{train2017,val2017}/*.jpg`` plus
  ``<root>/coco/annotations/instances_{train,val}2017.json``,
* ADE20K layout    ``<root>/ade/ADEChallengeData2016/{images,annotations}/
  {training,validation}/ADE_{train,val}_%08d.{jpg,png}`` (0 = background,
  ``i + 1`` = ``SHAPES[i]``, so ``reduce_zero_label`` applies).

Shapes are rasterised with pycocotools' own polygon rasteriser, so a polygon
written to the COCO json decodes (``annToMask``) to exactly the rendered mask.
Everything is a pure function of the seed: same seed, byte-identical files.

Command line (``tools/make_synthetic.py`` runs the same)::

    python -m maecore.synthetic data/synth --size 64 --n-train 40 --n-val 10
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from maecore.cli import OneLineParser, size_type

# The single class list; its order defines COCO category ids (index + 1) and
# ADE labels (index + 1). ImageNet class folders use these names verbatim.
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "hexagon",
)
NUM_CLASSES = len(SHAPES)
TASKS: tuple[str, ...] = ("imagenet", "coco", "ade")
ADE_DIRNAME = "ADEChallengeData2016"
JPEG_QUALITY = 95
MIN_SIDE = 16

_BG_KINDS = ("gradient", "noise", "stripes")
_FG_KINDS = ("plain", "stripes", "checker", "noise")
# "cluttered": textured objects and backgrounds, distractor shapes (the default);
# "plain": flat-coloured objects on gradient backgrounds; the ImageNet split
# then holds one larger object per image.  Both decide the class by shape only
# (colours are drawn independently of it).
STYLES: tuple[str, ...] = ("cluttered", "plain")
# Separate RNG streams per task/split so that changing one count never
# changes the content generated for another task or split.
_STREAM = {"imagenet": 0, "scenes": 1}
_SPLIT = {"train": 0, "val": 1}

Size = int | tuple[int, int]


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    ang = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(ang), radius * np.sin(ang)], axis=1)


def _unit_shape(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer polygon (and optional hole) of a shape, centred, radius ~1."""
    if name == "circle":
        return _regular(40), None
    if name == "square":
        return _regular(4, phase=np.pi / 4), None
    if name == "triangle":
        return _regular(3, phase=-np.pi / 2), None
    if name == "hexagon":
        return _regular(6), None
    if name == "star":
        inner = rng.uniform(0.42, 0.55)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        ang = -np.pi / 2 + np.pi * np.arange(10) / 5
        return np.stack([radii * np.cos(ang), radii * np.sin(ang)], axis=1), None
    if name == "ring":
        # Thick enough that the hole stays a hole at small sizes.
        return _regular(40), _regular(40, radius=rng.uniform(0.45, 0.6))
    if name == "cross":
        w = rng.uniform(0.28, 0.38)
        pts = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
               (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        return np.asarray(pts, dtype=np.float64), None
    raise ValueError(f"unknown shape {name!r}")


def _shoelace(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _mask_utils() -> ModuleType:
    """pycocotools' mask API, imported on first use: importing this module (every test module's collection
    does, ``pytest -m cuda`` on a machine without pycocotools included) needs no pycocotools."""
    from pycocotools import mask

    return mask


def _raster(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    mask_utils = _mask_utils()
    rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    # pycocotools' decode trips a harmless numpy-2 "copy keyword" warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)[:, :, 0].astype(bool)


@dataclass
class _Placed:
    label: int
    outer: np.ndarray  # (N, 2) image coords, rounded to 0.01 px
    hole: np.ndarray | None
    mask: np.ndarray  # full (unoccluded) mask


def _place(rng: np.random.Generator, label: int, area: float, h: int, w: int) -> _Placed:
    outer, hole = _unit_shape(SHAPES[label], rng)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    # Mild anisotropy so shapes are not perfect templates.
    aspect = rng.uniform(0.85, 1.15)
    stretch = np.array([math.sqrt(aspect), 1.0 / math.sqrt(aspect)])
    outer = (outer * stretch) @ rot.T
    hole = None if hole is None else (hole * stretch) @ rot.T
    unit_area = _shoelace(outer) - (0.0 if hole is None else _shoelace(hole))
    scale = math.sqrt(area / unit_area)
    lo, hi = outer.min(axis=0), outer.max(axis=0)
    # Keep the whole shape inside the frame (1 px margin) so polygons stay
    # in-bounds; shrink if the requested area does not fit.
    fit = 0.999 * min((w - 2) / (hi[0] - lo[0]), (h - 2) / (hi[1] - lo[1]))  # margin for rounding
    scale = min(scale, fit)
    lo, hi = lo * scale, hi * scale
    cx = rng.uniform(1 - lo[0], w - 1 - hi[0])
    cy = rng.uniform(1 - lo[1], h - 1 - hi[1])
    centre = np.array([cx, cy])
    outer = np.round(outer * scale + centre, 2)
    mask = _raster(outer, h, w)
    if hole is not None:
        hole = np.round(hole * scale + centre, 2)
        mask &= ~_raster(hole, h, w)
    return _Placed(label, outer, hole, mask)


# --------------------------------------------------------------------------
# textures
# --------------------------------------------------------------------------


def _rand_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _coords(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Pixel centres projected on a random direction."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    a = rng.uniform(0.0, np.pi)
    return xx * np.float32(np.cos(a)) + yy * np.float32(np.sin(a))


def _lerp(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    return c0 + t[..., None] * (c1 - c0)


def _background(rng: np.random.Generator, h: int, w: int, kinds: tuple[str, ...] = _BG_KINDS) -> np.ndarray:
    kind = kinds[rng.integers(len(kinds))]
    c0, c1 = _rand_color(rng), _rand_color(rng)
    if kind == "gradient":
        v = _coords(h, w, rng)
        t = (v - v.min()) / max(float(np.ptp(v)), 1e-6)
        img = _lerp(t, c0, c1)
    elif kind == "stripes":
        v = _coords(h, w, rng) / rng.uniform(4.0, 14.0)
        img = _lerp(0.5 + 0.5 * np.sin(2 * np.pi * v), c0, c1)
    else:  # smooth low-frequency colour noise
        gh, gw = (int(rng.integers(2, 7)) for _ in range(2))
        grid = rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR))
        img = img.astype(np.float32)
    img = img + rng.normal(0.0, 6.0, size=(h, w, 1)).astype(np.float32)
    return img


def _foreground(rng: np.random.Generator, h: int, w: int, bg_mean: np.ndarray,
                kinds: tuple[str, ...] = _FG_KINDS) -> np.ndarray:
    # Re-draw colours too close to the background mean, so objects stay
    # visible (the task should be hard because of clutter, not invisibility).
    c0 = _rand_color(rng)
    for _ in range(8):
        if np.abs(c0 - bg_mean).sum() >= 90:
            break
        c0 = _rand_color(rng)
    kind = kinds[rng.integers(len(kinds))]
    if kind == "plain":
        return np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    c1 = np.clip(c0 + rng.choice([-1.0, 1.0]) * rng.uniform(50, 110), 0, 255).astype(np.float32)
    if kind == "stripes":
        v = _coords(h, w, rng) / rng.uniform(2.0, 6.0)
        return _lerp((np.floor(v) % 2).astype(np.float32), c0, c1)
    if kind == "checker":
        cell = int(rng.integers(2, 6))
        yy, xx = np.mgrid[0:h, 0:w]
        return _lerp(((yy // cell + xx // cell) % 2).astype(np.float32), c0, c1)
    return c0 + rng.normal(0.0, 22.0, size=(h, w, 3)).astype(np.float32)


# --------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------


@dataclass
class Scene:
    """A rendered scene; masks/labels/polygons are in z-order (bottom first)."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray]  # visible part of each instance, bool (H, W)
    labels: list[int]  # indices into SHAPES
    semantic: np.ndarray  # (H, W) uint8, 0 = background, label + 1 otherwise
    # Flat polygon [x0, y0, x1, y1, ...] when the instance is fully visible and
    # hole-free (it decodes exactly to its mask), else None (use RLE).
    polygons: list[list[float] | None] = field(default_factory=list)

    @property
    def areas(self) -> list[int]:
        return [int(m.sum()) for m in self.masks]

    @property
    def dominant(self) -> int:
        """Label of the instance with the largest visible area."""
        return self.labels[int(np.argmax(self.areas))]


def _hw(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    h, w = int(h), int(w)
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"image size must be at least {MIN_SIDE}x{MIN_SIDE}, got {h}x{w}")
    return h, w


def _min_area(h: int, w: int) -> int:
    return max(6, int(0.003 * h * w))


def _try_scene(
    rng: np.random.Generator, h: int, w: int, dominant: int | None, main_area: tuple[float, float] = (0.10, 0.22),
    style: str = "cluttered", max_objects: int = 4, other_area: tuple[float, float] = (0.012, 0.05),
) -> Scene:
    n = min(int(rng.integers(1, 5)), max_objects)
    first = int(rng.integers(NUM_CLASSES)) if dominant is None else dominant
    labels = [first] + [int(x) for x in rng.integers(NUM_CLASSES, size=n - 1)]
    # One clearly large object plus smaller distractors: usually an obvious
    # winner, but occlusion and similar sizes keep it from being trivial.
    areas = [rng.uniform(*main_area)] + list(rng.uniform(*other_area, size=n - 1))
    objs = [_place(rng, lab, a * h * w, h, w) for lab, a in zip(labels, areas, strict=True)]
    objs = [objs[i] for i in rng.permutation(n)]  # random z-order

    # Visible = own mask minus everything drawn above it. Dropping a tiny
    # instance can only enlarge those below it, so one pass is enough.
    min_area = _min_area(h, w)
    kept: list[_Placed] = []
    covered = np.zeros((h, w), dtype=bool)
    for o in reversed(objs):
        if (o.mask & ~covered).sum() >= min_area:
            kept.append(o)
            covered |= o.mask
    kept.reverse()

    plain = style == "plain"
    image = _background(rng, h, w, ("gradient",) if plain else _BG_KINDS)
    bg_mean = image.reshape(-1, 3).mean(axis=0)
    semantic = np.zeros((h, w), dtype=np.uint8)
    for o in kept:
        tex = _foreground(rng, h, w, bg_mean, ("plain",) if plain else _FG_KINDS)
        image[o.mask] = tex[o.mask]
        semantic[o.mask] = o.label + 1

    masks, polygons = [], []
    above = np.zeros((h, w), dtype=bool)
    for o in reversed(kept):
        vis = o.mask & ~above
        above |= o.mask
        masks.append(vis)
        whole = o.hole is None and bool(np.array_equal(vis, o.mask))
        polygons.append(o.outer.reshape(-1).tolist() if whole else None)
    masks.reverse()
    polygons.reverse()
    return Scene(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        masks=masks,
        labels=[o.label for o in kept],
        semantic=semantic,
        polygons=polygons,
    )


def render_scene(
    rng: np.random.Generator,
    size: Size,
    *,
    dominant: int | None = None,
    main_area: tuple[float, float] = (0.10, 0.22),
    style: str = "cluttered",
    max_objects: int = 4,
    other_area: tuple[float, float] = (0.012, 0.05),
) -> Scene:
    """Render one scene of 1-``max_objects`` (at most 4) shapes; ``size`` is an int or ``(H, W)``.

    If ``dominant`` (an index into SHAPES) is given, scenes are redrawn from
    ``rng`` until the largest visible instance has that class.  ``main_area`` is
    the range of the first (largest) object's area as a fraction of the image,
    ``other_area`` that of the others; ``style`` is one of STYLES (textures).
    """
    h, w = _hw(size)
    if dominant is not None and not 0 <= dominant < NUM_CLASSES:
        raise ValueError(f"dominant must be in [0, {NUM_CLASSES}), got {dominant}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    for _ in range(100):
        scene = _try_scene(rng, h, w, dominant, main_area, style, max_objects, other_area)
        if scene.labels and (dominant is None or scene.dominant == dominant):
            return scene
    raise RuntimeError("could not render a scene with the requested dominant class")


def _stream(seed: int, task: str, split: str, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _STREAM[task], _SPLIT[split], *extra])


# --------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------


def _prepare(path: Path, overwrite: bool) -> Path:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_jpg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="JPEG", quality=JPEG_QUALITY)


def _check_count(name: str, n: int) -> int:
    if int(n) != n or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    return int(n)


# ImageNet photos are object-centric: the labelled object fills a good part of the frame.
IMAGENET_MAIN_AREA = (0.22, 0.40)
# plain style: one object, larger (a 64-px frame at 8-px patches gives it ~20-35 patches, not 14-26)
IMAGENET_PLAIN_AREA = (0.30, 0.55)
# plain COCO / ADE scenes: 1-3 objects, none a distractor of a patch or two (at 64 px / patch 8 the cluttered
# scenes' 1-5 % objects cover 1-3 patches, too few to read a shape from), all large enough to classify
SCENE_PLAIN_MAIN_AREA = (0.14, 0.28)
SCENE_PLAIN_OTHER_AREA = (0.06, 0.14)


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
    h, w = _hw(size)
    counts = {"train": _check_count("n_train_per_class", n_train_per_class),
              "val": _check_count("n_val_per_class", n_val_per_class)}
    out = _prepare(Path(root) / "imagenet", overwrite)
    for split, n in counts.items():
        for label, name in enumerate(SHAPES):
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            # One stream per class: per-class counts don't shift other classes.
            rng = _stream(seed, "imagenet", split, label)
            for i in range(n):
                scene = (render_scene(rng, (h, w), dominant=label, main_area=IMAGENET_PLAIN_AREA, style=style, max_objects=1)
                         if style == "plain" else render_scene(rng, (h, w), dominant=label, main_area=IMAGENET_MAIN_AREA))
                _save_jpg(scene.image, d / f"{name}_{i:05d}.jpg")
    return out


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
            rle = _mask_utils().encode(np.asfortranarray(m.astype(np.uint8)))
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


def _scenes(seed: int, split: str, n: int, hw: tuple[int, int], style: str = "cluttered"):
    # COCO and ADE share this stream: image i of a split is the same scene in
    # both layouts, which lets tests cross-check them file by file.
    rng = _stream(seed, "scenes", split)
    sizes = {"main_area": SCENE_PLAIN_MAIN_AREA, "other_area": SCENE_PLAIN_OTHER_AREA, "max_objects": 3} if style == "plain" else {}
    for i in range(n):
        yield i, render_scene(rng, hw, style=style, **sizes)


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
    hw = _hw(size)
    counts = {"train": _check_count("n_train", n_train), "val": _check_count("n_val", n_val)}
    out = _prepare(Path(root) / "coco", overwrite)
    (out / "annotations").mkdir()
    for split, n in counts.items():
        img_dir = out / f"{split}2017"
        img_dir.mkdir()
        images, anns = [], []
        for i, scene in _scenes(seed, split, n, hw, style):
            image_id = i + 1
            fname = f"{image_id:012d}.jpg"
            _save_jpg(scene.image, img_dir / fname)
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
    hw = _hw(size)
    counts = {"train": _check_count("n_train", n_train), "val": _check_count("n_val", n_val)}
    out = _prepare(Path(root) / "ade", overwrite)
    base = out / ADE_DIRNAME
    for split, n in counts.items():
        sub = {"train": "training", "val": "validation"}[split]
        img_dir, ann_dir = base / "images" / sub, base / "annotations" / sub
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for i, scene in _scenes(seed, split, n, hw, style):
            stem = f"ADE_{split}_{i + 1:08d}"
            _save_jpg(scene.image, img_dir / f"{stem}.jpg")
            Image.fromarray(scene.semantic).save(ann_dir / f"{stem}.png", format="PNG")
    return out


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


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return n


def _tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"bad --tasks {text!r} (choose from {','.join(TASKS)})")
    return tasks


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="make_synthetic.py", description="Generate the synthetic shapes world (ImageNet / COCO / ADE20K layouts).")
    p.add_argument("root", type=Path, help="output folder (imagenet/, coco/, ade/ go inside)")
    p.add_argument("--size", type=size_type(MIN_SIDE), default=(64, 64), help="N or HxW (default 64)")
    p.add_argument("--n-train", type=_count, default=40,
                   help="train images: per class for imagenet, total for coco/ade (default 40)")
    p.add_argument("--n-val", type=_count, default=10,
                   help="val images: per class for imagenet, total for coco/ade (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", type=_tasks, default=TASKS, help="comma list (default imagenet,coco,ade)")
    p.add_argument("--force", action="store_true", help="write into a non-empty ROOT (replaces task folders)")
    p.add_argument("--style", choices=STYLES, default="cluttered",
                   help="cluttered: textures + distractors (default); plain: flat colours on gradients, one larger "
                        "object per ImageNet image")
    return p


def _summary(paths: dict[str, Path]) -> list[str]:
    lines = []
    if "imagenet" in paths:
        p = paths["imagenet"]
        lines.append(f"  imagenet  {p}")
        for split in ("train", "val"):
            per = {c: len(list((p / split / c).glob("*.jpg"))) for c in SHAPES}
            lines.append(f"    {split:<10} {sum(per.values()):>5} images  "
                         + " ".join(f"{c}={n}" for c, n in per.items()))
    if "coco" in paths:
        p = paths["coco"]
        lines.append(f"  coco      {p}")
        for split in ("train", "val"):
            with open(p / "annotations" / f"instances_{split}2017.json") as f:
                d = json.load(f)
            per = {c["name"]: 0 for c in d["categories"]}
            names = {c["id"]: c["name"] for c in d["categories"]}
            for a in d["annotations"]:
                per[names[a["category_id"]]] += 1
            lines.append(f"    {split + '2017':<10} {len(d['images']):>5} images, "
                         f"{len(d['annotations'])} instances  " + " ".join(f"{c}={n}" for c, n in per.items()))
    if "ade" in paths:
        p = paths["ade"] / ADE_DIRNAME
        lines.append(f"  ade       {p}")
        for sub in ("training", "validation"):
            n = len(list((p / "images" / sub).glob("*.jpg")))
            lines.append(f"    {sub:<10} {n:>5} images (+ label PNGs, 0=background, 1..{len(SHAPES)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m maecore.synthetic ROOT [--size N|HxW] [--n-train N] [--n-val N] [--seed S] [--tasks LIST] [--force]``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    root: Path = args.root
    if root.exists() and not root.is_dir():
        parser.error(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not args.force:
        parser.error(f"{root} is not empty (use --force to overwrite)")
    t0 = time.perf_counter()
    try:
        paths = make_world(root, size=args.size, n_train=args.n_train, n_val=args.n_val,
                           seed=args.seed, tasks=args.tasks, overwrite=args.force, style=args.style)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    h, w = args.size
    print(f"synthetic world written to {root} (size {h}x{w}, seed {args.seed}, "
          f"{time.perf_counter() - t0:.2f}s)")
    print("\n".join(_summary(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
