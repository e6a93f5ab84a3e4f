"""The main job: pretraining, conversion and every transfer task, each from MAE and from random
initialisation, with a report.

    python tools/demo.py --output runs/demo [--preset demo|smoke] [--config FILE.json] [--from-stage STAGE]

(``python -m pipeline.demo`` is the same.)  Stages: data -> pretrain -> figures -> convert -> linprobe ->
partial -> finetune -> detection -> segmentation -> report.  Each stage calls the toolkit's own command
lines (their modules' ``main``, in this process, to save start-up time; the equivalent shell commands
are printed and written to the report, so any row can be re-run by hand).  A failing stage stops the
pipeline with a message naming it, keeps every earlier stage's outputs, and ``--from-stage`` resumes
there.  ``--config`` takes a JSON file that overrides the preset: real data (``data_root`` holding
imagenet/, coco/, ade/ADEChallengeData2016), ViT-B flags, more epochs; for several GPUs run the
stages' printed commands under ``torchrun``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from maecore.cli import run_cli
from maecore.engine import EXIT_REQUEUE, STOP_SIGNALS, Preempted
from maecore.errors import UserError

# The demo: a ViT-tiny/8 on the 64-px synthetic world, every stage in CPU minutes.  Each task's list is
# appended to its recipe's command line; "inits" says which initialisations to compare.
PRESETS: dict[str, dict] = {
    "demo": {
        # coco/ade: n_train/n_val images per split; imagenet: imagenet_n_train/_n_val images per class, in the
        # "plain" style (one flat-coloured object per image: docs/demo_study.md, design (d): the cluttered
        # world's shapes were too hard for a few hundred ViT steps).  5,600 images: the transfer runs see new
        # images rather than repeats, for the same steps.
        # coco/ade in the "plain" style too: 1-3 flat-coloured objects of 6-28 % of the frame (the cluttered scenes'
        # 1-5 % distractors cover a patch or two, too few to read a shape from in a few hundred steps)
        "world": {"size": 64, "n_train": 400, "n_val": 50, "imagenet_n_train": 800, "imagenet_n_val": 100,
                  "imagenet_style": "plain", "scene_style": "plain", "seed": 0},
        "data_root": None,  # None: generate the synthetic world under <output>/world
        "inits": ["mae", "random"],
        # the transfer runs two at a time, each its own process on half the cores: 1.37x the throughput of one
        # 2-thread run after another on 2 cores (docs/demo_study.md, session 3)
        "parallel": 2,
        # detection and segmentation from MAE only: their random-init runs would cost ~3.5 min that 15 minutes
        # do not have (the study preset runs both)
        "dense_inits": ["mae"],
        # precision: every stage's --amp auto (bf16 where the CPU has native bf16, ~1.35x a tiny-ViT step; fp32
        # elsewhere, where emulated bf16 would be slower) and --attn auto (under bf16 on CPU the explicit softmax:
        # ~1.4x faster pretraining and fine-tuning steps); the report names both
        "pretrain": ["--recipe", "demo", "--epochs", "10"],  # 870 steps
        "linprobe": ["--recipe", "demo_linprobe", "--cache_features", "--epochs", "30"],
        # one block (the row; the last-MLP variant would cost two more runs)
        "partial": ["--recipe", "demo_partial", "--epochs", "3"],  # 525 steps
        "partial_blocks": [1.0],
        "finetune": ["--recipe", "demo", "--epochs", "6"],  # 1,050 steps (docs/demo_study.md: the curves)
        # short schedules want mild scale jitter: LSJ 0.8-1.25 instead of the recipe's 0.5-2 (box AP 12.8 vs 4.4 at
        # 600 steps; mask AP 8.7 there, 6.3 at 500), ratio 0.9-1.1 instead of 0.75-1.5 (mIoU 20.0 vs 16.4 at 900
        # iterations): docs/demo_study.md
        "detection": ["--recipe", "demo", "--epochs", "7", "--lsj_scale", "0.8", "1.25"],  # 700 steps
        "segmentation": ["--recipe", "demo", "--embed_dim", "192", "--num_heads", "3", "--ratio_range", "0.9", "1.1",
                         "--max_iters", "1000", "--eval_iters", "1000", "--warmup_iters", "30"],
        "segmentation_mae": ["--layer_decay", "0.65"],
    },
    # the same code path at the smallest size: what the test suite runs
    "smoke": {
        "world": {"size": 64, "n_train": 3, "n_val": 1, "seed": 0},
        "data_root": None,
        "inits": ["mae", "random"],
        "parallel": 2,
        "pretrain": ["--recipe", "demo", "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--log_every", "1"],
        "linprobe": ["--recipe", "demo_linprobe", "--cache_features", "--epochs", "1", "--batch_size", "8",
                     "--num_workers", "0"],
        "partial": ["--recipe", "demo_partial", "--epochs", "1", "--batch_size", "8", "--num_workers", "0"],
        "partial_blocks": [0.5],
        "finetune": ["--recipe", "demo", "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--max_steps", "1"],
        "detection": ["--recipe", "demo", "--epochs", "1", "--batch_size", "2", "--num_workers", "0", "--max_steps", "1",
                      "--max_eval_images", "2", "--vis_images", "1"],
        "segmentation": ["--recipe", "demo", "--embed_dim", "192", "--num_heads", "3", "--max_iters", "1",
                         "--eval_iters", "1", "--warmup_iters", "1", "--batch_size", "2", "--num_workers", "0",
                         "--num_vis", "1"],
        "segmentation_mae": [],
    },
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

    def show(self, stage: str, entry: str, args: list[str], threads: int | None = None) -> None:
        """Print a stage's command line and record it for the report (``threads``: the ``OMP_NUM_THREADS=N``
        prefix of a run in its own process)."""
        shown = (f"OMP_NUM_THREADS={threads} " if threads is not None else "") + " ".join(
            shlex.quote(a) for a in ["python", *entry.split(), *args])
        print(f"\n[{stage}] $ {shown}", flush=True)
        self.commands.append((stage, shown))

    def run(self, stage: str, entry: str, args: list[str]) -> dict:
        """Call one of the toolkit's command lines in-process; record it; a failure names the stage."""
        self.show(stage, entry, args)
        t0 = time.time()
        try:
            res = entry_main(entry)(args)
        except Preempted:  # the stage checkpointed on SIGTERM/SIGUSR1/SIGINT: so does the pipeline
            print(f"[{stage}] stopped by a signal; rerun with --from-stage {stage}", flush=True)
            raise
        except SystemExit as e:  # argparse rejected the stage's arguments
            raise UserError(f"bad arguments (exit {e.code})") from None
        res = dict(res) if isinstance(res, dict) else {}
        res["wall_s"] = time.time() - t0
        return res


