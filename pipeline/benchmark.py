"""Speed benchmarks: MAE pretraining step (ours vs the official way), encoder with vs without mask
tokens (paper Table 1c / 2), data pipeline vs model step rate, and task step hooks.

Examples (see docs/benchmarks.md for measured numbers):

    python tools/benchmark.py --model mae_vit_base_patch16 --batch_size 8 --baseline --json runs/bench.json
    python tools/benchmark.py --bench mask_tokens --mt_model mae_vit_large_patch16 --mt_batch_size 8
    python tools/benchmark.py --bench data --num_workers 0 1 2 --photo_sizes 500x375 1600x1200 --data_images 256
    python tools/benchmark.py --bench finetune detection segmentation --batch_size 2
    python tools/benchmark.py --bench monitor --model mae_vit_base_patch16 --batch_size 64   # --monitor's cost
    python tools/benchmark.py --bench finetune detection segmentation --task_arch tiny --task_input_size 64 --batch_size 2

Timing protocol: warm-up steps are excluded; each variant runs ``--windows`` timed windows of
``--steps`` steps, windows of competing variants are interleaved (A B B A A B ...) so that drift of
a shared machine hits both alike; we report medians, and speed-ups as the median of the per-window
ratios.  Everything a variant needs is built before any timing starts, from the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from maecore import benchmark as harness
from maecore.cli import run_cli
from maecore.engine import resolve_amp
from maecore.errors import UserError
from maecore.models import SIZES
from pretrain import benchmark as pretrain_bench
from pretrain import benchmark_data as data_bench
from pretrain import benchmark_monitor as monitor_bench
from pretrain.model import MODELS
from pretrain.recipes import RECIPES as PRETRAIN_RECIPES

SCHEMA_VERSION = harness.SCHEMA_VERSION

# Task step benchmarks (fine-tune / detection / segmentation) plug in here.  A task package adds a
# module ``<pkg>/benchmark.py`` with
#     def benchmark_step(device: torch.device, batch_size: int, amp: str, compile: bool,
#                        arch: str | None, input_size: int | None, patch_size: int | None)
#         -> tuple[Callable[[], torch.Tensor], int, dict[str, Any]]
# building the task's real model + optimizer through the package's own builders (None sizes: its
# recipe's) and returning a closure that runs ONE full training step (the engine's TrainStep:
# forward, backward, optimizer) on a fixed synthetic batch and returns the loss (no host sync), the
# number of images per step, and a dict saying what was built (arch, input_size, patch_size,
# recipe...) for the JSON.  It is timed with the same warm-up / window / median protocol as pretraining.
TASK_BENCHMARKS: dict[str, str] = {
    "finetune": "classification.benchmark",
    "detection": "detection.benchmark",
    "segmentation": "segmentation.benchmark",
}
StepBuilder = Callable[..., tuple[Callable[[], torch.Tensor], int, dict[str, Any]]]


# Each task's hook is imported when its benchmark runs: a task package takes seconds to import, and a package
# without the module is reported "not available" rather than breaking the other benchmarks.
def _finetune_step() -> StepBuilder:
    from classification.benchmark import benchmark_step

    return benchmark_step


def _detection_step() -> StepBuilder:
    from detection.benchmark import benchmark_step

    return benchmark_step


def _segmentation_step() -> StepBuilder:
    from segmentation.benchmark import benchmark_step

    return benchmark_step


# name -> the ``benchmark_step`` of the module TASK_BENCHMARKS names
TASK_STEPS: dict[str, Callable[[], StepBuilder]] = {
    "finetune": _finetune_step,
    "detection": _detection_step,
    "segmentation": _segmentation_step,
}
BENCHES = ("pretrain", "mask_tokens", "data", "monitor", *TASK_BENCHMARKS)


def task_bench(name: str, args: argparse.Namespace, device: torch.device, timing: harness.Timing) -> dict[str, Any]:
    """Time the ``benchmark_step`` of the package registered as ``name`` ("not available" if it has none)."""
    modname = TASK_BENCHMARKS[name]
    try:
        benchmark_step = TASK_STEPS[name]()
    except ModuleNotFoundError as e:
        if e.name and modname.startswith(e.name):
            return {"status": "not available", "module": modname}
        raise
    amp = resolve_amp(args.amp, device, cpu_bf16=False)
    size = {"arch": args.task_arch, "input_size": args.task_input_size, "patch_size": args.task_patch_size}
    out, err = io.StringIO(), io.StringIO()
    try:
        # the packages' builders print run-time notes ("no --finetune checkpoint": expected here) and
        # their parsers report a bad size as usage + exit: keep the table clean, make that one line
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            step, images, built = benchmark_step(device, args.batch_size, amp, args.compile, **size)
    except SystemExit as e:
        lines = err.getvalue().strip().splitlines() or [f"exit status {e.code}"]
        msg = lines[-1].split("error: ", 1)[-1]
        raise UserError(f"--bench {name}: {msg} (check --task_input_size / --task_patch_size)") from None
    except UserError as e:
        raise UserError(f"--bench {name}: {e}") from None
    if err.getvalue():
        sys.stderr.write(err.getvalue())  # warnings are not chatter
    info = {"amp": amp, "batch_size": images, "compile": args.compile, "arch": args.task_arch,
            "input_size": args.task_input_size, **built}
    v = harness.Variant(name, step, images, info)
    harness.run_windows([v], device, timing)
    return {"status": "ok", "module": benchmark_step.__module__, **harness.summary(v)}


def format_tasks(res: dict[str, Any]) -> list[str]:
    tasks = [name for name in TASK_BENCHMARKS if name in res]
    if not tasks:
        return []
    lines = ["", "## task training steps (forward, backward, optimizer) on a fixed synthetic batch",
             f"{'task':<13} {'arch':>6} {'size':>5} {'patch':>5} {'batch':>5} {'amp':>5} {'img/s':>9} {'step s':>8}  recipe"]
    fmt = harness.fmt
    for name in tasks:
        t = res[name]
        if t["status"] != "ok":
            lines.append(f"{name:<13} {t['status']} ({t['module']})")
            continue
        lines.append(f"{name:<13} {fmt(t['arch']):>6} {fmt(t['input_size']):>5} {fmt(t.get('patch_size')):>5} {t['batch_size']:>5} "
                     f"{t['amp']:>5} {t['img_per_s']:>9.2f} {t['step_s']:>8.3f}  {fmt(t.get('recipe'))}")
    return lines


def print_table(res: dict[str, Any]) -> None:
    lines = harness.env_header(res["env"])
    for key, section in (("pretrain", pretrain_bench.format_pretrain), ("mask_tokens", pretrain_bench.format_mask_tokens),
                         ("data", data_bench.format_data), ("monitor", monitor_bench.format_monitor)):
        if key in res:
            lines += section(res[key])
    lines += format_tasks(res)
    print("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", nargs="+", default=["pretrain"], choices=BENCHES, help="what to measure")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    g = p.add_argument_group("pretraining step")
    g.add_argument("--model", default="mae_vit_base_patch16", choices=sorted(MODELS))
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--input_size", type=int, default=224)
    g.add_argument("--mask_ratio", type=float, default=0.75)
    g.add_argument("--decoder_depth", type=int, default=8)
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="ours: auto = bf16 on GPUs that support it, fp32 on CPU (fp32 vs fp32; give bf16 for CPU bf16)")
    g.add_argument("--compile", action="store_true", help="torch.compile our model (baseline never is)")
    g.add_argument("--attn", default="auto", choices=["auto", "fused", "explicit"],
                   help="ours: the attention kernel, as the engine's --attn (auto: explicit softmax under bf16 on CPU)")
    g.add_argument("--baseline", action="store_true", help="also run the official recipe on the same weights")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 2 CPU / 10 GPU)")
    g.add_argument("--windows", type=int, default=None, help="timed windows per variant (default 5)")
    g.add_argument("--steps", type=int, default=None, help="steps per window (default 1 CPU / 20 GPU)")
    g = p.add_argument_group("encoder with vs without mask tokens")
    g.add_argument("--mt_model", default="mae_vit_large_patch16", choices=sorted(MODELS))
    g.add_argument("--mt_batch_size", type=int, default=2)
    g.add_argument("--mt_decoder_depth", type=int, default=8)
    g.add_argument("--mt_warmup", type=int, default=1)
    g.add_argument("--mt_windows", type=int, default=3)
    g.add_argument("--no_mt_optimizer", dest="mt_optimizer", action="store_false",
                   help="skip timing the AdamW step (saves its memory)")
    g.add_argument("--no_fvcore", dest="fvcore", action="store_false", help="skip the fvcore FLOP count")
    g = p.add_argument_group("data pipeline")
    g.add_argument("--data_path", default=None, help="an image folder to read instead of generated images")
    g.add_argument("--data_dir", default=None, help="where to write generated images (default: a temp dir)")
    g.add_argument("--data_images", type=int, default=64, help="images per generated set")
    g.add_argument("--synthetic_size", type=int, default=64, help="side of the synthetic-world images")
    g.add_argument("--photo_sizes", nargs="*", default=["500x375"], help="photo sets to generate, W x H")
    g.add_argument("--num_workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader workers to measure; 0 = the main process alone, i.e. one core (the per-core figure; "
                        "else 1 worker), the largest = all cores")
    g.add_argument("--jpeg_draft", action="store_true", help="also run the official pipeline with the old JPEG draft decoding")
    g.add_argument("--data_formats", nargs="+", default=list(data_bench.DATA_FORMATS), choices=list(data_bench.DATA_FORMATS),
                   help="store the generated sets as image folders, packed copies (maecore.data.packed, original bytes) and/or "
                        "packed --roi copies (re-encoded at quality 90 with restart markers: crop-box decoding), and/or the packed "
                        "copy read over HTTP range requests from an nginx on localhost (http; skipped with a line without nginx)")
    g.add_argument("--data_batch_size", type=int, default=32)
    g.add_argument("--data_batches", type=int, default=8)
    g = p.add_argument_group("--monitor's cost (pretraining steps with and without it; also takes the pretraining step's flags)")
    g.add_argument("--monitor_every", type=int, default=monitor_bench.EVERY, help="steps between measurements (the CLI's default)")
    g.add_argument("--monitor_bank", type=int, default=monitor_bench.BANK, help="kNN bank images (the CLI's default)")
    g.add_argument("--monitor_queries", type=int, default=monitor_bench.QUERIES, help="query images (the CLI's default)")
    g.add_argument("--monitor_data", default=None, help="a labelled folder for the monitor (default: generated, 7 classes)")
    g.add_argument("--measure_windows", type=int, default=3, help="timed measurements (after one untimed)")
    g.add_argument("--monitor_recipe", default=None, choices=sorted(PRETRAIN_RECIPES),
                   help="the model, batch size, input size and mask ratio of this pretraining recipe (demo: the demo's "
                        "ViT-tiny/8, 64 px, batch 64) instead of --model --batch_size --input_size --decoder_depth")
    g = p.add_argument_group("task steps (finetune, detection, segmentation; also take --batch_size, --amp, --compile)")
    g.add_argument("--task_arch", default=None, choices=sorted(SIZES),
                   help="ViT size of the task models (default: the recipes' base)")
    g.add_argument("--task_input_size", type=int, default=None,
                   help="input side: fine-tune image, detection LSJ size, segmentation crop (default: 224 / 1024 / 512)")
    g.add_argument("--task_patch_size", type=int, default=None, help="override the ViT patch size (default: the size's)")
    return p


def check_args(args: argparse.Namespace) -> None:
    for k in ("batch_size", "input_size", "mt_batch_size", "data_images", "data_batch_size", "data_batches", "monitor_every",
              "monitor_bank", "measure_windows"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k} must be >= 1")
    for k in ("task_input_size", "task_patch_size"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UserError(f"--{k} must be >= 1")
    if args.monitor_queries < 0:
        raise UserError("--monitor_queries must be >= 0")
    if args.monitor_data and not Path(args.monitor_data).is_dir():
        raise UserError(f"--monitor_data is not a directory: {args.monitor_data}")
    if not 0.0 <= args.mask_ratio < 1.0:
        raise UserError("--mask_ratio must be in [0, 1)")
    if args.input_size % 16 and args.input_size % 14:
        raise UserError(f"--input_size {args.input_size} is not a multiple of the patch size")
    if any(n < 0 for n in args.num_workers):
        raise UserError("--num_workers must be >= 0")
    if args.data_path and not Path(args.data_path).is_dir():
        raise UserError(f"--data_path is not a directory: {args.data_path}")
    for text in args.photo_sizes:
        data_bench.parse_hw(text)


def timing(args: argparse.Namespace, device: torch.device) -> harness.Timing:
    """``--warmup --windows --steps``, the unset ones at the device's defaults (2 / 5 / 1 on a CPU, 10 / 5 / 20 on a GPU)."""
    gpu = device.type == "cuda"
    t = harness.Timing((10 if gpu else 2) if args.warmup is None else args.warmup, 5 if args.windows is None else args.windows,
                       (20 if gpu else 1) if args.steps is None else args.steps)
    if t.windows < 1 or t.steps < 1 or t.warmup < 0:
        raise UserError("--windows and --steps must be >= 1, --warmup >= 0")
    return t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    check_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, device, argv)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


