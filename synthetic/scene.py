"""Scenes: 1-4 textured shapes on a textured background, later ones occluding earlier ones (each instance
mask is its *visible* part).  Everything is drawn from the caller's RNG: same stream, same scene."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from synthetic.shapes import NUM_CLASSES, Placed, place

MIN_SIDE = 16

_BG_KINDS = ("gradient", "noise", "stripes")
_FG_KINDS = ("plain", "stripes", "checker", "noise")
# "cluttered": textured objects and backgrounds, distractor shapes (the default);
# "plain": flat-coloured objects on gradient backgrounds; the ImageNet split
# then holds one larger object per image.  Both decide the class by shape only
# (colours are drawn independently of it).
STYLES: tuple[str, ...] = ("cluttered", "plain")

Size = int | tuple[int, int]


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


def image_hw(size: Size) -> tuple[int, int]:
    """``(H, W)`` of an int or ``(H, W)`` size; ValueError below MIN_SIDE."""
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
    objs = [place(rng, lab, a * h * w, h, w) for lab, a in zip(labels, areas, strict=True)]
    objs = [objs[i] for i in rng.permutation(n)]  # random z-order

    # Visible = own mask minus everything drawn above it. Dropping a tiny
    # instance can only enlarge those below it, so one pass is enough.
    min_area = _min_area(h, w)
    kept: list[Placed] = []
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
    h, w = image_hw(size)
    if dominant is not None and not 0 <= dominant < NUM_CLASSES:
        raise ValueError(f"dominant must be in [0, {NUM_CLASSES}), got {dominant}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    for _ in range(100):
        scene = _try_scene(rng, h, w, dominant, main_area, style, max_objects, other_area)
        if scene.labels and (dominant is None or scene.dominant == dominant):
            return scene
    raise RuntimeError("could not render a scene with the requested dominant class")
