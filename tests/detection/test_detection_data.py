"""detection.data: COCO reading (polygons and RLE, crowd, empty, bad inputs) and LSJ consistency."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

# pycocotools is optional where only the CUDA tests run (the GPU image lacks it): skip, don't break collection
pytest.importorskip("pycocotools")

from pycocotools import mask as mask_utils

from detection.data import LSJ, CocoInstances, ann_to_mask, build_datasets, collate, load_coco, masks_to_boxes
from maecore.errors import UserError


@pytest.fixture(scope="module")
def coco64(tmp_path_factory):
    from synthetic import make_world

    root = tmp_path_factory.mktemp("detworld")
    return make_world(root, size=64, n_train=12, n_val=4, seed=1, tasks=("coco",))["coco"]


def _copy_world(src, dst, edit):
    """A copy of the synthetic COCO layout whose train json is changed by ``edit(data)``."""
    shutil.copytree(src, dst)
    p = dst / "annotations" / "instances_train2017.json"
    data = json.loads(p.read_text())
    edit(data)
    p.write_text(json.dumps(data))
    return dst


def test_polygons_and_rle_are_read_like_pycocotools(coco64):
    ds = CocoInstances(coco64 / "train2017", coco64 / "annotations" / "instances_train2017.json", train=True)
    kinds = {type(a["segmentation"]).__name__ for a in ds.coco.dataset["annotations"]}
    assert kinds == {"list", "dict"}  # the synthetic world writes both polygons and compressed RLE
    for i in range(len(ds)):
        img, t = ds[i]
        anns = ds.coco.imgToAnns[ds.ids[i]]
        assert img.shape == (3, 64, 64) and len(t["labels"]) == len(anns) == t["masks"].shape[0]
        for m, a in zip(t["masks"], anns):
            np.testing.assert_array_equal(m.numpy(), ds.coco.annToMask(a))
        # the annotation box is the tight box of the mask (COCO pixel-edge convention)
        torch.testing.assert_close(masks_to_boxes(t["masks"]), t["boxes"])


def test_uncompressed_rle_is_read():
    m = np.zeros((20, 30), dtype=np.uint8)
    m[3:9, 5:25] = 1
    counts, prev, run = [], 0, 0
    for v in m.flatten(order="F"):  # uncompressed RLE: run lengths in column-major order, starting with 0s
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    np.testing.assert_array_equal(ann_to_mask({"size": [20, 30], "counts": counts}, 20, 30), m)
    rle = mask_utils.encode(np.asfortranarray(m))
    np.testing.assert_array_equal(ann_to_mask(rle, 20, 30), m)


def test_lsj_keeps_boxes_and_masks_consistent(coco64):
    size = 64
    ds = CocoInstances(coco64 / "train2017", coco64 / "annotations" / "instances_train2017.json", transform=LSJ(size), train=True)
    raw = CocoInstances(coco64 / "train2017", coco64 / "annotations" / "instances_train2017.json", train=True)
    n_checked = n_uncropped = 0
    for seed in range(24):
        torch.manual_seed(seed)
        i = seed % len(ds)
        img, t = ds[i]
        assert img.shape == (3, size, size) and t["masks"].shape[1:] == (size, size)
        assert t["masks"].shape[0] == len(t["labels"]) == len(t["boxes"]) <= len(raw[i][1]["labels"])
        assert all(bool(m.any()) for m in t["masks"])  # instances emptied by the crop are gone
        # a mask's box equals its box after the transform
        torch.testing.assert_close(masks_to_boxes(t["masks"]), t["boxes"])
        # and that box agrees with the geometrically moved original box: equal up to the resampling
        # when nothing was cropped, inside it (up to resampling) when the crop cut the object
        g = t["geometric_boxes"]
        inside = (t["boxes"][:, :2] >= g[:, :2] - 1.5).all() and (t["boxes"][:, 2:] <= g[:, 2:] + 1.5).all()
        assert inside, (t["boxes"], g)
        cropped = (g[:, 0] <= 0) | (g[:, 1] <= 0) | (g[:, 2] >= size) | (g[:, 3] >= size)
        if (~cropped).any():
            scale = max(float((g[:, 2] - g[:, 0]).max()), 1.0) / 64
            tol = 1.0 + 2 * max(scale, 0.5)
            assert (t["boxes"][~cropped] - g[~cropped]).abs().max() <= tol, (t["boxes"], g)
            n_uncropped += 1
        n_checked += len(t["boxes"])
    assert n_checked > 20 and n_uncropped > 3


def test_lsj_flip_scale_crop_exact():
    """A 40x60 image with one rectangle, flipped, scale 1 of the target (long side 60 -> 64): exact geometry."""
    img = torch.zeros(3, 40, 60)
    masks = torch.zeros(1, 40, 60, dtype=torch.uint8)
    masks[0, 10:20, 5:15] = 1
    t = {"boxes": torch.tensor([[5.0, 10.0, 15.0, 20.0]]), "labels": torch.tensor([3]), "masks": masks, "image_id": 1}
    out_img, out = LSJ(64, train=True, scale=(1.0, 1.0), flip=1.0)(img, t)
    # scale = 64/60 fits the long side; flipped box x: 60-15..60-5 = 45..55 -> *64/60
    g = out["geometric_boxes"][0]
    torch.testing.assert_close(g, torch.tensor([48.0, 10.75, 58.6667, 21.5]), atol=1e-3, rtol=0)
    assert out_img.shape == (3, 64, 64) and out["masks"].shape == (1, 64, 64)
    assert (out["boxes"][0] - g).abs().max() <= 1.0
    # padding rows (43..63) carry no mask and the mean colour
    assert not out["masks"][0, 43:].any()
    torch.testing.assert_close(out_img[:, 50, 10], torch.tensor([0.485, 0.456, 0.406]))


def test_lsj_test_view_keeps_scale_for_mapping_back():
    img = torch.rand(3, 50, 80)
    t = {"boxes": torch.tensor([[8.0, 5.0, 40.0, 45.0]]), "labels": torch.tensor([1]), "image_id": 7,
         "masks": torch.zeros(1, 50, 80, dtype=torch.uint8)}
    out_img, out = LSJ(64, train=False)(img, t)
    assert out_img.shape == (3, 64, 64)
    assert out["orig_size"].tolist() == [50, 80] and out["content_size"].tolist() == [40, 64]
    torch.testing.assert_close(out["boxes"], t["boxes"] * 0.8)


def test_crowd_degenerate_and_empty_images(coco64, tmp_path):
    def edit(d):
        first = d["images"][0]["id"]
        anns = [a for a in d["annotations"] if a["image_id"] != first]  # image 1 without annotations
        anns[0]["iscrowd"] = 1
        anns[1]["bbox"] = [3.0, 4.0, 0.0, 5.0]  # degenerate: zero width
        anns[2]["segmentation"] = []  # unreadable segmentation
        d["annotations"] = anns
    root = _copy_world(coco64, tmp_path / "w", edit)
    ds = CocoInstances(root / "train2017", root / "annotations" / "instances_train2017.json", transform=LSJ(64), train=True)
    assert ds.skipped["degenerate box"] == ds.skipped["crowd region (ignored)"] == ds.skipped["unreadable segmentation"] == 1
    n_ann = len(ds.coco.dataset["annotations"])
    assert ds.num_instances == n_ann - 3
    assert ds.num_empty >= 1 and "without instances" in ds.summary()
    img, t = ds[0]  # the image without annotations still yields a sample
    assert img.shape == (3, 64, 64) and t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 64, 64)
    images, targets = collate([ds[i] for i in range(3)])
    assert len(images) == len(targets) == 3


def test_missing_images_are_skipped_and_bad_files_are_one_line_errors(coco64, tmp_path):
    def edit(d):
        d["images"].append({"id": 999, "file_name": "not_there.jpg", "height": 64, "width": 64})
        d["annotations"].append({"id": 9999, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5],
                                 "segmentation": [[1, 1, 6, 1, 6, 6]], "area": 25, "iscrowd": 0})
    root = _copy_world(coco64, tmp_path / "w", edit)
    ds = CocoInstances(root / "train2017", root / "annotations" / "instances_train2017.json", train=True)
    assert ds.skipped["missing image file"] == 1 and 999 not in ds.ids and len(ds) == 12

    with pytest.raises(UserError, match="none of its"):
        CocoInstances(tmp_path, root / "annotations" / "instances_train2017.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a JSON file"):
        load_coco(bad)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(UserError, match="categories"):
        load_coco(bad)
    with pytest.raises(UserError, match="not found"):
        load_coco(tmp_path / "missing.json")
    # an empty annotation list is a valid (if useless) dataset
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "000000000001.jpg", "height": 64, "width": 64}],
                               "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    ds = CocoInstances(root / "train2017", bad, transform=LSJ(64), train=True)
    assert len(ds) == 1 and ds.num_instances == 0 and ds[0][1]["labels"].numel() == 0
    with pytest.raises(UserError, match="data directory not found"):
        build_datasets(tmp_path / "nope", 64)
