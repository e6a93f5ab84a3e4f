"""Slow study (not a test): the three transfer protocols on the synthetic world, from an MAE demo
checkpoint and from random init, plus a partial fine-tuning sweep over K (the paper's Fig. 9 axes).

    python tools/study_classification.py --out runs/cls_study [--pretrained OUT/checkpoint-last.pth]

Without ``--pretrained`` it first runs ``python -m pretrain --recipe demo`` on the world it makes.
Prints a markdown table and writes ``study.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from classification.train import main as cls_main
from pretrain.train import main as pretrain_main
from synthetic import make_world


def run(name: str, argv: list[str], rows: list[dict]) -> None:
    t = time.time()
    s = cls_main(argv)
    rows.append({"run": name, "acc1": round(s["acc1"], 2), "best_acc1": round(s["best_acc1"], 2),
                 "tuned_params": s["tuned_params"], "knn_acc1": s.get("knn_acc1"), "time_s": round(time.time() - t, 1)})
    print(json.dumps(rows[-1]), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/cls_study")
    p.add_argument("--pretrained", default="")
    p.add_argument("--n_train", type=int, default=40, help="images per class")
    p.add_argument("--n_val", type=int, default=10)
    p.add_argument("--epochs", type=int, default=None, help="override the demo recipes' epochs")
    p.add_argument("--pretrain_epochs", type=int, default=20, help="demo pretraining epochs (when no --pretrained)")
    p.add_argument("--sweep", default="0,0.5,1,2,4,12", help="partial fine-tuning K values")
    a = p.parse_args(argv)
    out = Path(a.out)
    world = out / "world" / "imagenet"
    if not world.is_dir():
        make_world(out / "world", size=64, n_train=a.n_train, n_val=a.n_val, tasks=("imagenet",))
    ckpt = a.pretrained
    if not ckpt:
        pretrain_main(["--recipe", "demo", "--data_path", str(world), "--output_dir", str(out / "pretrain"), "--no_progress",
                       "--epochs", str(a.pretrain_epochs)])
        ckpt = str(out / "pretrain" / "checkpoint-last.pth")
    ep = ["--epochs", str(a.epochs)] if a.epochs else []
    base = ["--data_path", str(world), "--no_progress", *ep]
    rows: list[dict] = []
    run("finetune (MAE)", ["--recipe", "demo", *base, "--finetune", ckpt, "--output_dir", str(out / "ft")], rows)
    run("finetune (scratch)", ["--recipe", "demo", *base, "--output_dir", str(out / "ft_scratch")], rows)
    run("linprobe (MAE)", ["--recipe", "demo_linprobe", *base, "--finetune", ckpt, "--knn", "--output_dir", str(out / "lp")], rows)
    run("linprobe (MAE, cached)", ["--recipe", "demo_linprobe", *base, "--finetune", ckpt, "--cache_features",
                                   "--output_dir", str(out / "lp_cached")], rows)
    run("linprobe (scratch)", ["--recipe", "demo_linprobe", *base, "--output_dir", str(out / "lp_scratch")], rows)
    for k in a.sweep.split(","):
        run(f"partial K={k} (MAE)", ["--recipe", "demo_partial", *base, "--finetune", ckpt, "--tune_blocks", k,
                                     "--output_dir", str(out / f"partial_{k}")], rows)
    (out / "study.json").write_text(json.dumps(rows, indent=1))
    print("\n| run | top-1 (last) | top-1 (best) | tuned params | kNN top-1 | time s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['acc1']} | {r['best_acc1']} | {r['tuned_params']:,} | {r['knn_acc1'] or ''} | {r['time_s']} |")


if __name__ == "__main__":
    main()