def run(args: argparse.Namespace, device: torch.device, argv: list[str]) -> dict[str, Any]:
    """The benches of ``args`` (parsed from ``argv``, which the JSON records) on ``device``."""
    gpu = device.type == "cuda"
    timed = timing(args, device)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (loss, optimizer) on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    res: dict[str, Any] = {"schema": SCHEMA_VERSION, "argv": argv, "env": harness.environment(device)}
    if "pretrain" in args.bench:
        res["pretrain"] = pretrain_bench.pretrain_bench(
            device, timed, model_name=args.model, batch_size=args.batch_size, input_size=args.input_size,
            mask_ratio=args.mask_ratio, decoder_depth=args.decoder_depth, amp=resolve_amp(args.amp, device, cpu_bf16=False),
            compile_model=args.compile, attn=args.attn,
            baseline=args.baseline, seed=args.seed)
    if "mask_tokens" in args.bench:
        res["mask_tokens"] = pretrain_bench.mask_tokens_bench(
            device, model_name=args.mt_model, batch_size=args.mt_batch_size, input_size=args.input_size,
            mask_ratio=args.mask_ratio, decoder_depth=args.mt_decoder_depth, amp=resolve_amp(args.amp, device, cpu_bf16=False),
            seed=args.seed,
            warmup=args.mt_warmup, windows=args.mt_windows, optimizer=args.mt_optimizer, fvcore=args.fvcore)
    if "data" in args.bench:
        model_rate = res["pretrain"]["variants"]["ours"]["img_per_s"] if "pretrain" in res else None
        res["data"] = data_bench.data_bench(
            device, input_size=args.input_size, batch_size=args.data_batch_size, batches=args.data_batches,
            num_workers=args.num_workers, jpeg_draft=args.jpeg_draft, model_img_per_s=model_rate,
            data_path=args.data_path, data_dir=args.data_dir, data_images=args.data_images,
            synthetic_size=args.synthetic_size, photo_sizes=args.photo_sizes, seed=args.seed,
            formats=tuple(dict.fromkeys(args.data_formats)))
    if "monitor" in args.bench:
        res["monitor"] = monitor_bench.monitor_bench(
            device, timed, model_name=args.model, batch_size=args.batch_size, input_size=args.input_size,
            mask_ratio=args.mask_ratio, decoder_depth=args.decoder_depth, amp=resolve_amp(args.amp, device, cpu_bf16=False),
            attn=args.attn, seed=args.seed, every=args.monitor_every, bank=args.monitor_bank, queries=args.monitor_queries,
            measure_windows=args.measure_windows, data=args.monitor_data, data_dir=args.data_dir, recipe=args.monitor_recipe)
    for name in TASK_BENCHMARKS:
        if name in args.bench:
            res[name] = task_bench(name, args, device, timed)
    res["env"]["max_rss_mb"] = round(harness.max_rss_mb(), 1)
    res["env"]["load_avg_end"] = harness.load_avg()
    print_table(res)
    if args.json:
        harness.write_json(res, args.json)
        print(f"\nwrote {args.json}")
    return res


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
