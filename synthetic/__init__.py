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

Modules: ``shapes`` (class list, polygons, rasterising), ``scene`` (textures,
occlusion, ``render_scene``), ``imagenet`` / ``coco`` / ``ade`` (one layout
writer each, sharing ``common``), ``world`` (``make_world``), ``__main__``
(the command line; ``tools/make_synthetic.py`` runs the same)::

    python -m synthetic data/synth --size 64 --n-train 40 --n-val 10

A fixture for the tests, the demo, the studies and the data benchmark, kept
out of the toolkit's core: ``maecore`` never imports it.
"""

from synthetic.ade import ADE_DIRNAME, make_ade20k
from synthetic.coco import coco_categories, make_coco, scene_annotations
from synthetic.common import JPEG_QUALITY, TASKS
from synthetic.imagenet import IMAGENET_MAIN_AREA, IMAGENET_PLAIN_AREA, make_imagenet
from synthetic.scene import MIN_SIDE, STYLES, Scene, Size, render_scene
from synthetic.shapes import NUM_CLASSES, SHAPES
from synthetic.world import make_world

__all__ = [
    "ADE_DIRNAME", "IMAGENET_MAIN_AREA", "IMAGENET_PLAIN_AREA", "JPEG_QUALITY", "MIN_SIDE", "NUM_CLASSES", "SHAPES",
    "STYLES", "TASKS", "Scene", "Size", "coco_categories", "make_ade20k", "make_coco", "make_imagenet", "make_world",
    "render_scene", "scene_annotations",
]
