"""detection end to end: a few training iterations on the synthetic COCO world, COCOeval bbox + segm,
``--eval`` on the checkpoint, predictions in original coordinates, the ViTDet schedule, CLI errors."""

from __future__ import annotations

import json
import math
from argparse import Namespace

import pytest
import torch

# pycocotools is optional where only the CUDA tests run (the GPU image lacks it): skip, don't break collection
pytest.importorskip("pycocotools")

from detection.data import LSJ, CocoInstances
from detection.evaluate import STAT_NAMES, merge_shards, predict, run_cocoeval, to_coco_results
from detection.model import build_detector
from detection.recipes import VITDET_MILESTONES
from detection.train import cli, main, schedule_length, step_schedule

SMALL = ["--arch", "tiny", "--embed_dim", "64", "--depth", "4", "--num_heads", "2", "--patch_size", "16",
         "--image_size", "64", "--pretrain_img_size", "64", "--window_size", "2", "--global_blocks", "1", "3",
         "--out_channels", "32", "--fc_dim", "64", "--anchor_sizes", "8", "16", "32", "64", "128",
         "--rpn_batch_size_per_image", "32", "--box_batch_size_per_image", "16", "--rpn_pre_nms_top_n_train", "100",
         "--rpn_post_nms_top_n_train", "50", "--rpn_pre_nms_top_n_test", "100", "--rpn_post_nms_top_n_test", "50",
         "--detections_per_img", "20", "--score_thresh", "0.0", "--num_workers", "0", "--no_progress",
         "--amp", "none", "--device", "cpu"]


@pytest.fixture(scope="module")
def coco64(tmp_path_factory):
    from synthetic import make_world

    root = tmp_path_factory.mktemp("detworld")
    return make_world(root, size=64, n_train=8, n_val=3, seed=2, tasks=("coco",))["coco"]


def test_train_a_few_steps_then_cocoeval_and_eval_only(coco64, tmp_path, capsys):
    out = tmp_path / "run"
    summary = main(["--data_path", str(coco64), "--output_dir", str(out), *SMALL, "--epochs", "1", "--batch_size", "2",
                    "--max_steps", "3", "--log_every", "1", "--keep_every", "1", "--vis_images", "2", "--lr", "2e-4",
                    "--warmup_iters", "2"])
    assert summary["steps"] == 3
    for t in ("bbox", "segm"):
        for k in STAT_NAMES:
            v = summary[f"{t}/{k}"]
            assert math.isnan(v) or 0.0 <= v <= 100.0
    assert summary["n_images"] == 3 and summary["n_detections"] > 0  # COCOeval really ran on detections
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in logs if r["type"] == "train"]
    assert len(train) == 3 and {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(train[0])
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[0]["lr"] < train[-1]["lr"]  # warm-up
    results = json.loads((out / "coco_instances_results.json").read_text())
    assert len(results) == summary["n_detections"] and {"bbox", "segmentation", "score", "category_id"} <= set(results[0])
    assert (out / "predictions.png").stat().st_size > 1000
    # one line per evaluation on the terminal (#15); COCOeval's own table goes to cocoeval.txt
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("COCO eval: bbox AP ")]
    assert len(printed) == 1 and ", segm AP " in printed[0] and "on 3 images" in printed[0]
    assert "COCOeval segm" in (out / "cocoeval.txt").read_text()

    # --eval on the saved checkpoint reproduces the numbers
    again = main(["--data_path", str(coco64), "--output_dir", str(tmp_path / "ev"), *SMALL, "--eval",
                  "--resume", str(out / "checkpoint-last.pth"), "--vis_images", "0"])
    for k in ("bbox/AP", "segm/AP", "n_detections"):
        assert again[k] == pytest.approx(summary[k], nan_ok=True)


@pytest.mark.slow
def test_eval_takes_model_flags_from_checkpoint_and_torchrun_gives_the_same_metrics(coco64, tmp_path, run_module):
    """Trained under torchrun (DDP, 2 processes); ``--eval --resume`` with only data/output flags builds the
    trained detector from the checkpoint's args;
    one process and two (torchrun, gloo) give identical COCOeval numbers and results, each of the 3 val images
    (an odd number: the ranks' shards differ in size) counted once."""
    out = tmp_path / "run"
    # DDP training too: 2 gloo processes, 1 image each per step
    run_module("detection", ["--data_path", coco64, "--output_dir", out, *SMALL, "--epochs", "1", "--batch_size", "1",
                             "--max_steps", "2", "--warmup_iters", "1", "--log_every", "1", "--max_eval_images", "1",
                             "--vis_images", "0"], nproc=2)
    train = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["step"] for r in train][-1] == 2 and all(math.isfinite(r["loss"]) for r in train)
    base = ["--eval", "--resume", out / "checkpoint-last.pth", "--data_path", coco64, "--num_workers", "0", "--no_progress"]
    one = run_module("detection", [*base, "--output_dir", tmp_path / "ev1", "--vis_images", "0"])
    two = run_module("detection", [*base, "--output_dir", tmp_path / "ev2"], nproc=2)
    for p in (one, two):
        lines = [x for x in p.stdout.splitlines() if x.startswith("model flags from")]
        assert len(lines) == 1, p.stdout  # printed once, by rank 0
        assert "embed_dim=64" in lines[0] and "global_blocks=1 3" in lines[0] and "score_thresh=0.0" in lines[0]
        assert "output_dir" not in lines[0] and "data_path" not in lines[0]
    m1, m2 = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("ev1", "ev2"))
    assert m1["n_images"] == m2["n_images"] == 3 and m1["n_detections"] == m2["n_detections"] > 0
    keys = [f"{t}/{k}" for t in ("bbox", "segm") for k in STAT_NAMES]
    assert set(keys) <= set(m1) and set(keys) <= set(m2)
    for k in keys:
        assert (math.isnan(m1[k]) and math.isnan(m2[k])) or abs(m1[k] - m2[k]) <= 1e-9, (k, m1[k], m2[k])
    r1, r2 = (json.loads((tmp_path / d / "coco_instances_results.json").read_text()) for d in ("ev1", "ev2"))
    assert r1 == r2 and len({r["image_id"] for r in r2}) == 3  # every image's detections, none twice
    assert (tmp_path / "ev2" / "predictions.png").is_file()


