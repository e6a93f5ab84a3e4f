"""Tests for the synthetic shapes world (the synthetic package + tools/make_synthetic.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# pycocotools is optional where only the CUDA tests run (the GPU image lacks it): skip, don't break collection
pytest.importorskip("pycocotools")

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from synthetic import (
    ADE_DIRNAME,
    NUM_CLASSES,
    SHAPES,
    make_coco,
    make_imagenet,
    make_world,
    render_scene,
)
from tests import ROOT as REPO
from tests import forkserver

CLI = REPO / "tools" / "make_synthetic.py"
SIZE = 32
N_TRAIN, N_VAL = 3, 2  # per class for ImageNet, per split for COCO/ADE

# pycocotools' decode under numpy 2 warns about the `copy` keyword; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("world"), size=SIZE, n_train=N_TRAIN, n_val=N_VAL, seed=0)


def test_class_list() -> None:
    assert len(set(SHAPES)) == NUM_CLASSES >= 5
    assert SHAPES[:5] == ("circle", "square", "triangle", "star", "ring")


def test_determinism(tmp_path: Path, world: dict[str, Path]) -> None:
    again = make_world(tmp_path / "a", size=SIZE, n_train=N_TRAIN, n_val=N_VAL, seed=0)
    for task, path in world.items():
        assert _files(path) == _files(again[task]), task
    other = make_coco(tmp_path / "b", N_TRAIN, N_VAL, SIZE, seed=1)
    assert _files(other) != _files(world["coco"])


def test_render_scene_determinism() -> None:
    a = render_scene(np.random.default_rng(7), (40, 56))
    b = render_scene(np.random.default_rng(7), (40, 56))
    assert np.array_equal(a.image, b.image) and a.labels == b.labels
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    c = render_scene(np.random.default_rng(8), (40, 56))
    assert not np.array_equal(a.image, c.image)


def test_scene_invariants() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        s = render_scene(rng, 48)
        assert s.image.shape == (48, 48, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.labels) <= 4
        assert len(s.masks) == len(s.labels) == len(s.polygons)
        # Visible masks are disjoint, non-empty, and paint exactly the semantic map.
        rebuilt = np.zeros((48, 48), dtype=np.int64)
        for m, lab, poly in zip(s.masks, s.labels, s.polygons, strict=True):
            assert m.dtype == bool and m.any()
            assert not rebuilt[m].any()
            rebuilt[m] = lab + 1
            if poly is not None:  # a written polygon must decode to the exact mask
                dec = mask_utils.decode(mask_utils.frPyObjects([poly], 48, 48))[:, :, 0]
                assert np.array_equal(dec.astype(bool), m)
            if SHAPES[lab] == "ring":
                assert poly is None  # holes need RLE
        assert np.array_equal(rebuilt, s.semantic)
        assert s.dominant == s.labels[int(np.argmax([m.sum() for m in s.masks]))]


def test_dominant_request() -> None:
    rng = np.random.default_rng(1)
    for label in range(NUM_CLASSES):
        assert render_scene(rng, 32, dominant=label).dominant == label


def test_imagenet_layout(world: dict[str, Path]) -> None:
    root = world["imagenet"]
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(SHAPES)
        for c in SHAPES:
            files = sorted((root / split / c).glob("*.jpg"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert im.format == "JPEG" and im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_coco_annotations(world: dict[str, Path]) -> None:
    root = world["coco"]
    kinds = set()
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        assert sorted(coco.getCatIds()) == list(range(1, NUM_CLASSES + 1))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
        assert len(coco.getImgIds()) == n
        for img in coco.loadImgs(coco.getImgIds()):
            assert (root / f"{split}2017" / img["file_name"]).is_file()
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 4
            for a in anns:
                m = coco.annToMask(a)
                assert m.shape == (img["height"], img["width"])
                assert m.sum() > 0 and m.sum() == a["area"] and a["iscrowd"] == 0
                x, y, w, h = a["bbox"]
                ys, xs = np.nonzero(m)
                assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
                assert isinstance(a["bbox"][0], float)
                segm = a["segmentation"]
                if isinstance(segm, dict):  # compressed RLE with str counts
                    assert isinstance(segm["counts"], str) and segm["size"] == list(m.shape)
                kinds.add(type(segm).__name__)
    assert kinds == {"list", "dict"}  # both polygons and RLE occur


def test_ade_matches_coco(world: dict[str, Path]) -> None:
    # COCO and ADE render the same scenes, so the label PNGs must equal the
    # semantic maps rebuilt from the COCO instance masks.
    base = world["ade"] / ADE_DIRNAME
    for split, sub in (("train", "training"), ("val", "validation")):
        coco = COCO(str(world["coco"] / "annotations" / f"instances_{split}2017.json"))
        pngs = sorted((base / "annotations" / sub).glob("*.png"))
        jpgs = sorted((base / "images" / sub).glob("*.jpg"))
        assert [p.stem for p in pngs] == [p.stem for p in jpgs] != []
        assert pngs[0].name == f"ADE_{split}_00000001.png"
        for png, img_id in zip(pngs, sorted(coco.getImgIds()), strict=True):
            with Image.open(png) as im:
                assert im.mode == "L"
                sem = np.asarray(im)
            assert sem.shape == (SIZE, SIZE) and sem.max() <= NUM_CLASSES
            rebuilt = np.zeros_like(sem)
            for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
                rebuilt[coco.annToMask(a).astype(bool)] = a["category_id"]
            assert np.array_equal(sem, rebuilt)


def test_non_square(tmp_path: Path) -> None:
    paths = make_world(tmp_path, size=(24, 40), n_train=1, n_val=1, seed=3)
    with Image.open(next((paths["imagenet"] / "train" / "star").glob("*.jpg"))) as im:
        assert im.size == (40, 24)
    coco = COCO(str(paths["coco"] / "annotations" / "instances_train2017.json"))
    img = coco.loadImgs(coco.getImgIds())[0]
    assert (img["height"], img["width"]) == (24, 40)
    for a in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(a).sum() == a["area"]
    png = next((paths["ade"] / ADE_DIRNAME / "annotations" / "training").glob("*.png"))
    assert np.asarray(Image.open(png)).shape == (24, 40)


def test_refuses_non_empty(tmp_path: Path) -> None:
    make_imagenet(tmp_path, 1, 0, 16, 0)
    with pytest.raises(FileExistsError):
        make_imagenet(tmp_path, 1, 0, 16, 0)
    make_imagenet(tmp_path, 1, 0, 16, 0, overwrite=True)
    with pytest.raises(ValueError):
        render_scene(np.random.default_rng(0), (8, 64))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: the tool imports this checkout's maecore, not whichever copy is installed
    return forkserver.run([sys.executable, str(CLI), *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


def test_cli(tmp_path: Path) -> None:
    root = tmp_path / "out"
    ok = _cli(str(root), "--size", "24x32", "--n-train", "1", "--n-val", "1", "--tasks", "coco,ade")
    assert ok.returncode == 0, ok.stderr
    assert "coco" in ok.stdout and (root / "coco" / "annotations" / "instances_val2017.json").is_file()
    assert not (root / "imagenet").exists()

    again = _cli(str(root), "--size", "24")
    assert again.returncode == 2
    assert again.stderr.startswith("error:") and len(again.stderr.strip().splitlines()) == 1
    assert "Traceback" not in again.stderr

    forced = _cli(str(root), "--size", "24", "--n-train", "1", "--n-val", "0", "--tasks", "ade", "--force")
    assert forced.returncode == 0, forced.stderr


@pytest.mark.parametrize("args", [["--size", "abc"], ["--size", "0x32"], ["--size", "32x"],
                                  ["--n-train", "-1"], ["--tasks", "imagenet,mnist"]])
def test_cli_bad_args(tmp_path: Path, args: list[str]) -> None:
    res = _cli(str(tmp_path / "new"), *args)
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_plain_style_one_flat_object_per_imagenet_image(tmp_path) -> None:
    """--style plain: one object per ImageNet image, a flat fill (few colours inside its mask), class = shape;
    the default (cluttered) files are unchanged by the option's existence (same seed -> same bytes)."""
    from synthetic import STYLES
    from synthetic.__main__ import main

    assert STYLES == ("cluttered", "plain")
    rng = np.random.default_rng(3)
    for label in range(NUM_CLASSES):
        s = render_scene(rng, 64, dominant=label, main_area=(0.30, 0.55), style="plain", max_objects=1)
        assert s.labels == [label] and s.masks[0].sum() >= 0.25 * 64 * 64
        inside = s.image[s.masks[0]].astype(int)
        assert np.ptp(inside, axis=0).max() <= 2  # flat colour (no texture) before JPEG
    assert main([str(tmp_path / "w"), "--tasks", "imagenet", "--n-train", "1", "--n-val", "1", "--style", "plain"]) == 0
    assert len(list((tmp_path / "w" / "imagenet" / "train").rglob("*.jpg"))) == NUM_CLASSES
    with pytest.raises(ValueError, match="style"):
        render_scene(rng, 64, style="fancy")


