"""The main job: pretraining, conversion and every transfer task, each from MAE and from random
initialisation, with a report.

    python tools/demo.py --output runs/demo [--preset demo|smoke] [--config FILE.json] [--from-stage STAGE]

(``python -m pipeline.demo`` is the same.)  Stages: data -> pretrain -> figures -> convert -> checkpoints (the
study's probes of the kept pretraining checkpoints; none in the demo) -> finetune -> detection -> segmentation ->
linprobe -> partial -> report.  Each stage calls the toolkit's own command
lines (their modules' ``main``, in this process, to save start-up time; the equivalent shell commands
are printed and written to the report, so any row can be re-run by hand).  A failing stage stops the
pipeline with a message naming it, keeps every earlier stage's outputs, and ``--from-stage`` resumes
there.  ``--config`` takes a JSON file that overrides the preset: real data (``data_root`` holding
imagenet/, coco/, ade/ADEChallengeData2016), ViT-B flags, more epochs; for several GPUs run the
stages' printed commands under ``torchrun``.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections import Counter
from pathlib import Path

from maecore.cli import run_cli
from maecore.errors import UserError
from pipeline.context import Context
from pipeline.jobs import Job, StageFailed, first_line, run_jobs
from pipeline.plan import JOB_STAGES
from pipeline.presets import PRESETS
from pipeline.report_data import row_order
from pipeline.results import write_results
from pipeline.stages import STAGES, stage_data
from pipeline.study_monitor import write_monitor_study


def run_pipeline(out: Path, cfg: dict, from_stage: str, to_stage: str | None = None) -> Path:
    """Run the stages from ``from_stage`` to ``to_stage`` (default: the last) into ``out``; return the report's
    path.  Rows of stages not run are kept from the earlier run's results.json."""
    names = [n for n, _ in STAGES]
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, cfg)
    saved = out / "results.json"
    start = names.index(from_stage)
    stop = names.index(to_stage) + 1 if to_stage else len(names)
    if stop <= start:
        raise UserError(f"--to-stage {to_stage} comes before --from-stage {from_stage}")
    walls: dict[str, float] = {}
    if start:
        if not saved.exists():
            raise UserError(f"--from-stage {from_stage}: no earlier run in {out} (results.json missing)")
        prev = json.loads(saved.read_text())
        keep = set(names[:start]) | set(names[stop:])  # stages this call does not run keep their commands
        ctx.results = prev.get("results", {})
        ctx.commands = [tuple(c) for c in prev.get("commands", []) if c[0] in keep]
        walls = {k: v for k, v in prev.get("stage_wall_s", {}).items() if k in keep}
    t0 = time.time()

    def save(name: str) -> None:
        ctx.commands.sort(key=lambda c: names.index(c[0]))  # stage order (stable within a stage)
        if rows := ctx.results.get("rows"):  # side by side, rows arrive as runs finish: the table keeps stage order
            ordered = sorted(rows.items(), key=lambda kv: row_order(kv[0], ctx.cfg["inits"]))
            rows.clear()  # in place: the pending jobs' record() hold this dict
            rows.update(ordered)
        saved.write_text(json.dumps({"results": ctx.results, "commands": ctx.commands, "config": cfg,
                                     "done": name == names[-1], "stage_wall_s": walls}, indent=1))

    def fail(name: str, first: str, details: str, resume: str) -> UserError:
        log = out / f"{name}-error.log"
        log.write_text(details)
        return UserError(f"stage '{name}' failed: {first} (details: {log}); earlier stages' outputs are kept in "
                         f"{out}; fix the cause and re-run with --from-stage {resume}")

    def run_group(group: list[str]) -> None:
        """Transfer stages' jobs through one pool; each stage completes (its wall, results.json) once its jobs
        and every earlier stage's are done, so the stage walls add up to the total."""
        jobs = [job for n in group for job in dict(STAGES)[n](ctx)]  # type: ignore[union-attr]
        left = Counter(job.stage for job in jobs)
        todo = list(group)
        mark = time.time()

        def complete() -> None:
            nonlocal mark
            while todo and left[todo[0]] == 0:
                n = todo.pop(0)
                walls[n] = time.time() - mark
                mark = time.time()
                save(n)

        def done(job: Job) -> None:
            left[job.stage] -= 1
            complete()

        complete()  # stages without jobs
        try:
            run_jobs(ctx, jobs, done)
        except StageFailed as e:
            raise fail(e.stage, str(e), e.details, todo[0] if todo else e.stage) from None

    i = start
    while i < stop:
        name, fn = STAGES[i]
        t_stage = time.time()
        if name not in JOB_STAGES:
            try:
                fn(ctx)
            except Exception as e:  # noqa: BLE001 - every failure of a stage is reported the same way
                raise fail(name, first_line(e), traceback.format_exc(), name) from None
            walls[name] = time.time() - t_stage
            save(name)
            i += 1
            continue
        # a run of transfer stages: their jobs go through one pool (run_jobs)
        j = i
        while j < stop and STAGES[j][0] in JOB_STAGES:
            j += 1
        run_group([n for n, _ in STAGES[i:j]])
        i = j
    print(f"\ndone in {time.time() - t0:.0f} s: {out / 'report.md'}")
    return out / "report.md"


def run_seeds(out: Path, cfg: dict, from_stage: str, to_stage: str | None = None) -> Path:
    """The study: one whole pipeline per training seed on one shared world, then the aggregate report.  A seed
    whose run finished (results.json says done) is not re-run, so an interrupted study resumes at its seed."""
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.get("data_root"):
        ctx = Context(out, cfg)
        if not (ctx.world / "imagenet").is_dir():  # one world for every seed, made once
            stage_data(ctx)
        cfg = {**cfg, "data_root": str(ctx.world)}
    for seed in cfg["seeds"]:
        run_dir = out / f"seed{seed}"
        saved = run_dir / "results.json"
        if saved.exists() and json.loads(saved.read_text()).get("done") and from_stage == STAGES[0][0]:
            print(f"[study] seed {seed}: finished earlier ({run_dir}), kept", flush=True)
            continue
        print(f"\n[study] seed {seed} -> {run_dir}", flush=True)
        run_pipeline(run_dir, {**cfg, "seed": seed}, from_stage, to_stage)
        from_stage = STAGES[0][0]  # --from-stage applies to the first unfinished seed only
    dirs = [out / f"seed{s}" for s in cfg["seeds"]]
    md = write_results(out, dirs)
    write_monitor_study(out, dirs)  # #26: do the monitors at each kept checkpoint predict its probes?
    return md


def main(argv: list[str] | None = None) -> Path:
    names = [n for n, _ in STAGES]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--from-stage", choices=names, default=names[0])
    p.add_argument("--to-stage", choices=names, default=None, help="stop after this stage (default: run to the end)")
    p.add_argument("--config", help="JSON file overriding the preset's settings")
    args = p.parse_args(argv)
    cfg = json.loads(json.dumps(PRESETS[args.preset]))
    if args.config:
        try:
            cfg.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read config {args.config}: {e}") from None
    out = Path(args.output)
    if cfg.get("seeds"):
        return run_seeds(out, cfg, args.from_stage, args.to_stage)
    return run_pipeline(out, cfg, args.from_stage, args.to_stage)


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
