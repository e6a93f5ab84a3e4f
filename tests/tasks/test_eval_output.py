"""``--eval`` writes one file under one name in every task (#24): ``OUT/eval.json``, a flat record laid out as the
``eval`` records of the run's ``log.jsonl`` (``type``, then ``task``, ``checkpoint``, ``step``, then the task's
metrics under its log's names), so one reader serves all three tasks and both files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maecore.checkpoint import EVAL_NAME
from maecore.engine import read_log

# each task: a tiny network, trained from scratch for two steps, evaluated at the end of its one epoch
TASKS = {
    "classification": ["--model", "vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32",
                       "--batch_size", "8", "--epochs", "1", "--max_steps", "2", "--mixup", "0", "--cutmix", "0"],
    "detection": ["--arch", "tiny", "--embed_dim", "64", "--depth", "4", "--num_heads", "2", "--patch_size", "16",
                  "--image_size", "64", "--pretrain_img_size", "64", "--window_size", "2", "--global_blocks", "1", "3",
                  "--out_channels", "32", "--fc_dim", "64", "--anchor_sizes", "8", "16", "32", "64", "128",
                  "--rpn_batch_size_per_image", "32", "--box_batch_size_per_image", "16", "--rpn_pre_nms_top_n_train", "100",
                  "--rpn_post_nms_top_n_train", "50", "--rpn_pre_nms_top_n_test", "100", "--rpn_post_nms_top_n_test", "50",
                  "--detections_per_img", "20", "--score_thresh", "0.0", "--amp", "none", "--device", "cpu", "--epochs", "1",
                  "--batch_size", "2", "--max_steps", "2", "--warmup_iters", "1", "--vis_images", "0"],
    "segmentation": ["--recipe", "demo", "--model", "tiny", "--embed_dim", "64", "--depth", "4", "--num_heads", "2",
                     "--patch_size", "8", "--crop_size", "32", "--channels", "16", "--aux_channels", "8", "--batch_size", "4",
                     "--max_iters", "2", "--warmup_iters", "0", "--num_vis", "0"],
}
COMMON = ["--num_workers", "0", "--no_progress", "--seed", "0"]
HEADER = {"type", "task", "checkpoint", "step"}


@pytest.fixture(scope="module")
def worlds(tiny_world, tmp_path_factory) -> dict[str, Path]:
    from synthetic import make_world

    coco = make_world(tmp_path_factory.mktemp("coco64"), size=64, n_train=4, n_val=3, seed=2, tasks=("coco",))["coco"]
    return {"classification": tiny_world["imagenet"], "detection": coco, "segmentation": tiny_world["ade"]}


def entry(task: str):
    if task == "classification":
        from classification.train import main
    elif task == "detection":
        from detection.train import main
    else:
        from segmentation.train import main
    return main


@pytest.mark.parametrize("task", list(TASKS))
def test_eval_writes_eval_json_laid_out_as_the_log_eval_record(task, worlds, tmp_path):
    main = entry(task)
    run, ev = tmp_path / "run", tmp_path / "ev"
    main([*TASKS[task], *COMMON, "--data_path", str(worlds[task]), "--output_dir", str(run)])
    logged = read_log(run, "eval")[-1]  # the training log's record of the last evaluation
    ckpt = run / "checkpoint-last.pth"
    res = main(["--data_path", str(worlds[task]), "--output_dir", str(ev), *COMMON, "--eval", "--resume", str(ckpt),
                *(["--vis_images", "0"] if task == "detection" else [])])
    others = ("coco_instances_results.json", "confusion_matrix.json")  # detections, counts: not the metrics
    assert sorted(p.name for p in ev.glob("*.json") if p.name not in others) == [EVAL_NAME]
    assert not (run / "metrics.json").exists()  # nor does a training run write another name
    rec = json.loads((ev / EVAL_NAME).read_text())
    assert {k: rec[k] for k in HEADER} == {"type": "eval", "task": task, "checkpoint": str(ckpt), "step": logged["step"]}
    assert list(rec)[:4] == ["type", "task", "checkpoint", "step"]
    # the metrics: flat, the names the training log gives them, the numbers --eval returned
    assert set(rec) - HEADER == set(logged) - {"type", "step", "epoch"} == set(res)
    assert json.loads(json.dumps(res)) == {k: rec[k] for k in res}
    n_val = {"classification": 14, "detection": 3, "segmentation": 2}[task]
    assert type(rec["n_images"]) is int and rec["n_images"] == logged["n_images"] == n_val  # one count key, an integer, everywhere