def test_cocoeval_gives_100_for_ground_truth_as_predictions(coco64):
    ds = CocoInstances(coco64 / "val2017", coco64 / "annotations" / "instances_val2017.json", train=True)
    results = []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["labels"])
        det = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n), "masks": t["masks"][:, None].float()}
        results += to_coco_results(det, t["image_id"], ds.cat_ids)
    for iou_type in ("bbox", "segm"):
        m = run_cocoeval(ds.coco, results, ds.ids, iou_type)
        assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    # a wrong class everywhere scores zero
    for r in results:
        r["category_id"] = ds.cat_ids[(ds.cat_ids.index(r["category_id"]) + 1) % len(ds.cat_ids)]
    assert run_cocoeval(ds.coco, results, ds.ids, "bbox")["AP"] == pytest.approx(0.0)


def test_distributed_results_count_once_per_image():
    a = {1: [{"image_id": 1, "score": 0.9}], 3: [{"image_id": 3, "score": 0.8}]}
    b = {2: [{"image_id": 2, "score": 0.7}], 1: [{"image_id": 1, "score": 0.9}]}  # rank 1 padded with image 1
    merged = merge_shards([a, b])
    assert sorted(merged) == [1, 2, 3] and sum(len(v) for v in merged.values()) == 3


def test_predictions_come_back_in_original_image_coordinates():
    torch.manual_seed(0)
    m = build_detector(3, arch="tiny", embed_dim=64, depth=2, num_heads=2, patch_size=16, image_size=64, pretrain_img_size=64,
                       window_size=0, out_channels=32, fc_dim=64, box_score_thresh=0.0, anchor_sizes=(8, 16, 32, 64, 128)).eval()
    img = torch.rand(3, 50, 80)
    view, meta = LSJ(64, train=False)(img, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 5})
    (det,) = predict(m, [view], [meta])
    assert len(det["boxes"]) > 0
    assert det["masks"].shape[1:] == (1, 50, 80)
    b = det["boxes"]
    # clipped to the real image (40x64 in the view, i.e. 50x80 here), never to the padding (64x64 -> 80x80)
    assert float(b[:, 0::2].max()) <= 80 + 1e-3 and float(b[:, 1::2].max()) <= 50 + 1e-3
    assert float(b[:, 1::2].max()) > 40  # and scaled back up (x 1.25) from the 40-px content


def test_vitdet_schedule_in_steps():
    """ViTDet counts iterations: 184,375 whatever the dataset's size (tests/tasks/test_official_recipes.py compares every
    recipe with detectron2's scheduler)."""
    args = Namespace(lr=1e-4, warmup_iters=250, milestones=list(VITDET_MILESTONES), epochs=100, max_iters=184_375)
    epochs, total = schedule_length(args, steps_per_epoch=1832)  # COCO's 117,266 annotated images at batch 64
    assert (epochs, total) == (101, 184_375)
    sched = step_schedule(args, total)
    assert sched.warmup == 250 and sched.milestones == (163_889, 177_546)
    assert sched(0) == pytest.approx(1e-7) and sched(50_000) == pytest.approx(1e-4)
    assert sched(163_888) == pytest.approx(1e-4) and sched(163_889) == pytest.approx(1e-5) and sched(177_546) == pytest.approx(1e-6)
    whole = Namespace(**{**vars(args), "max_iters": 0})  # whole --epochs
    assert schedule_length(whole, steps_per_epoch=1832) == (100, 183_200)


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--data_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o"), *SMALL])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data directory not found") and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        cli(["--data_path", str(tmp_path), "--eval"])
    assert e.value.code == 2
    capsys.readouterr()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit) as e:
        cli(["--data_path", str(tmp_path), "--eval", "--resume", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "bad.pth" in err and len(err.splitlines()) == 1
