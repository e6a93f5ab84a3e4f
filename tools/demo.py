#!/usr/bin/env python
"""The main job: synthetic world -> MAE pretraining -> reconstruction figure -> checkpoint.

    python tools/demo.py --output runs/demo [--from-stage STAGE] [--config FILE.json]

Each stage runs the toolkit's own command line (printed, and recorded in ``commands.sh`` so any step
can be re-run by hand); a failing stage stops the pipeline with a message naming it, leaves every
earlier stage's outputs in place, and ``--from-stage`` resumes there.  ``--config`` overrides the
demo settings with a JSON file (e.g. real ImageNet paths, ViT-B, more epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maecore.cli import UserError, run_cli  # noqa: E402

# Demo settings: a few CPU minutes end to end.  A --config JSON overrides any of them.
DEMO: dict = {
    "world": {"size": 64, "n_train": 60, "n_val": 15, "seed": 0},
    "data_root": None,  # None: generate the synthetic world under <output>/world
    "pretrain": ["--recipe", "demo", "--epochs", "20"],
}


@dataclass
class Context:
    out: Path
    cfg: dict
    results: dict = field(default_factory=dict)
    commands: list[tuple[str, str]] = field(default_factory=list)

    @property
    def world(self) -> Path:
        return Path(self.cfg["data_root"]) if self.cfg.get("data_root") else self.out / "world"

    def run(self, stage: str, args: list[str]) -> None:
        """Run one of the toolkit's commands, echo it, record it; failure names the stage."""
        cmd = [sys.executable, *args]
        shown = " ".join(shlex.quote(a) for a in ["python", *args])
        print(f"\n[{stage}] $ {shown}", flush=True)
        self.commands.append((stage, shown))
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        p = subprocess.run(cmd, cwd=ROOT, env=env)
        if p.returncode != 0:
            raise UserError(f"stage '{stage}' failed (exit {p.returncode}); earlier stages' outputs are kept in "
                            f"{self.out}; fix the cause and re-run with --from-stage {stage}")


def stage_data(ctx: Context) -> None:
    if ctx.cfg.get("data_root"):
        print(f"[data] using {ctx.world}")
        return
    w = ctx.cfg["world"]
    ctx.run("data", ["tools/make_synthetic.py", str(ctx.world), "--size", str(w["size"]), "--n-train", str(w["n_train"]),
                     "--n-val", str(w["n_val"]), "--seed", str(w["seed"]), "--force"])


def stage_pretrain(ctx: Context) -> None:
    out = ctx.out / "pretrain"
    ctx.run("pretrain", ["-m", "pretrain", "--data_path", str(ctx.world / "imagenet"), "--output_dir", str(out),
                         *ctx.cfg["pretrain"]])
    from maecore.engine import read_log

    log = read_log(out, "train")
    ctx.results["pretrain"] = {"first_loss": log[0]["loss"], "last_loss": log[-1]["loss"], "steps": log[-1]["step"]}


def stage_figures(ctx: Context) -> None:
    ckpt = ctx.out / "pretrain" / "checkpoint-last.pth"
    val = sorted((ctx.world / "imagenet" / "val").rglob("*.jpg"))
    imgs = [str(p) for p in val[:: max(1, len(val) // 6)][:6]]
    ctx.run("figures", ["tools/visualize.py", str(ckpt), *imgs, "-o", str(ctx.out / "reconstruction.png")])
    loss_curve(ctx.out / "pretrain", ctx.out / "pretrain_loss.png")


def loss_curve(run_dir: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maecore.engine import read_log

    log = read_log(run_dir, "train")
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MAE loss (masked patches)")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def stage_report(ctx: Context) -> None:
    pre = ctx.results.get("pretrain", {})
    lines = [
        "# MAE toolkit demo report",
        "",
        "| stage | result |",
        "|---|---|",
        f"| pretraining | loss {pre.get('first_loss', float('nan')):.4f} -> {pre.get('last_loss', float('nan')):.4f} "
        f"over {pre.get('steps', '?')} steps |",
        "",
        "![pretraining loss](pretrain_loss.png)",
        "",
        "![reconstructions](reconstruction.png)",
        "",
        "Checkpoint: `pretrain/checkpoint-last.pth` (official MAE key layout, `{'model': ...}`).",
        "",
        "## Commands",
        "```",
        *[c for _, c in ctx.commands],
        "```",
    ]
    (ctx.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6]))


STAGES: list[tuple[str, Callable[[Context], None]]] = [
    ("data", stage_data),
    ("pretrain", stage_pretrain),
    ("figures", stage_figures),
    ("report", stage_report),
]


def main(argv: list[str] | None = None) -> None:
    names = [n for n, _ in STAGES]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--from-stage", choices=names, default=names[0])
    p.add_argument("--config", help="JSON file overriding the demo settings")
    args = p.parse_args(argv)
    cfg = dict(DEMO)
    if args.config:
        try:
            cfg.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read config {args.config}: {e}") from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, cfg)
    saved = out / "results.json"
    if saved.exists() and args.from_stage != names[0]:
        prev = json.loads(saved.read_text())
        ctx.results = prev.get("results", {})
        ctx.commands = [tuple(c) for c in prev.get("commands", []) if c[0] in names[: names.index(args.from_stage)]]
    t0 = time.time()
    for _, fn in STAGES[names.index(args.from_stage) :]:
        fn(ctx)
        saved.write_text(json.dumps({"results": ctx.results, "commands": ctx.commands}, indent=1))
    print(f"\ndone in {time.time() - t0:.0f} s: {out / 'report.md'}")


if __name__ == "__main__":
    run_cli(main)
