"""Command line: ``python -m synthetic ROOT [--size N|HxW] [--n-train N] [--n-val N] [--seed S] [--tasks LIST]
[--style STYLE] [--force]`` (``tools/make_synthetic.py`` is the same)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from maecore.cli import OneLineParser, size_type
from synthetic.ade import ADE_DIRNAME
from synthetic.common import TASKS
from synthetic.scene import MIN_SIDE, STYLES
from synthetic.shapes import SHAPES
from synthetic.world import make_world


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return n


def _tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"bad --tasks {text!r} (choose from {','.join(TASKS)})")
    return tasks


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="make_synthetic.py", description="Generate the synthetic shapes world (ImageNet / COCO / ADE20K layouts).")
    p.add_argument("root", type=Path, help="output folder (imagenet/, coco/, ade/ go inside)")
    p.add_argument("--size", type=size_type(MIN_SIDE), default=(64, 64), help="N or HxW (default 64)")
    p.add_argument("--n-train", type=_count, default=40,
                   help="train images: per class for imagenet, total for coco/ade (default 40)")
    p.add_argument("--n-val", type=_count, default=10,
                   help="val images: per class for imagenet, total for coco/ade (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", type=_tasks, default=TASKS, help="comma list (default imagenet,coco,ade)")
    p.add_argument("--force", action="store_true", help="write into a non-empty ROOT (replaces task folders)")
    p.add_argument("--style", choices=STYLES, default="cluttered",
                   help="cluttered: textures + distractors (default); plain: flat colours on gradients, one larger "
                        "object per ImageNet image")
    return p


def _summary(paths: dict[str, Path]) -> list[str]:
    lines = []
    if "imagenet" in paths:
        p = paths["imagenet"]
        lines.append(f"  imagenet  {p}")
        for split in ("train", "val"):
            per = {c: len(list((p / split / c).glob("*.jpg"))) for c in SHAPES}
            lines.append(f"    {split:<10} {sum(per.values()):>5} images  "
                         + " ".join(f"{c}={n}" for c, n in per.items()))
    if "coco" in paths:
        p = paths["coco"]
        lines.append(f"  coco      {p}")
        for split in ("train", "val"):
            with open(p / "annotations" / f"instances_{split}2017.json") as f:
                d = json.load(f)
            per = {c["name"]: 0 for c in d["categories"]}
            names = {c["id"]: c["name"] for c in d["categories"]}
            for a in d["annotations"]:
                per[names[a["category_id"]]] += 1
            lines.append(f"    {split + '2017':<10} {len(d['images']):>5} images, "
                         f"{len(d['annotations'])} instances  " + " ".join(f"{c}={n}" for c, n in per.items()))
    if "ade" in paths:
        p = paths["ade"] / ADE_DIRNAME
        lines.append(f"  ade       {p}")
        for sub in ("training", "validation"):
            n = len(list((p / "images" / sub).glob("*.jpg")))
            lines.append(f"    {sub:<10} {n:>5} images (+ label PNGs, 0=background, 1..{len(SHAPES)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m synthetic ROOT [--size N|HxW] [--n-train N] [--n-val N] [--seed S] [--tasks LIST] [--force]``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    root: Path = args.root
    if root.exists() and not root.is_dir():
        parser.error(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not args.force:
        parser.error(f"{root} is not empty (use --force to overwrite)")
    t0 = time.perf_counter()
    try:
        paths = make_world(root, size=args.size, n_train=args.n_train, n_val=args.n_val,
                           seed=args.seed, tasks=args.tasks, overwrite=args.force, style=args.style)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    h, w = args.size
    print(f"synthetic world written to {root} (size {h}x{w}, seed {args.seed}, "
          f"{time.perf_counter() - t0:.2f}s)")
    print("\n".join(_summary(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
