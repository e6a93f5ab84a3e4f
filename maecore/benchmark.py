"""The benchmark harness: timing protocol, memory and FLOP-rate helpers, environment, JSON.

The benchmarks themselves live with what they measure (``pretrain.benchmark``, each task package's
``benchmark``: its ``benchmark_step`` is :func:`task_step` on what the task supplies, :class:`TaskBench`);
``pipeline.benchmark`` is the command line that runs them (``tools/benchmark.py``).

Timing protocol: warm-up steps are excluded; each variant runs ``windows`` timed windows of ``steps``
steps, windows of competing variants are interleaved (A B, B A, ...) so that drift of a shared machine
hits both alike; we report medians, and speed-ups as the median of the per-window ratios.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

SCHEMA_VERSION = 1

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for model FLOP
# utilisation.  Matched by substring of torch.cuda.get_device_name(); first match wins.
GPU_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
]


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Untimed warm-up steps, then ``windows`` timed windows of ``steps`` steps each."""

    warmup: int
    windows: int
    steps: int


@dataclass
class Variant:
    """One way of running a training step: ``step()`` runs one step and returns the loss (no host sync).

    ``info`` (what was built: attention, amp, optimizer, peak memory…) is given when the variant is made
    and goes into the JSON as is; :func:`run_windows` fills ``windows`` and ``warmup_s``."""

    name: str
    step: Callable[[], torch.Tensor]
    images_per_step: int
    info: dict[str, Any] = field(default_factory=dict)
    windows: list[float] = field(default_factory=list)  # seconds per step, per window
    warmup_s: float | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_windows(variants: list[Variant], device: torch.device, timing: Timing) -> None:
    """Warm up every variant, then time ``timing.windows`` windows of ``timing.steps`` steps, alternating
    the order of the variants each round (A B, B A, ...) so that slow drift cancels out."""
    for v in variants:
        t0 = time.perf_counter()
        for _ in range(timing.warmup):
            loss = v.step()
        if timing.warmup:
            float(loss.detach())  # sync: warm-up (and compilation) ends before timing starts
            sync(device)
            v.warmup_s = round(time.perf_counter() - t0, 3)
    for w in range(timing.windows):
        order = variants if w % 2 == 0 else variants[::-1]
        for v in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(timing.steps):
                loss = v.step()
            float(loss.detach())  # one sync per window, so queued GPU work is counted
            sync(device)
            v.windows.append((time.perf_counter() - t0) / timing.steps)


def summary(v: Variant) -> dict[str, Any]:
    """Median step time and rate, the windows, the variant's info (and its warm-up time, if any)."""
    med = statistics.median(v.windows)
    out = {"step_s": med, "img_per_s": v.images_per_step / med, "step_s_windows": [round(s, 5) for s in v.windows], **v.info}
    if v.warmup_s is not None:
        out["warmup_s"] = v.warmup_s
    return out


def speedup(fast: Variant, slow: Variant) -> float:
    """Median over windows of slow/fast step time (windows were interleaved pairwise)."""
    return statistics.median(s / f for f, s in zip(fast.windows, slow.windows))


# --------------------------------------------------------------------------------------------------
# Task training steps: one skeleton, each task supplies what differs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskBench:
    """What a task package's step benchmark supplies (its ``benchmark.py``); :func:`task_step` does the rest.

    ``recipe`` names the task's recipe a ViT size borrows (its hyper-parameters and heads); ``parse_config``,
    ``build_model`` and ``build_optimizer`` are the task's own (so the timed step is the one its training runs);
    ``batch_loss(cfg, runner, device, batch_size)`` makes a fixed synthetic batch on the device and returns the
    closure computing the training loss on it through ``runner`` (the model, or its compiled form); ``info(cfg,
    model)`` says what was built beyond the size (``patch_size``, ``recipe``…: the benchmark's JSON)."""

    recipe: Callable[[str], str]
    parse_config: Callable[..., Any]
    build_model: Callable[[Any, torch.device], nn.Module]
    build_optimizer: Callable[[Any, nn.Module, torch.device], torch.optim.Optimizer]
    batch_loss: Callable[[Any, nn.Module, torch.device, int], Callable[[], torch.Tensor]]
    info: Callable[[Any, nn.Module], dict[str, Any]]
    flags: tuple[str, ...] = ()  # more command-line flags (a data path the step never reads, a head's classes…)


