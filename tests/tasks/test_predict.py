"""``python -m TASK predict``: tiny checkpoints trained for a couple of steps on the synthetic world, then
predictions on its val images plus an image of another size, a non-image in the folder and bad inputs."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COMMON = ["--num_workers", "0", "--no_progress", "--amp", "none", "--device", "cpu"]


def _quiet(fn, argv):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(argv)


@pytest.fixture(scope="module")
def world(tiny_world) -> dict[str, Path]:
    return tiny_world


@pytest.fixture(scope="module")
def coco_x10(world, tmp_path_factory) -> Path:
    """The synthetic COCO world with category ids 10, 20, …, 70: predictions must carry the dataset's ids."""
    root = tmp_path_factory.mktemp("coco_x10") / "coco"
    shutil.copytree(world["coco"], root)
    for split in ("train", "val"):
        f = root / "annotations" / f"instances_{split}2017.json"
        d = json.loads(f.read_text())
        for c in d["categories"]:
            c["id"] *= 10
        for a in d["annotations"]:
            a["category_id"] *= 10
        f.write_text(json.dumps(d))
    return root


@pytest.fixture(scope="module")
def cls_ckpt(world, tmp_path_factory) -> Path:
    from classification.train import main

    out = tmp_path_factory.mktemp("cls_run")
    _quiet(main, ["--model", "vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32", "--data_path",
                  str(world["imagenet"]), "--output_dir", str(out), "--batch_size", "8", "--epochs", "1", "--max_steps", "2",
                  *COMMON])
    return out / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def det_ckpt(coco_x10, tmp_path_factory) -> Path:
    from detection.train import main

    out = tmp_path_factory.mktemp("det_run")
    _quiet(main, ["--data_path", str(coco_x10), "--output_dir", str(out), "--model", "tiny", "--embed_dim", "64", "--depth",
                  "2", "--num_heads", "2", "--patch_size", "16", "--input_size", "64", "--pretrain_img_size", "64",
                  "--window_size", "2", "--global_blocks", "1", "--out_channels", "32", "--fc_dim", "64", "--anchor_sizes",
                  "8", "16", "32", "64", "128", "--rpn_pre_nms_top_n_test", "100", "--rpn_post_nms_top_n_test", "50",
                  "--detections_per_img", "20", "--score_thresh", "0.0", "--epochs", "1", "--batch_size", "2",
                  "--max_steps", "2", "--vis_images", "0", *COMMON])
    return out / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def seg_ckpt(world, tmp_path_factory) -> Path:
    from segmentation.train import main

    out = tmp_path_factory.mktemp("seg_run")
    _quiet(main, ["--recipe", "demo", "--data_path", str(world["ade"]), "--output_dir", str(out), "--model", "tiny",
                  "--embed_dim", "64", "--depth", "4", "--num_heads", "2", "--patch_size", "8", "--input_size", "32",
                  "--channels", "16", "--aux_channels", "8", "--batch_size", "4", "--max_iters", "2", "--warmup_iters", "0",
                  "--num_vis", "0", "--eval_max_images", "1", *COMMON])
    return out / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def inputs(world, tmp_path_factory) -> Path:
    """Two val images of each world, an image of another size (48x40, RGBA), a text file, a nested folder."""
    d = tmp_path_factory.mktemp("inputs")
    for f in sorted((world["imagenet"] / "val").rglob("*.*"))[:2]:
        shutil.copy(f, d / f"cls_{f.name}")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 4), dtype=np.uint8)).save(d / "other_size.png")
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (70, 30, 3), dtype=np.uint8)).save(d / "sub" / "tall.jpg")
    return d