# the study: the demo's pipeline, every row from both inits, three training seeds on the same world (seed 0);
# `<output>/seed<N>/` holds each seed's whole demo run, `<output>/results.md` the mean ± std and curves
PRESETS["study"] = {**json.loads(json.dumps(PRESETS["demo"])), "dense_inits": ["mae", "random"], "seeds": [0, 1, 2]}


def common(ctx: Context) -> list[str]:
    # --overwrite: a rerun of a stage (`--from-stage`, `make demo` again) starts it afresh; earlier checkpoints
    # are set aside
    return ["--no_progress", "--seed", str(ctx.cfg.get("seed", 0)), "--overwrite"]


ROOT = Path(__file__).resolve().parents[1]

# The command line each stage shows (``python <entry> ARGS``) -> the module whose ``main(argv)`` runs it.
ENTRIES: dict[str, str] = {
    "tools/make_synthetic.py": "synthetic.__main__",
    "tools/visualize.py": "pretrain.visualize",
    "tools/convert.py": "maecore.convert.__main__",
    "-m pretrain": "pretrain.train",
    "-m classification": "classification.train",
    "-m detection": "detection.train",
    "-m segmentation": "segmentation.train",
}


def entry_main(entry: str) -> Callable[[list[str]], object]:
    """``main`` of the module behind a stage's command line (imported on first use)."""
    return importlib.import_module(ENTRIES[entry]).main


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------
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


