"""The shapes: the class list, each shape's polygon, and its placement and rasterisation in a frame.

Shapes are rasterised with pycocotools' own polygon rasteriser, so a polygon written to the COCO json decodes
(``annToMask``) to exactly the rendered mask.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import ModuleType

import numpy as np

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


def mask_api() -> ModuleType:
    """pycocotools' mask API, imported on first use: importing this module (every test module's collection
    does, ``pytest -m cuda`` on a machine without pycocotools included) needs no pycocotools."""
    from pycocotools import mask

    return mask


def _raster(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    mask_utils = mask_api()
    rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    # pycocotools' decode trips a harmless numpy-2 "copy keyword" warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)[:, :, 0].astype(bool)


@dataclass
class Placed:
    """A shape placed in the frame, before occlusion."""

    label: int
    outer: np.ndarray  # (N, 2) image coords, rounded to 0.01 px
    hole: np.ndarray | None
    mask: np.ndarray  # full (unoccluded) mask


def place(rng: np.random.Generator, label: int, area: float, h: int, w: int) -> Placed:
    """Shape ``label`` of ``area`` pixels (less where it would not fit), rotated, stretched and placed wholly in the frame."""
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
    return Placed(label, outer, hole, mask)