def test_plain_scenes_hold_one_to_three_readable_objects(tmp_path) -> None:
    """--style plain for COCO / ADE: 1-3 flat-coloured objects, none a 1-3-patch distractor (every visible
    instance keeps >= 2 % of the frame unless occluded), and the two layouts still show the same scenes."""
    from synthetic import make_world

    w = make_world(tmp_path / "w", size=64, n_train=24, n_val=2, seed=0, tasks=("coco", "ade"), style="plain")
    coco = COCO(str(w["coco"] / "annotations" / "instances_train2017.json"))
    per_image = [coco.getAnnIds(imgIds=[i]) for i in coco.getImgIds()]
    assert all(1 <= len(a) <= 3 for a in per_image) and max(map(len, per_image)) >= 2
    whole = [a for a in coco.loadAnns(coco.getAnnIds()) if isinstance(a["segmentation"], list)]  # unoccluded
    assert whole and min(a["area"] for a in whole) >= 0.04 * 64 * 64
    cluttered = make_world(tmp_path / "c", size=64, n_train=24, n_val=2, seed=0, tasks=("coco",))
    small = COCO(str(cluttered["coco"] / "annotations" / "instances_train2017.json"))
    assert min(a["area"] for a in small.loadAnns(small.getAnnIds())) < 0.04 * 64 * 64  # the default keeps distractors


def test_the_package_stands_apart_from_the_toolkit() -> None:
    """The world generator is a fixture, not core: it (its command line included) loads no part of the project
    but maecore's command-line helpers, so the core and the tasks can change without it."""
    code = ("import sys, synthetic, synthetic.__main__; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'maecore', 'pretrain', 'classification', 'detection', 'segmentation', 'pipeline'})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert p.returncode == 0, p.stderr
    assert set(p.stdout.split()) <= {"maecore", "maecore.cli", "maecore.errors"}, p.stdout