def stage_figures(ctx: Context) -> None:
    ckpt = ctx.out / "pretrain" / "checkpoint-last.pth"
    val = sorted((ctx.world / "imagenet" / "val").rglob("*.jpg"))
    imgs = [str(p) for p in val[:: max(1, len(val) // 6)][:6]]
    ctx.run("figures", "tools/visualize.py", [str(ckpt), *imgs, "-o", str(ctx.out / "reconstruction.png")])
    loss_curve(ctx.out / "pretrain", ctx.out / "pretrain_loss.png")


def stage_convert(ctx: Context) -> None:
    ckpt = ctx.out / "pretrain" / "checkpoint-last.pth"
    for task in ("classification", "detection", "segmentation"):
        ctx.run("convert", "tools/convert.py", [str(ckpt), "-o", str(ctx.out / "converted" / f"{task}.pth"),
                                                "--to", task, "--force"])


def _init_args(ctx: Context, task: str, init: str) -> list[str]:
    return ["--finetune", str(ctx.out / "converted" / f"{task}.pth")] if init == "mae" else []


@dataclass
class Job:
    """One transfer run: a CLI command, and what files its result (the CLI's summary dict) into the results."""

    stage: str
    label: str  # e.g. "finetune mae": prefixes the run's output lines when runs go side by side
    entry: str
    args: list[str]
    record: Callable[[dict], None]


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
        label = "partial fine-tune, last MLP" if k == 0.5 else f"partial fine-tune, {k:g} block(s)"
        jobs += _classify(ctx, "partial", label, f"tune{k:g}", [*ctx.cfg["partial"], "--tune_blocks", str(k)])
    return jobs


def jobs_finetune(ctx: Context) -> list[Job]:
    return _classify(ctx, "finetune", "fine-tune", "finetune", ctx.cfg["finetune"])


def dense_inits(ctx: Context) -> list[str]:
    """Detection and segmentation may compare fewer inits than the classification rows (budget)."""
    return ctx.cfg.get("dense_inits", ctx.cfg["inits"])


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


def first_line(e: BaseException) -> str:
    """An exception in one line, for a stage's failure message (its type when it has no text)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def transfer_threads(parallel: int) -> int:
    """Torch threads of each transfer run when ``parallel`` go side by side: an equal share of the cores."""
    return max(1, (os.cpu_count() or 1) // parallel)


class StageFailed(Exception):
    """A transfer run failed: ``stage`` names it, the message is its last error line, ``details`` its output."""

    def __init__(self, stage: str, message: str, details: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.details = details


def run_jobs(ctx: Context, jobs: list[Job], done: Callable[[Job], None]) -> None:
    """Run the transfer jobs, ``ctx.cfg["parallel"]`` at a time (1: one after another in this process).

    Side by side, each job is its own process (``python -m …``, as the report shows it) with its share of the
    cores as torch threads: on 2 cores two 1-thread runs finish together 1.37x sooner than the same two runs
    one after the other on 2 threads (a tiny ViT's step does not spread well over threads; docs/demo_study.md).
    Their output lines come prefixed with the job's label.  After a failure no new job starts; the running
    ones finish.  A stop signal is passed on to the runs (each checkpoints and exits 75), then the pipeline
    stops as a stage would; a run that the signal ends before it could checkpoint (still starting, or evaluating
    after its last step) counts as stopped too: its stage is rerun anyway."""
    parallel = int(ctx.cfg.get("parallel", 1))
    if parallel <= 1:
        for job in jobs:
            try:
                res = ctx.run(job.stage, job.entry, job.args)
            except Exception as e:  # noqa: BLE001 - any failure of a run fails its stage, named
                raise StageFailed(job.stage, first_line(e), traceback.format_exc()) from None
            job.record(res)
            done(job)
        return
    threads = transfer_threads(parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    pending = deque(jobs)
    running: dict[subprocess.Popen, tuple[Job, float, deque, threading.Thread]] = {}
    failed: list[tuple[Job, str, str]] = []
    stopped: list[Job] = []  # jobs that checkpointed on a stop signal (exit 75), or that it ended
    signalled: list[int] = []  # the stop signals this process received, in order
    told: dict[subprocess.Popen, int] = {}  # how many of them each run has been passed
    lock = threading.Lock()

    def pump(proc: subprocess.Popen, job: Job, tail: deque) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            tail.append(line.rstrip("\n"))
            with lock:
                print(f"[{job.label}] {line}", end="", flush=True)

    def note(signum: int, _frame: object) -> None:
        # only noted: the loop passes it on (pass_on), so a run started while a signal came, before it was in
        # `running`, gets it too, and none gets one twice (handler and loop share the main thread)
        signalled.append(signum)

    def pass_on() -> None:
        for proc in running:
            while told[proc] < len(signalled):
                if proc.poll() is None:
                    proc.send_signal(signalled[told[proc]])
                told[proc] += 1

    def ended_by_signal(code: int) -> bool:
        """Did a run exit because of a signal passed on (killed by it, or its KeyboardInterrupt's 130)?"""
        return any(code in (-s, 128 + s) for s in signalled)

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
    def may_start() -> bool:
        return not (failed or stopped or signalled)

    try:
        # after a failure or a stop the jobs still pending never start: the loop ends with the last running one
        while running or (pending and may_start()):
            while pending and len(running) < parallel and may_start():
                job = pending.popleft()
                with lock:
                    ctx.show(job.stage, job.entry, job.args, threads)
                # a session of its own: a Ctrl-C reaches the pipeline, which passes it on once
                proc = subprocess.Popen([sys.executable, *entry_argv(job.entry), *job.args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, start_new_session=True)
                tail: deque = deque(maxlen=200)
                reader = threading.Thread(target=pump, args=(proc, job, tail), daemon=True)
                reader.start()
                running[proc] = (job, time.time(), tail, reader)
                told[proc] = 0
            pass_on()
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                job, t0, tail, reader = running.pop(proc)
                del told[proc]
                reader.join()
                if proc.returncode == 0:
                    res = last_json(tail)
                    if res is None:
                        failed.append((job, f"{job.label}: it printed no result", "\n".join(tail)))
                        continue
                    res["wall_s"] = time.time() - t0
                    job.record(res)
                    done(job)
                elif proc.returncode == EXIT_REQUEUE or ended_by_signal(proc.returncode):
                    stopped.append(job)
                else:
                    errors = [t for t in tail if t.startswith("error:")]
                    why = errors[-1][len("error:"):].strip() if errors else (tail[-1] if tail else "no output")
                    failed.append((job, f"{job.label}: {why} ({exit_text(proc.returncode)})", "\n".join(tail)))
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if failed:
        raise StageFailed(failed[0][0].stage, failed[0][1], failed[0][2])
    if stopped or signalled:
        left = stopped + list(pending)
        first = min((j.stage for j in left), key=[n for n, _ in STAGES].index) if left else jobs[-1].stage
        print(f"[{first}] stopped by a signal; rerun with --from-stage {first}", flush=True)
        raise Preempted(f"stopped by a signal during stage {first}")


def exit_text(code: int) -> str:
    """A run's exit status in words: ``exit 1``, or ``killed by SIGKILL`` (Popen's negative status)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit {code}"


def entry_argv(entry: str) -> list[str]:
    """What follows ``python`` for a stage's command line: ``-m pkg`` as is, a script by its path here."""
    return entry.split() if entry.startswith("-m ") else [str(ROOT / entry)]


def last_json(lines: Iterable[str]) -> dict | None:
    """The last line that is a JSON object: every CLI prints its summary so, at the end."""
    for line in reversed(list(lines)):
        if line.startswith("{"):
            try:
                res = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(res, dict):
                return res
    return None


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


def _fmt(v: float | None) -> str:
    """Every task reports percentages (top-1, AP, mIoU); NaN/None shows as a dash."""
    return "–" if v is None or v != v else f"{v:.1f}"


def top1_se(pct: float, n: int) -> float:
    """Standard error, in points, of a top-1 accuracy ``pct`` measured on ``n`` images (binomial)."""
    p = min(max(pct / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def results_table(rows: dict[str, dict], inits: list[str]) -> list[str]:
    """The report's table: each init's value (± its standard error where one is known: top-1 on n images), the
    MAE − random difference (with '(> 2 SE)' when it is beyond two standard errors of the difference), the
    number of val images, wall times.  AP and mIoU have no closed-form error: their noise is the seed spread of
    the study preset."""
    tasks = list(dict.fromkeys(k.split("|")[0] for k in rows))
    head = "| task | metric | " + " | ".join(f"{i} init" for i in inits) + " | MAE − random | val images | wall time (s) |"
    lines = [head, "|" + "---|" * (len(inits) + 5)]
    for t in tasks:
        cells = [rows.get(f"{t}|{i}") for i in inits]
        metric = next(c["metric"] for c in cells if c)
        ses = [top1_se(c["value"], c["n"]) if c and metric == "top-1" and c.get("n") and c.get("value") is not None else None
               for c in cells]
        vals = [_fmt(c["value"] if c else None) + (f" ± {se:.1f}" if se is not None else "") for c, se in zip(cells, ses)]
        try:
            i_mae, i_rnd = inits.index("mae"), inits.index("random")
            diff = float(cells[i_mae]["value"]) - float(cells[i_rnd]["value"])  # type: ignore[index]
            delta = f"{diff:+.1f}"
            if ses[i_mae] is not None and ses[i_rnd] is not None:
                se_diff = math.hypot(ses[i_mae], ses[i_rnd])
                delta += " (> 2 SE)" if abs(diff) > 2 * se_diff else f" (< 2 SE = {2 * se_diff:.1f})"
        except (ValueError, IndexError, TypeError, KeyError):
            delta = "–"
        n = next((c.get("n") for c in cells if c and c.get("n")), None)
        walls = " / ".join(f"{c['wall_s']:.0f}" for c in cells if c)
        lines.append(f"| {t} | {metric} | " + " | ".join(vals) + f" | {delta} | {int(n) if n else '–'} | {walls} |")
    return lines


def machine_line(cfg: dict) -> str:
    """Where the numbers came from: they are bit-reproducible only on the same CPU kind, thread count and
    precision (README, "Reproducibility"), so the report says which."""
    import platform

    import torch

    from maecore.engine import describe_amp, resolve_amp, resolve_attention

    cpu = torch.device("cpu")
    parallel = int(cfg.get("parallel", 1))
    transfer = (f"; the transfer runs {parallel} side by side, {transfer_threads(parallel)} thread(s) each"
                if parallel > 1 else "")
    amp = resolve_amp("auto", cpu)
    return (f"Machine: {platform.machine()}, {os.cpu_count()} cores; pretraining on {torch.get_num_threads()} torch "
            f"threads{transfer}; torch {torch.__version__}; "
            f"{describe_amp('auto', amp, cpu)}; attention: {resolve_attention('auto', cpu, amp)} (--attn auto) "
            "unless a stage's command says otherwise.")


def stage_report(ctx: Context) -> None:
    pre = ctx.results.get("pretrain", {})
    rows = ctx.results.get("rows", {})
    table = results_table(rows, ctx.cfg["inits"])
    train_dir = ctx.world / "imagenet" / "train"
    n_cls = sum(1 for d in train_dir.iterdir() if d.is_dir()) if train_dir.is_dir() else 0
    chance = f" Chance level: {100 / n_cls:.1f} % top-1 ({n_cls} classes)." if n_cls else ""
    figs = []
    for title, rel in [("detection predictions (MAE init)", "detection/mae/predictions.png"),
                       ("segmentation predictions (MAE init)", "segmentation/mae/vis")]:
        p = ctx.out / rel
        if p.is_dir():
            pngs = sorted(p.glob("*.png"))[:4]
            figs += [f"**{title}**", ""] + [f"![{title}]({x.relative_to(ctx.out)})" for x in pngs] + [""]
        elif p.exists():
            figs += [f"**{title}**", "", f"![{title}]({rel})", ""]
    lines = [
        "# MAE toolkit demo report",
        "",
        f"Pretraining: loss {pre.get('first_loss', float('nan')):.4f} -> {pre.get('last_loss', float('nan')):.4f} over "
        f"{pre.get('steps', '?')} steps ({pre.get('wall_s', 0):.0f} s). Transfer, each from the converted MAE "
        "checkpoint and from random initialisation with the same budget (final-epoch numbers, val split; "
        f"AP and mIoU in %).{chance} ± is one standard error of a top-1 number (binomial over the val images);"
        " AP and mIoU carry no closed-form error: the study preset's seed spread is their noise.",
        *([f" Detection and segmentation ran from {' and '.join(dense_inits(ctx))} init only: both inits do not fit"
           " the preset's budget (`--preset study` runs them, docs/results.md has its numbers)."]
          if set(dense_inits(ctx)) != set(ctx.cfg["inits"]) else []),
        "",
        machine_line(ctx.cfg),
        "",
        *table,
        "",
        "![pretraining loss](pretrain_loss.png)",
        "",
        "![reconstructions](reconstruction.png)",
        "",
        *figs,
        "## Commands",
        "",
        "Each row's exact command (run from the repository root):",
        "",
        "```",
        *[c for _, c in ctx.commands],
        "```",
    ]
    (ctx.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(table))


# the transfer stages build jobs (run_jobs: side by side with "parallel" > 1, across stages); the others run here
JOB_STAGES = ("linprobe", "partial", "finetune", "detection", "segmentation")
STAGES: list[tuple[str, Callable[[Context], object]]] = [
    ("data", stage_data),
    ("pretrain", stage_pretrain),
    ("figures", stage_figures),
    ("convert", stage_convert),
    # the transfer stages longest first: their runs share one pool ("parallel" at a time), and starting the long
    # ones first leaves the short ones to fill the gaps at the end (longest-processing-time order: ~40 s less on 2
    # cores than linear probe first, where detection and segmentation ran last side by side); the report's rows
    # keep the paper's order whatever the order of the runs
    ("finetune", jobs_finetune),
    ("detection", jobs_detection),
    ("segmentation", jobs_segmentation),
    ("linprobe", jobs_linprobe),
    ("partial", jobs_partial),
    ("report", stage_report),
]


ROW_STAGES = (("linear probe", "linprobe"), ("partial", "partial"), ("fine-tune", "finetune"), ("detection", "detection"),
              ("segmentation", "segmentation"))


def row_order(key: str, inits: list[str]) -> tuple[int, int]:
    """Sort key of a results row ``"<task>|<init>"``: its task in the paper's order (``ROW_STAGES``, not the order the
    stages run in), then its init (the sort is stable within)."""
    task, init = key.split("|")
    row = next((i for i, (prefix, _) in enumerate(ROW_STAGES) if task.startswith(prefix)), len(ROW_STAGES))
    return row, inits.index(init) if init in inits else len(inits)


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
    from pipeline.results import write_results

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
    return write_results(out, [out / f"seed{s}" for s in cfg["seeds"]])


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
