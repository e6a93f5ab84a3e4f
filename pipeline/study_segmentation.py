"""Short CPU study: UperNet on a small ViT learns the synthetic ADE20K world (mIoU well above chance).

    OMP_NUM_THREADS=1 python tools/study_segmentation.py --output runs/study_seg --threads 1 [--iters 2500]

Writes the synthetic world (ADE20K layout, 7 shape classes after reduce_zero_label), trains through the
real CLI (``python -m segmentation``), evaluates with the real sliding-window evaluation every
``--eval_iters`` iterations, and prints the mIoU curve next to two chance baselines computed on the same
validation labels with the same metric code: uniform random class per pixel, and the most frequent class
everywhere.  The model is the demo recipe's 4-block ViT (96 wide, patch 8) from scratch (~0.35 s per step on one busy core).

From the demo's MAE checkpoint (``make demo`` first), the run measured on 2026-11-23 (2 cores, 1362 s):

    python tools/study_segmentation.py --output runs/study_seg_mae --iters 8000 --eval_iters 1000 --layer_decay 0.65 \
        --extra --embed_dim 192 --num_heads 3 --finetune runs/demo/converted/segmentation.pth

mIoU every 1000 iterations on the 24 val images: 9.4, 13.0, 8.3, 16.1, 13.2, 15.7, 17.9, 20.0 (mAcc 32.4)
against 7.3 for uniform chance (3.6 majority class); the final checkpoint scores 18.8 mIoU / 29.4 mAcc
on 200 val images (the same 24 plus 176 more: ``python -m segmentation --eval --resume …`` on a world made
with ``n_val=200``).  From random init at the same budget (no ``--finetune``, no layer decay): 10.2 on the
24 images, 11.3 mIoU / 20.4 mAcc on the 200.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from maecore.engine import read_log
from segmentation.data import ADE20K
from segmentation.evaluate import confusion_matrix, metrics_from_confusion
from segmentation.train import main as seg_main
from synthetic import make_world


def chance_baselines(data: Path, num_classes: int, seed: int = 0) -> dict[str, float]:
    val = ADE20K(data, "val", num_classes)
    g = torch.Generator().manual_seed(seed)
    cm_rand = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    labels = [torch.from_numpy(val.load(i).label) for i in range(len(val))]
    freq = torch.bincount(torch.cat([lab[lab != 255] for lab in labels]), minlength=num_classes)
    cm_major = torch.zeros_like(cm_rand)
    for lab in labels:
        cm_rand += confusion_matrix(torch.randint(0, num_classes, lab.shape, generator=g), lab, num_classes)
        cm_major += confusion_matrix(torch.full_like(lab, int(freq.argmax())), lab, num_classes)
    return {"uniform_random": 100 * metrics_from_confusion(cm_rand)["mIoU"],
            "majority_class": 100 * metrics_from_confusion(cm_major)["mIoU"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="runs/study_seg")
    ap.add_argument("--iters", type=int, default=2500)
    ap.add_argument("--eval_iters", type=int, default=500)
    ap.add_argument("--n_train", type=int, default=512)
    ap.add_argument("--n_val", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="override the demo recipe's")
    ap.add_argument("--layer_decay", type=float, default=None)
    ap.add_argument("--drop_path", type=float, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for python -m segmentation")
    a = ap.parse_args(argv)
    out = Path(a.output)
    if a.threads:
        torch.set_num_threads(a.threads)
    world = make_world(out / "world", size=64, n_train=a.n_train, n_val=a.n_val, seed=a.seed, tasks=("ade",),
                       overwrite=True)["ade"]
    run = out / "run"
    argv = [
        "--recipe", "demo", "--data_path", str(world), "--output_dir", str(run), "--max_iters", str(a.iters),
        "--warmup_iters", str(max(1, a.iters // 10)), "--eval_iters", str(a.eval_iters), "--no_progress",
        "--seed", str(a.seed),
    ]
    for flag in ("lr", "layer_decay", "drop_path"):
        if getattr(a, flag) is not None:
            argv += [f"--{flag}", str(getattr(a, flag))]
    argv += a.extra
    print("python -m segmentation " + " ".join(argv))
    t0 = time.time()
    seg_main(argv)
    seconds = time.time() - t0
    chance = chance_baselines(world, 7)
    evals = read_log(run, "eval")
    curve = [(r["step"], round(r["mIoU"], 2), round(r["mAcc"], 2), round(r["aAcc"], 2)) for r in evals]
    train = read_log(run, "train")
    summary = {
        "curve (step, mIoU, mAcc, aAcc)": curve,
        "final_IoU_per_class": evals[-1]["IoU_per_class"] if evals else None,
        "train_loss_first_last": [round(train[0]["loss"], 3), round(train[-1]["loss"], 3)] if train else None,
        "chance_mIoU": {k: round(v, 2) for k, v in chance.items()},
        "best_over_chance": round(max(c[1] for c in curve) / max(chance.values()), 2) if curve else None,
        "train_eval_seconds": round(seconds, 1),
    }
    print(json.dumps(summary, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