def run_cli(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    import importlib

    cli = importlib.import_module(f"{module}.predict").cli
    try:
        cli([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _sizes(folder: Path) -> dict[str, tuple[int, int]]:
    sizes = {}
    for f in sorted(folder.rglob("*")):
        if f.suffix in (".png", ".jpg", ".JPEG", ".jpeg"):
            with Image.open(f) as im:
                sizes[f.stem] = im.size
    return sizes


# ---- classification ---------------------------------------------------------------------------------
def test_classification_topk_json_lines(cls_ckpt, inputs, tmp_path, capsys):
    code, out, err = run_cli("classification", [cls_ckpt, inputs, "-o", tmp_path, "--topk", "3", "--batch_size", "2", *COMMON],
                             capsys)
    assert code == 0, err
    skipped = [ln for ln in err.splitlines() if "skipped" in ln]
    assert len(skipped) == 1 and "notes.txt" in skipped[0]  # the text file: one line, not fatal
    assert "4 images" in out and "1 file skipped" in out
    recs = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and {Path(r["image"]).name for r in recs} >= {"other_size.png", "tall.jpg"}
    classes = json.loads((cls_ckpt.parent / "args.json").read_text())["classes"]
    for r in recs:
        scores = [t["score"] for t in r["topk"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 <= scores[-1] <= scores[0] <= 1
        assert all(t["label"] in classes for t in r["topk"])
    # --topk above the class count is capped at it; the scores are a distribution over all the classes
    code, _, _ = run_cli("classification", [cls_ckpt, inputs / "other_size.png", "-o", tmp_path / "all", "--topk", "50", *COMMON],
                         capsys)
    rec = json.loads((tmp_path / "all" / "predictions.jsonl").read_text())
    assert code == 0 and len(rec["topk"]) == len(classes) == 7 and sum(t["score"] for t in rec["topk"]) == pytest.approx(1, abs=1e-4)


def test_classification_scores_match_the_evaluated_model(cls_ckpt, world, tmp_path, capsys):
    """predict's top-1 is the argmax of the model ``--eval`` builds, on the eval transform."""
    from classification.data import eval_transform
    from classification.predict import load_classifier
    from maecore.data.images import load_rgb

    model, args, names = load_classifier(str(cls_ckpt))
    files = sorted((world["imagenet"] / "val").rglob("*.JPEG"))[:3] or sorted((world["imagenet"] / "val").rglob("*.*"))[:3]
    code, _, _ = run_cli("classification", [cls_ckpt, *files, "-o", tmp_path, *COMMON], capsys)
    recs = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    tf = eval_transform(args.input_size, args.crop_pct)
    with torch.no_grad():
        probs = model(torch.stack([tf(load_rgb(f)) for f in files])).softmax(1)
    for r, p in zip(recs, probs):
        assert r["topk"][0]["label"] == names[int(p.argmax())] and r["topk"][0]["score"] == pytest.approx(float(p.max()), abs=1e-5)


# ---- detection ----------------------------------------------------------------------------------------
def test_detection_coco_results_and_overlays(det_ckpt, coco_x10, inputs, tmp_path, capsys):
    from pycocotools.coco import COCO

    val = sorted((coco_x10 / "val2017").iterdir())
    code, out, err = run_cli("detection", [det_ckpt, *val, inputs, "-o", tmp_path, "--score_thresh", "0", "--batch_size", "2",
                                           *COMMON], capsys)
    assert code == 0, err
    assert len([ln for ln in err.splitlines() if "skipped" in ln]) == 1
    results = json.loads((tmp_path / "coco_instances_results.json").read_text())
    meta = json.loads((tmp_path / "images.json").read_text())
    assert len(meta["images"]) == len(val) + 4 and len(results) > 0
    assert [c["id"] for c in meta["categories"]] == [10, 20, 30, 40, 50, 60, 70]  # the dataset's ids, saved at training
    assert {r["category_id"] for r in results} <= {10, 20, 30, 40, 50, 60, 70}
    gt = COCO()
    gt.dataset = meta
    gt.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(str(tmp_path / "coco_instances_results.json"))  # valid COCO results
    assert len(dt.anns) == len(results)
    # boxes and masks are in each input's own resolution; overlays have the inputs' sizes
    for img in meta["images"]:
        with Image.open(img["file_name"]) as im:
            assert (img["width"], img["height"]) == im.size
        for r in (r for r in results if r["image_id"] == img["id"]):
            x, y, w, h = r["bbox"]
            assert -0.01 <= x and -0.01 <= y and x + w <= img["width"] + 0.01 and y + h <= img["height"] + 0.01
            assert r["segmentation"]["size"] == [img["height"], img["width"]]
    sizes = _sizes(tmp_path / "overlays")
    assert sizes["other_size"] == (48, 40) and sizes["tall"] == (30, 70) and len(sizes) == len(val) + 4


def test_detection_old_checkpoint_falls_back_to_1_to_k(det_ckpt, inputs, tmp_path, capsys):
    ckpt = torch.load(det_ckpt, weights_only=True)
    del ckpt["args"]["category_ids"], ckpt["args"]["category_names"]
    old = tmp_path / "old.pth"
    torch.save(ckpt, old)
    code, _, err = run_cli("detection", [old, inputs / "sub" / "tall.jpg", "-o", tmp_path / "o", "--no_overlays", *COMMON], capsys)
    assert code == 0 and "1..7" in err
    cats = json.loads((tmp_path / "o" / "images.json").read_text())["categories"]
    assert [c["id"] for c in cats] == list(range(1, 8)) and not (tmp_path / "o" / "overlays").exists()


# ---- segmentation -------------------------------------------------------------------------------------
def test_segmentation_label_maps_at_input_size(seg_ckpt, world, inputs, tmp_path, capsys):
    val = sorted((world["ade"] / "ADEChallengeData2016" / "images" / "validation").iterdir())
    code, out, err = run_cli("segmentation", [seg_ckpt, *val, inputs, "-o", tmp_path, "--batch_size", "3", *COMMON], capsys)
    assert code == 0, err
    assert len([ln for ln in err.splitlines() if "skipped" in ln]) == 1
    labels = {f.stem: f for f in tmp_path.glob("*.png")}
    assert len(labels) == len(val) + 4
    for f in [*val, inputs / "other_size.png", inputs / "sub" / "tall.jpg"]:
        with Image.open(f) as im, Image.open(labels[f.stem]) as lab:
            assert lab.size == im.size and lab.mode == "L"
            assert np.asarray(lab).max() < 7
        with Image.open(tmp_path / "overlays" / f"{f.stem}.png") as ov:
            assert ov.size == im.size
    # the same class map as the evaluation's predict, one window at a time (windows batched here)
    from segmentation.evaluate import predict
    from segmentation.predict import load_segmentor

    model, args = load_segmentor(str(seg_ckpt))
    from maecore.data.images import load_rgb

    ref = predict(model, load_rgb(inputs / "sub" / "tall.jpg"), 7, (32, 32))
    assert np.array_equal(np.asarray(Image.open(labels["tall"])), ref.numpy().astype(np.uint8))
    # --dataset_labels: the annotations' encoding (reduce_zero_label: class k is written k+1)
    code, _, _ = run_cli("segmentation", [seg_ckpt, inputs / "sub" / "tall.jpg", "-o", tmp_path / "ds", "--dataset_labels",
                                          "--no_overlays", *COMMON], capsys)
    assert code == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "ds" / "tall.png")), ref.numpy().astype(np.uint8) + 1)


def test_windows_in_one_batch_give_the_same_logits():
    from segmentation.evaluate import slide_inference
    from segmentation.model import build_segmentor

    torch.manual_seed(0)
    m = build_segmentor("tiny", 5, 32, 8, 0.0, 16, 8, embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        a = slide_inference(m, x, 5, (32, 32), (21, 21))
        b = slide_inference(m, x, 5, (32, 32), (21, 21), window_batch=4)
    assert (a - b).abs().max() < 1e-5


# ---- bad inputs: one line, exit 2 ------------------------------------------------------------------------
def _one_line(code: int, err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_inputs_are_one_line(cls_ckpt, seg_ckpt, det_ckpt, inputs, tmp_path, capsys):
    line = _one_line(*run_cli("classification", [seg_ckpt, inputs, "-o", tmp_path, *COMMON], capsys)[::2])
    assert "segmentation checkpoint" in line and "python -m segmentation predict" in line
    line = _one_line(*run_cli("segmentation", [det_ckpt, inputs, "-o", tmp_path, *COMMON], capsys)[::2])
    assert "detection checkpoint" in line
    line = _one_line(*run_cli("detection", [cls_ckpt, inputs, "-o", tmp_path, *COMMON], capsys)[::2])
    assert "classification checkpoint" in line
    line = _one_line(*run_cli("classification", [cls_ckpt, tmp_path / "missing.jpg", "-o", tmp_path, *COMMON], capsys)[::2])
    assert "input not found" in line and "missing.jpg" in line
    line = _one_line(*run_cli("classification", [cls_ckpt, str(tmp_path / "*.nothing"), "-o", tmp_path, *COMMON], capsys)[::2])
    assert "no file matches" in line
    line = _one_line(*run_cli("classification", [tmp_path / "none.pth", inputs, "-o", tmp_path, *COMMON], capsys)[::2])
    assert "not found" in line
    mae = tmp_path / "mae.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(8, 3, 8, 8), "decoder_embed.weight": torch.zeros(4, 8)}}, mae)
    line = _one_line(*run_cli("segmentation", [mae, inputs, "-o", tmp_path, *COMMON], capsys)[::2])
    assert "MAE pretraining checkpoint" in line


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_python_m_dispatches_predict(task, cls_ckpt, inputs, tmp_path, monkeypatch, capsys):
    """``python -m TASK predict …`` (run as ``__main__``) is that task's predict: it refuses a classifier's file."""
    import runpy

    monkeypatch.setattr(sys, "argv", [task, "predict", str(cls_ckpt), str(inputs / "other_size.png"), "-o", str(tmp_path), *COMMON])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(task, run_name="__main__")
    assert e.value.code == 2 and "classification checkpoint" in capsys.readouterr().err


def test_python_m_runs_predict_and_keeps_training(cls_ckpt, inputs, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["classification", "predict", str(cls_ckpt), str(inputs / "other_size.png"), "-o", str(tmp_path),
                                      *COMMON])
    runpy.run_module("classification", run_name="__main__")
    assert json.loads((tmp_path / "predictions.jsonl").read_text())["image"].endswith("other_size.png")
    monkeypatch.setattr(sys, "argv", ["classification", "--data_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("classification", run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not found" in err and "Traceback" not in err
