"""The demo's stages: data, pretrain, figures and convert run in the pipeline's process; the transfer stages
(linear probe, partial fine-tuning, fine-tuning, detection, segmentation) build ``Job``s for ``run_jobs``;
``STAGES`` pairs each name of ``STAGE_NAMES`` (the run order) with its function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from maecore.errors import UserError
from pipeline.checkpoint_jobs import convert_kept, jobs_checkpoints
from pipeline.context import Context, common, dense_inits
from pipeline.jobs import Job
from pipeline.monitor_figure import MONITOR_PNG, monitor_png, monitor_summary
from pipeline.plan import STAGE_NAMES, partial_label
from pipeline.report import stage_report


def stage_data(ctx: Context) -> None:
    if ctx.cfg.get("data_root"):
        print(f"[data] using {ctx.world}")
        return
    w = ctx.cfg["world"]
    base = [str(ctx.world), "--size", str(w["size"]), "--seed", str(w["seed"]), "--force"]
    if "imagenet_n_train" in w:  # the classification split gets its own (per-class) counts
        ctx.run("data", "tools/make_synthetic.py", [*base, "--tasks", "imagenet", "--n-train", str(w["imagenet_n_train"]),
                                                    "--n-val", str(w.get("imagenet_n_val", w["n_val"])),
                                                    "--style", w.get("imagenet_style", "cluttered")])
        ctx.run("data", "tools/make_synthetic.py", [*base, "--tasks", "coco,ade", "--n-train", str(w["n_train"]),
                                                    "--n-val", str(w["n_val"]), "--style", w.get("scene_style", "cluttered")])
    else:
        ctx.run("data", "tools/make_synthetic.py", [*base, "--n-train", str(w["n_train"]), "--n-val", str(w["n_val"])])


def stage_pretrain(ctx: Context) -> None:
    out = ctx.out / "pretrain"
    res = ctx.run("pretrain", "-m pretrain", ["--data_path", str(ctx.world / "imagenet"), "--output_dir", str(out),
                                             "--vis_every", "10", *common(ctx), *ctx.cfg["pretrain"]])
    from maecore.engine import read_log

    log = read_log(out, "train")
    if not log:
        raise UserError(f"pretraining logged no step (is --log_every larger than the run?): {out / 'log.jsonl'}")
    ctx.results["pretrain"] = {"first_loss": log[0]["loss"], "last_loss": log[-1]["loss"], "steps": log[-1]["step"],
                               "wall_s": res["wall_s"]}
    if monitor := monitor_summary(out):  # --monitor: kNN / online linear / RankMe at step 0 and at the end
        ctx.results["pretrain"]["monitor"] = monitor


def stage_figures(ctx: Context) -> None:
    ckpt = ctx.out / "pretrain" / "checkpoint-last.pth"
    val = sorted((ctx.world / "imagenet" / "val").rglob("*.jpg"))
    imgs = [str(p) for p in val[:: max(1, len(val) // 6)][:6]]
    ctx.run("figures", "tools/visualize.py", [str(ckpt), *imgs, "-o", str(ctx.out / "reconstruction.png")])
    loss_curve(ctx.out / "pretrain", ctx.out / "pretrain_loss.png")
    train = ctx.world / "imagenet" / "train"
    n_cls = sum(1 for d in train.iterdir() if d.is_dir()) if train.is_dir() else 0
    monitor_png(ctx.out / "pretrain", ctx.out / MONITOR_PNG, n_cls)


def stage_convert(ctx: Context) -> None:
    ckpt = ctx.out / "pretrain" / "checkpoint-last.pth"
    for task in ("classification", "detection", "segmentation"):
        ctx.run("convert", "tools/convert.py", [str(ckpt), "-o", str(ctx.out / "converted" / f"{task}.pth"),
                                                "--to", task, "--force"])
    convert_kept(ctx)  # the study: every kept pretraining checkpoint, for the checkpoints stage's probes


def _init_args(ctx: Context, task: str, init: str) -> list[str]:
    return ["--finetune", str(ctx.out / "converted" / f"{task}.pth")] if init == "mae" else []


def _classify(ctx: Context, stage: str, name: str, slug: str, extra: list[str]) -> list[Job]:
    rows = ctx.results.setdefault("rows", {})
    jobs = []
    for init in ctx.cfg["inits"]:
        out = ctx.out / stage / f"{slug}-{init}"

        def record(res: dict, key: str = f"{name}|{init}") -> None:
            rows[key] = {"metric": "top-1", "value": res.get("acc1"), "wall_s": res["wall_s"],
                         "tuned_params": res.get("tuned_params"), "n": res.get("n_images")}

        jobs.append(Job(stage, f"{slug} {init}", "-m classification",
                        ["--data_path", str(ctx.world / "imagenet"), "--output_dir", str(out), *common(ctx), *extra,
                         *_init_args(ctx, "classification", init)], record))
    return jobs


def jobs_linprobe(ctx: Context) -> list[Job]:
    return _classify(ctx, "linprobe", "linear probe", "linprobe", ctx.cfg["linprobe"])


def jobs_partial(ctx: Context) -> list[Job]:
    jobs = []
    for k in ctx.cfg["partial_blocks"]:
        jobs += _classify(ctx, "partial", partial_label(k), f"tune{k:g}", [*ctx.cfg["partial"], "--tune_blocks", str(k)])
    return jobs


def jobs_finetune(ctx: Context) -> list[Job]:
    return _classify(ctx, "finetune", "fine-tune", "finetune", ctx.cfg["finetune"])


def jobs_detection(ctx: Context) -> list[Job]:
    rows = ctx.results.setdefault("rows", {})
    jobs = []
    for init in dense_inits(ctx):
        def record(res: dict, init: str = init) -> None:
            n = res.get("n_images")
            rows[f"detection (box AP)|{init}"] = {"metric": "box AP", "value": res.get("bbox/AP"), "wall_s": res["wall_s"], "n": n}
            rows[f"detection (mask AP)|{init}"] = {"metric": "mask AP", "value": res.get("segm/AP"), "wall_s": res["wall_s"], "n": n}

        jobs.append(Job("detection", f"detection {init}", "-m detection",
                        ["--data_path", str(ctx.world / "coco"), "--output_dir", str(ctx.out / "detection" / init), *common(ctx),
                         *ctx.cfg["detection"], *_init_args(ctx, "detection", init)], record))
    return jobs


def jobs_segmentation(ctx: Context) -> list[Job]:
    rows = ctx.results.setdefault("rows", {})
    jobs = []
    for init in dense_inits(ctx):
        def record(res: dict, init: str = init) -> None:
            rows[f"segmentation (mIoU)|{init}"] = {"metric": "mIoU", "value": res.get("mIoU"), "wall_s": res["wall_s"],
                                                   "n": res.get("n_images")}

        extra = ctx.cfg.get("segmentation_mae", []) if init == "mae" else []
        jobs.append(Job("segmentation", f"segmentation {init}", "-m segmentation",
                        ["--data_path", str(ctx.world / "ade"), "--output_dir", str(ctx.out / "segmentation" / init), *common(ctx),
                         *ctx.cfg["segmentation"], *extra, *_init_args(ctx, "segmentation", init)], record))
    return jobs


def loss_curve(run_dir: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maecore.engine import read_log
    from maecore.figures import save_figure

    log = read_log(run_dir, "train")
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MAE loss (masked patches)")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    save_figure(fig, png)


_FUNCTIONS: dict[str, Callable[[Context], object]] = {
    "data": stage_data, "pretrain": stage_pretrain, "figures": stage_figures, "convert": stage_convert,
    "finetune": jobs_finetune, "detection": jobs_detection, "segmentation": jobs_segmentation,
    "linprobe": jobs_linprobe, "partial": jobs_partial, "checkpoints": jobs_checkpoints, "report": stage_report,
}
STAGES: list[tuple[str, Callable[[Context], object]]] = [(name, _FUNCTIONS[name]) for name in STAGE_NAMES]