def task_step(
    task: TaskBench,
    device: torch.device,
    batch_size: int,
    amp: str,
    compile: bool,
    arch: str | None = None,
    input_size: int | None = None,
    patch_size: int | None = None,
) -> tuple[Callable[[], torch.Tensor], int, dict[str, Any]]:
    """One training step of ``task`` with a ViT-``arch`` (default ``base``) on ``batch_size`` images, built from the
    command line of its recipe (``None`` sizes: the recipe's) as one process: the engine's
    :class:`~maecore.engine.TrainStep` (forward, backward, optimizer) on a fixed batch already on the device, no host
    sync.  Returns the step closure, the images per step and what was built (merged into the benchmark's JSON)."""
    from maecore.engine import TrainStep  # the engine's step: imported when a task is benchmarked

    arch = arch or "base"
    argv = ["--recipe", task.recipe(arch), "--model", arch, "--batch_size", str(batch_size), *task.flags]
    if input_size is not None:
        argv += ["--input_size", str(input_size)]
    if patch_size is not None:
        argv += ["--patch_size", str(patch_size)]
    cfg = task.parse_config(argv, world_size=1)  # the lr of one process's batch

    model = task.build_model(cfg, device)
    model.to(device).train()
    optimizer = task.build_optimizer(cfg, model, device)
    runner = torch.compile(model) if compile else model
    loss_fn = task.batch_loss(cfg, runner, device, batch_size)
    train_step = TrainStep(model, optimizer, lambda m, batch: (loss_fn(), {}), device, amp, runner=runner)

    def step() -> torch.Tensor:
        return train_step(None)  # the engine's step; the batch is fixed on the device

    return step, batch_size, {"arch": arch, "input_size": cfg.input_size, **task.info(cfg, model)}


# --------------------------------------------------------------------------------------------------
# FLOP rate and memory
# --------------------------------------------------------------------------------------------------
def device_peak_tflops(device: torch.device, amp: str) -> float | None:
    """The device's dense bf16/fp16 peak, or None (CPU, fp32, a GPU not in ``GPU_PEAK_TFLOPS``)."""
    if device.type != "cuda" or amp not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


def flop_rate(img_per_s: float, train_flops_per_img: float, device: torch.device, amp: str) -> dict[str, float | None]:
    """Achieved TFLOP/s, the device's peak and the model FLOP utilisation (None where no peak is known)."""
    tflops = img_per_s * train_flops_per_img / 1e12
    peak = device_peak_tflops(device, amp)
    return {"tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak if peak else None}


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs its forward
    (the activation memory of a training step; CPU has no allocator peak counter)."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[(s.data_ptr(), str(t.device))] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Parameters + gradients (one per trainable parameter) + optimizer state tensors."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if optimizer is not None:
        for st in optimizer.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.ndim > 0)
    return n


def step_memory(step: Callable[[], torch.Tensor], forward: Callable[[], torch.Tensor], model: nn.Module,
                optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    """Peak memory of one training ``step`` of ``model``: the CUDA allocator's peak over it, or on CPU an
    estimate = parameters + gradients + optimizer state + the activations ``forward`` (the step's
    forward, returning the loss) saves for backward.  Runs one step either way (so the optimizer state
    exists).  On CUDA, what other variants keep on the device is not counted: the peak is taken above
    the memory allocated before the step, less ``model``'s parameters."""
    if device.type == "cuda":
        sync(device)
        others = torch.cuda.memory_allocated(device) - sum(p.numel() * p.element_size() for p in model.parameters())
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return {"peak_mem_mb": round((torch.cuda.max_memory_allocated(device) - others) / 2**20, 1),
                "peak_mem_kind": "cuda max_memory_allocated"}
    step()
    acts = saved_activation_bytes(forward)
    optimizer.zero_grad(set_to_none=True)
    return {"activation_mb": round(acts / 2**20, 1),
            "peak_mem_mb": round((acts + state_bytes(model, optimizer)) / 2**20, 1),
            "peak_mem_kind": "estimate: params + grads + optimizer state + saved activations"}


def max_rss_mb() -> float:
    """Peak resident set of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def load_avg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment(device: torch.device) -> dict[str, Any]:
    """Machine, load and library versions, recorded with every result."""
    import PIL
    import timm
    import torchvision

    try:
        import fvcore

        fv = getattr(fvcore, "__version__", "installed")
    except ImportError:
        fv = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": load_avg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "fvcore": fv,
        "pillow": PIL.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def env_header(env: dict[str, Any]) -> list[str]:
    """The table's first line: device, torch, threads, load."""
    load = fmt(env["load_avg"][0]) if env["load_avg"] else "-"
    return ["", f"# {env['device']} ({env['gpu'] or env['cpu']}), torch {env['torch']}, {env['torch_threads']} threads, load {load}"]


def write_json(res: dict[str, Any], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=1, default=str))
    return p
