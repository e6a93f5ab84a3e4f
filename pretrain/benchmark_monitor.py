"""What ``--monitor`` costs pretraining (issue #26 item 4: at most 5 % of its wall time at the defaults), for
``tools/benchmark.py --bench monitor`` (``pipeline.benchmark``).

Side by side in one process, on the same weights and the same fixed batch: the pretraining step without the monitor
and with it (the engine's :class:`~maecore.engine.TrainStep` as in ``pretrain.benchmark``, plus the real
:class:`~maecore.monitor.Monitor` hook: its forward hook on the encoder's final norm and the online classifier's step
on every micro-batch), timed in interleaved windows (A B, B A, …, ``maecore.benchmark.run_windows``); and the
measurement itself (kNN, online classifier, RankMe on the unmasked features of ``--monitor_bank`` +
``--monitor_queries`` images), timed in windows of its own.  A run measures once every ``--monitor_every`` steps,
so its wall time per step with the monitor is ``step_with + measure / every``; the overhead is the median of the
per-window ratios with / without, less 1, plus ``measure / every`` over the step without.  Not counted: the
subset's one decode at the start (reported: ``subset_load_s``), and the extra measurements at step 0 and the last
step (one more each per run).  The steps here have no data loader, which a run
waits on too: the ratio is an upper bound of the monitor's share.

The monitor's images are a generated labelled folder (``synthetic.make_imagenet``: 7 classes, bank from ``train/``,
queries from ``val/``) unless ``--monitor_data`` names one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from maecore.benchmark import Timing, Variant, fmt, run_windows, speedup, summary
from maecore.engine import TrainStep, to_device, use_attention
from maecore.engine.logs import RunLogger
from maecore.monitor import Monitor, MonitorSubset
from maecore.monitor.cli import BANK, EVERY, QUERIES
from maecore.optim import adamw
from pretrain.benchmark import BETAS, LR, optimizer_groups
from pretrain.config import parse_config
from pretrain.model import build_mae
from pretrain.train import build_model, make_step_fn


class BenchRun:
    """What the :class:`Monitor` hook reads of a run (:class:`maecore.engine.run.Run`), for a loop without a
    trainer: the model, the micro-batch, the step, where records go (nowhere)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, amp: str, batch_size: int) -> None:
        self.model, self.device, self.amp = model, device, amp
        self.cfg = SimpleNamespace(batch_size=batch_size)
        self.step = self.epoch = 0
        self.batch: Any = None
        self.done = self.final = False
        self.logger = RunLogger(Path("."), enabled=False, loggers=[])

    def whole_weights(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def monitor_data(root: Path, bank: int, queries: int, input_size: int, seed: int) -> Path:
    """A labelled folder with ``bank`` training and ``queries`` validation images or more (7 classes)."""
    from synthetic import SHAPES, make_imagenet

    n = len(SHAPES)
    return make_imagenet(root / "monitor", max(1, math.ceil(bank / n)), max(1, math.ceil(queries / n)), size=input_size,
                         seed=seed, overwrite=True)


def monitor_bench(device: torch.device, timing: Timing, *, model_name: str, batch_size: int, input_size: int,
                  mask_ratio: float, decoder_depth: int, amp: str, attn: str = "auto", seed: int = 0,
                  every: int = EVERY, bank: int = BANK, queries: int = QUERIES, measure_windows: int = 3,
                  data: str | None = None, data_dir: str | None = None, recipe: str | None = None) -> dict[str, Any]:
    """The pretraining step without and with the monitor, and one measurement: per-step wall time and the overhead
    of ``--monitor`` at ``every`` / ``bank`` / ``queries`` (the CLI's defaults unless given).  ``recipe``: the model,
    batch size, input size and mask ratio of that pretraining recipe (``demo``: the demo's ViT-tiny/8 at 64 px, batch
    64) instead of ``model_name`` … ``decoder_depth``."""
    build = lambda: build_mae(model_name, img_size=input_size, decoder_depth=decoder_depth)  # noqa: E731
    if recipe is not None:
        cfg = parse_config(["--recipe", recipe, "--data_path", "unused"], world_size=1)
        model_name, batch_size, input_size, mask_ratio = cfg.model, cfg.batch_size, cfg.input_size, cfg.mask_ratio
        decoder_depth = cfg.decoder_depth
        build = lambda: build_model(cfg)  # noqa: E731
    with contextlib.ExitStack() as stack:
        if data is None:
            where = Path(data_dir) if data_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="monitor_bench_")))
            data = str(monitor_data(where, bank, queries, input_size, seed))
        res = _bench(device, timing, build, batch_size, input_size, mask_ratio, amp, attn, seed, every, bank, queries,
                     measure_windows, data)
    return {"model": model_name, "recipe": recipe, "batch_size": batch_size, "input_size": input_size, "mask_ratio": mask_ratio,
            "decoder_depth": decoder_depth, **res}


