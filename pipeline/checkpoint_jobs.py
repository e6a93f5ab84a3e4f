"""The study's probes of the pretraining checkpoints (issue #26 item 6): do the monitors predict the transfer rows?

With ``checkpoint_study`` in the config (the study preset), pretraining keeps ``checkpoint-<epoch>.pth`` every
few epochs (``--keep_every``), the convert stage converts each kept one for classification
(:func:`convert_kept`), and the ``checkpoints`` stage runs the demo's linear probe on each of them and its
fine-tune on those of ``checkpoint_study["finetune_epochs"]`` (:func:`jobs_checkpoints`).  The final checkpoint
is the demo's own ``checkpoint-last.pth``: its rows are the ``linear probe`` and ``fine-tune`` rows, not run twice.
``results["checkpoints"]`` holds, per kept checkpoint (keyed by its epoch count), its ``step`` and the probes' top-1;
pipeline.study_monitor joins them with the monitor's records at the same step.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.context import Context, common
from pipeline.jobs import Job

KEPT = re.compile(r"checkpoint-(\d+)\.pth")


def kept_checkpoints(pretrain_dir: Path) -> list[tuple[int, Path]]:
    """(epochs trained, path) of the kept ``checkpoint-<epoch index>.pth`` files, in training order."""
    found = [(int(m.group(1)) + 1, p) for p in pretrain_dir.glob("checkpoint-*.pth") if (m := KEPT.fullmatch(p.name))]
    return sorted(found)


def converted_path(ctx: Context, epochs: int) -> Path:
    return ctx.out / "converted" / f"classification-ep{epochs}.pth"


def convert_kept(ctx: Context) -> None:
    """Convert every kept pretraining checkpoint but the final one for classification; record each one's step
    (``results["checkpoints"]``).  Nothing without ``checkpoint_study`` in the config."""
    if not ctx.cfg.get("checkpoint_study"):
        return
    import torch

    pre = ctx.out / "pretrain"
    step_of = lambda path: int(torch.load(path, map_location="cpu", weights_only=True)["step"])  # noqa: E731
    final_step = step_of(pre / "checkpoint-last.pth")
    points: dict[str, dict] = {}
    for epochs, path in kept_checkpoints(pre):
        step = step_of(path)
        points[str(epochs)] = {"epochs": epochs, "step": step, "final": step == final_step}
        if step != final_step:
            ctx.run("convert", "tools/convert.py", [str(path), "-o", str(converted_path(ctx, epochs)), "--to",
                                                    "classification", "--force"])
    ctx.results["checkpoints"] = points


def jobs_checkpoints(ctx: Context) -> list[Job]:
    """The fine-tunes (``finetune_epochs``), then the linear probes, of the kept checkpoints before the final one
    (longest first: the pool starts them with the demo's own fine-tunes)."""
    study = ctx.cfg.get("checkpoint_study")
    points = ctx.results.get("checkpoints", {})
    if not study or not points:
        return []
    want_ft = set(study.get("finetune_epochs", []))
    mid = [p for p in points.values() if not p["final"]]
    jobs = []
    for row, slug, extra, todo in (("fine-tune", "finetune", ctx.cfg["finetune"], [p for p in mid if p["epochs"] in want_ft]),
                                   ("linear probe", "linprobe", ctx.cfg["linprobe"], mid)):
        for p in todo:
            def record(res: dict, point: dict = p, row: str = row) -> None:
                point[row] = res.get("acc1")

            out = ctx.out / "checkpoints" / f"{slug}-ep{p['epochs']}"
            jobs.append(Job("checkpoints", f"{slug} ep{p['epochs']}", "-m classification",
                            ["--data_path", str(ctx.world / "imagenet"), "--output_dir", str(out), *common(ctx), *extra,
                             "--finetune", str(converted_path(ctx, p["epochs"]))], record))
    return jobs