def _bench(device: torch.device, timing: Timing, build: Callable[[], torch.nn.Module], batch_size: int, input_size: int,
           mask_ratio: float, amp: str, attn: str, seed: int, every: int, bank: int, queries: int, measure_windows: int,
           data: str) -> dict[str, Any]:
    torch.manual_seed(seed)
    plain = build().to(device)
    watched = copy.deepcopy(plain)  # the same weights
    attention = [use_attention(m, attn, device, amp) for m in (plain, watched)][0]
    subset = MonitorSubset(data, input_size, bank, queries, seed)
    g = torch.Generator().manual_seed(seed)
    classes = max(len(subset.classes), 1)
    batch = to_device((torch.randn(batch_size, 3, input_size, input_size, generator=g),
                       torch.randint(0, classes, (batch_size,), generator=g), torch.zeros(batch_size, dtype=torch.long)), device)
    steps = {}
    for name, model in (("without", plain), ("with", watched)):
        opt = adamw(optimizer_groups(model), LR, BETAS, device)
        steps[name] = TrainStep(model, opt, make_step_fn(mask_ratio), device, amp)

    run = BenchRun(watched, device, amp, batch_size)
    monitor = Monitor(subset, every, watched.embed_dim, device, online=subset.labelled)
    monitor.trainer = run  # type: ignore[assignment]
    quiet = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(quiet):
        monitor._start()  # what before_train does: the forward hook, the subset decoded once
    load_s = time.perf_counter() - t0

    def without() -> torch.Tensor:
        return steps["without"](batch)

    def with_monitor() -> torch.Tensor:
        run.batch = batch
        loss = steps["with"](batch)  # the forward hook keeps the pooled visible tokens …
        monitor.after_backward()  # … the online classifier learns from them (the engine calls it per micro-batch)
        run.step += 1
        return loss

    def measure() -> torch.Tensor:
        with contextlib.redirect_stdout(quiet):  # its line ("monitor at step …") is not the table's
            monitor.measure()
        return torch.zeros(())

    a, b = Variant("without", without, batch_size), Variant("with", with_monitor, batch_size)
    run_windows([a, b], device, timing)
    m = Variant("measure", measure, len(subset.bank) + len(subset.queries))
    run_windows([m], device, Timing(1, measure_windows, 1))
    if not monitor.on:
        raise RuntimeError("the monitor turned itself off while benchmarked (see the warning above)")

    step_without, step_with = statistics.median(a.windows), statistics.median(b.windows)
    measure_s = statistics.median(m.windows)
    per_step = step_with + measure_s / every
    ratio = speedup(a, b)
    return {
        "amp": amp, "attention": "sdpa" if attention == "fused" else "explicit",
        "monitor_every": every, "monitor_bank": len(subset.bank), "monitor_queries": len(subset.queries),
        "online_classifier": monitor.online, "monitor_data": data,
        "warmup": timing.warmup, "windows": timing.windows, "steps_per_window": timing.steps,
        "without": summary(a), "with": summary(b), "measure": summary(m), "subset_load_s": round(load_s, 3),
        "step_ratio": ratio,  # median over windows of with / without: the online classifier's share
        "step_s_with_amortised": per_step,
        # as the harness reports speed-ups: the median of the per-window ratios (drift of a shared machine cancels),
        # plus the measurement's share of a step
        "overhead": ratio - 1 + measure_s / every / step_without,
        "target": 0.05,
    }


def format_monitor(r: dict[str, Any]) -> list[str]:
    ok = "within" if r["overhead"] <= r["target"] else "OVER"
    recipe = f" (recipe {r['recipe']})" if r.get("recipe") else ""
    return [
        "", f"## --monitor's cost: {r['model']}{recipe}, batch {r['batch_size']}, {r['input_size']} px, amp {r['amp']}; every "
        f"{r['monitor_every']} steps, bank {r['monitor_bank']}, queries {r['monitor_queries']}",
        f"{'':<28} {'step s':>9}",
        f"{'pretraining step':<28} {r['without']['step_s']:>9.4f}",
        f"{'+ monitor (each step)':<28} {r['with']['step_s']:>9.4f}  x{r['step_ratio']:.3f} (median of per-window ratios)",
        f"{'one measurement':<28} {r['measure']['step_s']:>9.3f}  (/ {r['monitor_every']} steps: "
        f"{r['measure']['step_s'] / r['monitor_every']:.4f} s a step)",
        f"{'+ monitor (amortised)':<28} {r['step_s_with_amortised']:>9.4f}  overhead {100 * r['overhead']:.2f} % "
        f"({ok} the {100 * r['target']:.0f} % target); subset decoded once in {fmt(r['subset_load_s'])} s",
    ]
