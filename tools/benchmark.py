#!/usr/bin/env python
"""Speed benchmarks: MAE pretraining step (ours vs the official way), encoder with vs without mask
tokens (paper Table 1c / 2), data pipeline vs model step rate, and task step hooks.

Examples (see docs/benchmarks.md for measured numbers):

    python tools/benchmark.py --model mae_vit_base_patch16 --batch_size 8 --baseline --json runs/bench.json
    python tools/benchmark.py --bench mask_tokens --mt_model mae_vit_large_patch16 --mt_batch_size 8
    python tools/benchmark.py --bench data --num_workers 0 1 2 --jpeg_draft
    python tools/benchmark.py --bench finetune detection segmentation --batch_size 2
    python tools/benchmark.py --bench finetune detection segmentation --task_arch tiny --task_input_size 64 --batch_size 2

Timing protocol: warm-up steps are excluded; each variant runs ``--windows`` timed windows of
``--steps`` steps, windows of competing variants are interleaved (A B B A A B ...) so that drift of
a shared machine hits both alike; we report medians, and speed-ups as the median of the per-window
ratios.  Everything a variant needs is built before any timing starts, from the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from maecore.cli import run_cli  # noqa: E402
from maecore.engine import autocast, resolve_amp  # noqa: E402
from maecore.errors import UserError  # noqa: E402
from maecore.optim import adamw, param_groups  # noqa: E402
from maecore.vit import ARCHS, set_fused_attention  # noqa: E402
from pretrain.model import MODELS, MaskedAutoencoderViT, build_mae  # noqa: E402

NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed", "encoder_mask_token")
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

# Task step benchmarks (fine-tune / detection / segmentation) plug in here.  A task package adds a
# module ``<pkg>/benchmark.py`` with
#     def benchmark_step(device: torch.device, batch_size: int, amp: str, compile: bool,
#                        arch: str | None, input_size: int | None, patch_size: int | None)
#         -> tuple[Callable[[], torch.Tensor], int]
# building the task's real model + optimizer through the package's own builders (None sizes: its
# recipe's) and returning a closure that runs ONE full training step (forward, backward, optimizer)
# on a fixed synthetic batch and returns the loss (no host sync), plus the number of images per
# step; an ``info`` dict on the closure (arch, input_size, patch_size, recipe...) goes into the
# JSON.  The harness below times it with the same warm-up / window / median protocol as pretraining.
TASK_BENCHMARKS: dict[str, str] = {
    "finetune": "classification.benchmark",
    "detection": "detection.benchmark",
    "segmentation": "segmentation.benchmark",
}
BENCHES = ("pretrain", "mask_tokens", "data", *TASK_BENCHMARKS)


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
def block_macs(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-adds of one pre-norm transformer block: qkv + proj + MLP (4 + 2r)·N·D², plus
    q·kᵀ and attn·v 2·N²·D (norms, softmax and GELU are not counted)."""
    return int((4 + 2 * mlp_ratio) * tokens * dim * dim + 2 * tokens * tokens * dim)


def mae_macs(model: MaskedAutoencoderViT, mask_ratio: float, encoder_mask_tokens: bool | None = None) -> dict[str, int]:
    """Analytic forward multiply-adds per image of an MAE, split into encoder and decoder."""
    mt = model.encoder_mask_tokens if encoder_mask_tokens is None else encoder_mask_tokens
    length = model.num_patches
    keep = length if mt else int(length * (1 - mask_ratio))
    n_enc = model.num_prefix_tokens + keep
    d, dd = model.embed_dim, model.decoder_embed_dim
    pix = model.patch_size**2 * model.in_chans
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / d
    enc = length * pix * d + len(model.blocks) * block_macs(n_enc, d, mlp_ratio)
    n_dec = 1 + length
    dec = n_enc * d * dd + len(model.decoder_blocks) * block_macs(n_dec, dd, mlp_ratio) + n_dec * dd * pix
    return {"encoder": enc, "decoder": dec, "total": enc + dec}


def fvcore_macs(model: MaskedAutoencoderViT, mask_ratio: float, input_size: int) -> dict[str, int]:
    """fvcore's count (its "flops" are multiply-adds) on one image, through the explicit-softmax
    attention path: fvcore has no handler for SDPA and would silently skip attention."""
    from fvcore.nn import FlopCountAnalysis

    m = copy.deepcopy(model).eval()
    set_fused_attention(m, False)
    x = torch.zeros(1, m.in_chans, input_size, input_size)
    with torch.no_grad():
        fca = FlopCountAnalysis(m, (x, mask_ratio))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by = fca.by_module()
    enc = sum(by.get(k, 0) for k in ("patch_embed", "blocks", "norm"))
    dec = sum(by.get(k, 0) for k in ("decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred"))
    return {"encoder": int(enc), "decoder": int(dec), "total": int(fca.total())}


def device_peak_tflops(device: torch.device, amp: str) -> float | None:
    if device.type != "cuda" or amp not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
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


def max_rss_mb() -> float:
    """Peak resident set of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One way of running a training step: ``step()`` runs one step and returns the loss."""

    name: str
    step: Callable[[], torch.Tensor]
    images_per_step: int
    info: dict[str, Any] = field(default_factory=dict)
    windows: list[float] = field(default_factory=list)  # seconds per step, per window


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_windows(variants: list[Variant], device: torch.device, warmup: int, windows: int, steps: int) -> None:
    """Warm up every variant, then time ``windows`` windows of ``steps`` steps, alternating the
    order of the variants each round (A B, B A, ...) so that slow drift cancels out."""
    for v in variants:
        t0 = time.perf_counter()
        for _ in range(warmup):
            loss = v.step()
        if warmup:
            float(loss.detach())  # sync: warm-up (and compilation) ends before timing starts
            sync(device)
            v.info["warmup_s"] = round(time.perf_counter() - t0, 3)
    for w in range(windows):
        order = variants if w % 2 == 0 else variants[::-1]
        for v in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = v.step()
            float(loss.detach())  # one sync per window, so queued GPU work is counted
            sync(device)
            v.windows.append((time.perf_counter() - t0) / steps)


def summary(v: Variant) -> dict[str, Any]:
    med = statistics.median(v.windows)
    return {
        "step_s": med,
        "img_per_s": v.images_per_step / med,
        "step_s_windows": [round(s, 5) for s in v.windows],
        **v.info,
    }


def speedup(fast: Variant, slow: Variant) -> float:
    """Median over windows of slow/fast step time (windows were interleaved pairwise)."""
    return statistics.median(s / f for f, s in zip(fast.windows, slow.windows))


# --------------------------------------------------------------------------------------------------
# Pretraining step: ours and the official recipe
# --------------------------------------------------------------------------------------------------
def make_optimizer_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    return param_groups(model, weight_decay, no_weight_decay=NO_WEIGHT_DECAY)


def host_batch(batch_size: int, input_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A normalised-image-like batch in host memory, pinned when it will be copied to a GPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=g)
    return x.pin_memory() if device.type == "cuda" else x


def ours_variant(
    model: MaskedAutoencoderViT,
    batch: torch.Tensor,
    device: torch.device,
    amp: str,
    mask_ratio: float,
    compile_model: bool = False,
    name: str = "ours",
) -> Variant:
    """How our engine runs a step: SDPA attention, bf16 autocast without a scaler (GPU), fused
    AdamW (maecore.optim.adamw), pinned + non-blocking host->device copy, no host sync."""
    set_fused_attention(model, True)
    opt = adamw(make_optimizer_groups(model), 1.5e-4, (0.9, 0.95), device)
    runner = torch.compile(model) if compile_model else model

    def step() -> torch.Tensor:
        imgs = batch.to(device, non_blocking=True)
        with autocast(device, amp):
            loss, _, _ = runner(imgs, mask_ratio=mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fused = "fused" if opt.defaults.get("fused") else "foreach" if opt.defaults.get("foreach") else "for-loop"
    info = {"attention": "sdpa", "amp": amp, "grad_scaler": False, "optimizer": f"AdamW ({fused})",
            "host_sync_per_step": False, "compile": compile_model, "ddp_find_unused_parameters": False}
    v = Variant(name, step, batch.shape[0], info)
    v.model, v.optimizer = model, opt  # type: ignore[attr-defined]
    return v


def grad_norm(parameters) -> torch.Tensor:
    """The official ``misc.get_grad_norm_`` (computed every step even without clipping)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    return torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)


def baseline_variant(model: MaskedAutoencoderViT, batch: torch.Tensor, device: torch.device, mask_ratio: float) -> Variant:
    """The official ``main_pretrain.py`` step on the same model: explicit softmax attention, fp16
    autocast + GradScaler (``NativeScalerWithGradNormCount``, unscale + grad norm every step) on a
    GPU and fp32 on CPU, default ``torch.optim.AdamW`` (for-loop on CPU, foreach on CUDA),
    ``loss.item()`` and ``torch.cuda.synchronize()`` every iteration."""
    set_fused_attention(model, False)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in make_optimizer_groups(model)]
    opt = torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95))
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    params = list(model.parameters())

    def step() -> torch.Tensor:
        imgs = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise UserError(f"baseline loss is {loss_value}")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_norm(params)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        return loss

    info = {"attention": "explicit softmax", "amp": "fp16" if cuda else "none", "grad_scaler": cuda,
            "optimizer": "AdamW (torch default)", "host_sync_per_step": True, "compile": False,
            "ddp_find_unused_parameters": True}
    v = Variant("baseline", step, batch.shape[0], info)
    v.model, v.optimizer = model, opt  # type: ignore[attr-defined]
    return v


def measure_memory(v: Variant, device: torch.device) -> None:
    """Peak memory of one step: the CUDA allocator's peak, or on CPU an estimate = parameters +
    gradients + optimizer state + activations saved for backward."""
    model, opt = v.model, v.optimizer  # type: ignore[attr-defined]
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        v.step()
        sync(device)
        v.info["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        v.info["peak_mem_kind"] = "cuda max_memory_allocated"
        return
    acts = saved_activation_bytes(lambda: _forward_loss(v))
    opt.zero_grad(set_to_none=True)
    v.info["activation_mb"] = round(acts / 2**20, 1)
    v.info["peak_mem_mb"] = round((acts + state_bytes(model, opt)) / 2**20, 1)
    v.info["peak_mem_kind"] = "estimate: params + grads + optimizer state + saved activations"


def _forward_loss(v: Variant) -> torch.Tensor:
    model = v.model  # type: ignore[attr-defined]
    with autocast(v.info["_batch"].device, v.info["amp"]):  # bf16 autocast saves bf16 activations
        loss, _, _ = model(v.info["_batch"], mask_ratio=v.info["_mask_ratio"])
    return loss


def pretrain_bench(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], list[Variant]]:
    amp = resolve_amp(args.amp, device)
    torch.manual_seed(args.seed)
    model = build_mae(args.model, img_size=args.input_size, decoder_depth=args.decoder_depth).to(device)
    batch = host_batch(args.batch_size, args.input_size, device, args.seed)
    variants = []
    if args.baseline:  # same weights: a copy made before either variant trains
        base = baseline_variant(copy.deepcopy(model), batch, device, args.mask_ratio)
    ours = ours_variant(model, batch, device, amp, args.mask_ratio, args.compile)
    variants.append(ours)
    if args.baseline:
        variants.append(base)
    for v in variants:
        v.info["_batch"], v.info["_mask_ratio"] = batch.to(device), args.mask_ratio
        measure_memory(v, device)
    run_windows(variants, device, args.warmup, args.windows, args.steps)

    macs = mae_macs(model, args.mask_ratio)
    train_flops = 6 * macs["total"]  # forward + backward ≈ 3 × forward; 2 FLOPs per multiply-add
    out: dict[str, Any] = {
        "model": args.model, "batch_size": args.batch_size, "input_size": args.input_size,
        "mask_ratio": args.mask_ratio, "decoder_depth": args.decoder_depth, "amp": amp, "compile": args.compile,
        "warmup": args.warmup, "windows": args.windows, "steps_per_window": args.steps,
        "forward_macs_per_img": macs, "train_flops_per_img": train_flops, "variants": {},
    }
    for v in variants:
        s = summary(v)
        s["tflops"] = s["img_per_s"] * train_flops / 1e12
        peak = device_peak_tflops(device, v.info["amp"])
        s["peak_tflops"] = peak
        s["mfu"] = s["tflops"] / peak if peak else None
        out["variants"][v.name] = {k: x for k, x in s.items() if not k.startswith("_")}
    out["speedup_vs_baseline"] = speedup(ours, variants[1]) if args.baseline else None
    return out, variants


# --------------------------------------------------------------------------------------------------
# Encoder with vs without mask tokens (Table 1c / Table 2)
# --------------------------------------------------------------------------------------------------
def mask_tokens_bench(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One MAE holding the ``encoder_mask_token`` parameter, run with the flag on (every position
    goes through the encoder) and off (visible patches only): same weights, same decoder.
    Timed: forward + backward (the part the design changes); the optimizer step, identical for
    both, is timed separately and added for the full-step ratio."""
    amp = resolve_amp(args.amp, device)
    torch.manual_seed(args.seed)
    model = build_mae(args.mt_model, img_size=args.input_size, decoder_depth=args.mt_decoder_depth,
                      encoder_mask_tokens=True).to(device)
    set_fused_attention(model, True)
    batch = host_batch(args.mt_batch_size, args.input_size, device, args.seed).to(device)

    def fwd_bwd(with_tokens: bool) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            model.encoder_mask_tokens = with_tokens
            with autocast(device, amp):
                loss, _, _ = model(batch, mask_ratio=args.mask_ratio)
            loss.backward()
            for p in model.parameters():
                p.grad = None
            return loss

        return step

    with_v = Variant("with_mask_tokens", fwd_bwd(True), args.mt_batch_size)
    without_v = Variant("without_mask_tokens", fwd_bwd(False), args.mt_batch_size)
    run_windows([without_v, with_v], device, args.mt_warmup, args.mt_windows, 1)

    opt_s = None
    if args.mt_optimizer:
        opt = adamw(make_optimizer_groups(model), 1.5e-4, (0.9, 0.95), device)
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        opt_v = Variant("adamw_step", lambda: (opt.step(), torch.zeros(()))[1], args.mt_batch_size)
        run_windows([opt_v], device, 1, args.mt_windows, 1)
        opt_s = statistics.median(opt_v.windows)
        del opt
        for p in model.parameters():
            p.grad = None

    fb = speedup(without_v, with_v)
    t_with, t_without = statistics.median(with_v.windows), statistics.median(without_v.windows)
    analytic = {k: mae_macs(model, args.mask_ratio, k) for k in (True, False)}
    res: dict[str, Any] = {
        "model": args.mt_model, "batch_size": args.mt_batch_size, "decoder_depth": args.mt_decoder_depth,
        "mask_ratio": args.mask_ratio, "amp": amp,
        "with_mask_tokens": summary(with_v), "without_mask_tokens": summary(without_v),
        "speedup_fwd_bwd": fb,
        "optimizer_step_s": opt_s,
        "speedup_step": (t_with + opt_s) / (t_without + opt_s) if opt_s is not None else None,
        "paper_table2_speedup": {8: 2.8, 1: 3.7}.get(args.mt_decoder_depth),
        "macs_analytic": {"with_mask_tokens": analytic[True], "without_mask_tokens": analytic[False],
                          "ratio": analytic[True]["total"] / analytic[False]["total"],
                          "encoder_ratio": analytic[True]["encoder"] / analytic[False]["encoder"]},
    }
    if args.fvcore:
        model.cpu()
        fv = {}
        for k in (True, False):
            model.encoder_mask_tokens = k
            fv[k] = fvcore_macs(model, args.mask_ratio, args.input_size)
        res["macs_fvcore"] = {"with_mask_tokens": fv[True], "without_mask_tokens": fv[False],
                              "ratio": fv[True]["total"] / fv[False]["total"],
                              "encoder_ratio": fv[True]["encoder"] / fv[False]["encoder"]}
    return res


# --------------------------------------------------------------------------------------------------
# Data pipeline
# --------------------------------------------------------------------------------------------------
def parse_hw(text: str) -> tuple[int, int]:
    """'500x375' (W x H, as photo sizes are quoted) -> (H, W)."""
    try:
        w, h = (int(s) for s in text.lower().split("x"))
    except ValueError:
        raise UserError(f"photo size must look like 500x375 (width x height), got {text!r}") from None
    if w < 16 or h < 16:
        raise UserError(f"photo size {text} is too small")
    return h, w


def make_photo_folder(root: Path, n: int, hw: tuple[int, int], seed: int = 0) -> Path:
    """``n`` JPEG photos of size ``hw`` (H, W) in ``root``: random crops / flips of scikit-image's
    bundled photographs, resized, so decode cost matches real photos (texture, not flat colour)."""
    import numpy as np
    from PIL import Image
    from skimage import data as skd

    root.mkdir(parents=True, exist_ok=True)
    srcs = [Image.fromarray(f()) for f in (skd.astronaut, skd.chelsea, skd.coffee, skd.rocket)]
    rng = np.random.default_rng(seed)
    h, w = hw
    for i in range(n):
        im = srcs[i % len(srcs)]
        sw, sh = im.size
        cw, ch = int(sw * rng.uniform(0.6, 1.0)), int(sh * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        out = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        out.save(root / f"photo_{i:05d}.jpg", quality=90)
    return root


def data_sets(args: argparse.Namespace, work: Path) -> list[tuple[str, str, Path]]:
    """(name, image size, folder) of every image set the data benchmark reads."""
    if args.data_path:
        return [("user", "as stored", Path(args.data_path))]
    from maecore.synthetic import make_imagenet

    sets = []
    per_class = max(1, math.ceil(args.data_images / 10))
    root = make_imagenet(work / "synthetic", per_class, 0, size=args.synthetic_size, seed=args.seed, overwrite=True)
    sets.append(("synthetic", f"{args.synthetic_size}x{args.synthetic_size}", root / "train"))
    for text in args.photo_sizes:
        hw = parse_hw(text)
        sets.append(("photos", text, make_photo_folder(work / f"photos_{text}", args.data_images, hw, args.seed)))
    return sets


def loader_rate(dataset, batch_size: int, num_workers: int, batches: int, pin: bool) -> float:
    """Images per second out of a DataLoader like the engine's (persistent workers, pinned memory
    on GPU), after the workers have started and produced a first batch."""
    from torch.utils.data import DataLoader, RandomSampler

    bs = min(batch_size, len(dataset))
    prefetch = 2
    drain = prefetch * num_workers + 1
    sampler = RandomSampler(dataset, replacement=True, num_samples=bs * (batches + drain + 1))
    dl = DataLoader(dataset, batch_size=bs, sampler=sampler, num_workers=num_workers, pin_memory=pin,
                    drop_last=True, persistent_workers=num_workers > 0, prefetch_factor=prefetch if num_workers else None)
    it = iter(dl)
    # start the workers and drain the batches they prefetched, so the timed ones arrive at the
    # steady-state rate (the main process consumes instantly, as a fast GPU would)
    for _ in range(drain):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    del it, dl
    return batches * bs / dt


def data_bench(args: argparse.Namespace, device: torch.device, model_img_s: float | None) -> dict[str, Any]:
    from pretrain.data import build_pretrain_dataset

    tmp = None
    if args.data_dir:
        work = Path(args.data_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mae-bench-")
        work = Path(tmp.name)
    runs = []
    try:
        for name, size, folder in data_sets(args, work):
            for draft in ([False, True] if args.jpeg_draft else [False]):
                ds = build_pretrain_dataset(folder, args.input_size, jpeg_draft=draft)
                for nw in args.num_workers:
                    rate = loader_rate(ds, args.data_batch_size, nw, args.data_batches, device.type == "cuda")
                    runs.append({"dataset": name, "image_size": size, "jpeg_draft": draft, "num_workers": nw,
                                 "img_per_s": rate, "img_per_s_per_worker": rate / max(nw, 1),
                                 "vs_model": rate / model_img_s if model_img_s else None})
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"input_size": args.input_size, "batch_size": args.data_batch_size, "batches": args.data_batches,
            "model_img_per_s": model_img_s, "runs": runs}


# --------------------------------------------------------------------------------------------------
# Task step hooks
# --------------------------------------------------------------------------------------------------
def task_bench(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    modname = TASK_BENCHMARKS[name]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and modname.startswith(e.name):
            return {"status": "not available", "module": modname}
        raise
    amp = resolve_amp(args.amp, device)
    size = {"arch": args.task_arch, "input_size": args.task_input_size, "patch_size": args.task_patch_size}
    out, err = io.StringIO(), io.StringIO()
    try:
        # the packages' builders print run-time notes ("no --finetune checkpoint": expected here) and
        # their parsers report a bad size as usage + exit: keep the table clean, make that one line
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            step, images = mod.benchmark_step(device, args.batch_size, amp, args.compile, **size)
    except SystemExit as e:
        lines = err.getvalue().strip().splitlines() or [f"exit status {e.code}"]
        msg = lines[-1].split("error: ", 1)[-1]
        raise UserError(f"--bench {name}: {msg} (check --task_input_size / --task_patch_size)") from None
    except UserError as e:
        raise UserError(f"--bench {name}: {e}") from None
    if err.getvalue():
        sys.stderr.write(err.getvalue())  # warnings are not chatter
    info = {"arch": args.task_arch, "input_size": args.task_input_size, **getattr(step, "info", {})}
    v = Variant(name, step, images, {"amp": amp, "batch_size": images, "compile": args.compile, **info})
    run_windows([v], device, args.warmup, args.windows, args.steps)
    return {"status": "ok", "module": modname, **summary(v)}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
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
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
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


def print_table(res: dict[str, Any]) -> None:
    env = res["env"]
    print(f"\n# {env['device']} ({env['gpu'] or env['cpu']}), torch {env['torch']}, {env['torch_threads']} threads, "
          f"load {fmt(env['load_avg'][0]) if env['load_avg'] else '-'}")
    if "pretrain" in res:
        p = res["pretrain"]
        print(f"\n## pretraining step: {p['model']}, batch {p['batch_size']}, {p['input_size']} px, mask {p['mask_ratio']}, "
              f"decoder depth {p['decoder_depth']}")
        print(f"{'variant':<10} {'img/s':>9} {'step s':>8} {'peak MB':>9} {'TFLOP/s':>8} {'MFU':>6}  how")
        for name, v in p["variants"].items():
            how = f"{v['attention']}, amp {v['amp']}, {v['optimizer']}, sync/step {v['host_sync_per_step']}"
            print(f"{name:<10} {v['img_per_s']:>9.2f} {v['step_s']:>8.3f} {fmt(v.get('peak_mem_mb'), 0):>9} "
                  f"{v['tflops']:>8.3f} {fmt(v['mfu'], 3):>6}  {how}")
        if p["speedup_vs_baseline"] is not None:
            print(f"speed-up vs baseline: {p['speedup_vs_baseline']:.2f}x (median of per-window ratios)")
    if "mask_tokens" in res:
        m = res["mask_tokens"]
        print(f"\n## encoder with vs without mask tokens: {m['model']}, batch {m['batch_size']}, decoder depth {m['decoder_depth']}")
        print(f"fwd+bwd s: with {m['with_mask_tokens']['step_s']:.3f}, without {m['without_mask_tokens']['step_s']:.3f} "
              f"-> {m['speedup_fwd_bwd']:.2f}x; with AdamW step: {fmt(m['speedup_step'])}x "
              f"(paper Table 2: {fmt(m['paper_table2_speedup'], 1)}x)")
        for label, key in (("analytic:", "macs_analytic"), ("fvcore:", "macs_fvcore")):
            if key in m:
                c = m[key]
                print(f"GMACs/img {label:<9} with {c['with_mask_tokens']['total'] / 1e9:.2f}, without "
                      f"{c['without_mask_tokens']['total'] / 1e9:.2f} -> {c['ratio']:.2f}x (encoder {c['encoder_ratio']:.2f}x)")
    if "data" in res:
        d = res["data"]
        print(f"\n## data pipeline: decode + RandomResizedCrop({d['input_size']}) + flip + normalise; "
              f"model step rate {fmt(d['model_img_per_s'])} img/s")
        print(f"{'images':<10} {'size':>10} {'draft':>6} {'workers':>7} {'img/s':>9} {'vs model':>9}")
        for r in d["runs"]:
            print(f"{r['dataset']:<10} {r['image_size']:>10} {r['jpeg_draft']!s:>6} {r['num_workers']:>7} "
                  f"{r['img_per_s']:>9.1f} {fmt(r['vs_model']):>9}")
    tasks = [name for name in TASK_BENCHMARKS if name in res]
    if tasks:
        print("\n## task training steps (forward, backward, optimizer) on a fixed synthetic batch")
        print(f"{'task':<13} {'arch':>6} {'size':>5} {'patch':>5} {'batch':>5} {'amp':>5} {'img/s':>9} {'step s':>8}  recipe")
        for name in tasks:
            t = res[name]
            if t["status"] != "ok":
                print(f"{name:<13} {t['status']} ({t['module']})")
                continue
            print(f"{name:<13} {fmt(t['arch']):>6} {fmt(t['input_size']):>5} {fmt(t.get('patch_size')):>5} {t['batch_size']:>5} "
                  f"{t['amp']:>5} {t['img_per_s']:>9.2f} {t['step_s']:>8.3f}  {fmt(t.get('recipe'))}")


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
                   help="ours: auto = bf16 on GPUs that support it, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile our model (baseline never is)")
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
    g.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
    g.add_argument("--jpeg_draft", action="store_true", help="also run with JPEG draft-mode decoding")
    g.add_argument("--data_batch_size", type=int, default=32)
    g.add_argument("--data_batches", type=int, default=8)
    g = p.add_argument_group("task steps (finetune, detection, segmentation; also take --batch_size, --amp, --compile)")
    g.add_argument("--task_arch", default=None, choices=sorted(ARCHS),
                   help="ViT size of the task models (default: the recipes' base)")
    g.add_argument("--task_input_size", type=int, default=None,
                   help="input side: fine-tune image, detection LSJ size, segmentation crop (default: 224 / 1024 / 512)")
    g.add_argument("--task_patch_size", type=int, default=None, help="override the ViT patch size (default: the size's)")
    return p


def check_args(args: argparse.Namespace) -> None:
    for k in ("batch_size", "input_size", "mt_batch_size", "data_images", "data_batch_size", "data_batches"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k} must be >= 1")
    for k in ("task_input_size", "task_patch_size"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UserError(f"--{k} must be >= 1")
    if not 0.0 <= args.mask_ratio < 1.0:
        raise UserError("--mask_ratio must be in [0, 1)")
    if args.input_size % 16 and args.input_size % 14:
        raise UserError(f"--input_size {args.input_size} is not a multiple of the patch size")
    if any(n < 0 for n in args.num_workers):
        raise UserError("--num_workers must be >= 0")
    if args.data_path and not Path(args.data_path).is_dir():
        raise UserError(f"--data_path is not a directory: {args.data_path}")
    for text in args.photo_sizes:
        parse_hw(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    check_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, device)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gpu = device.type == "cuda"
    args.warmup = (10 if gpu else 2) if args.warmup is None else args.warmup
    args.windows = 5 if args.windows is None else args.windows
    args.steps = (20 if gpu else 1) if args.steps is None else args.steps
    if args.windows < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--windows and --steps must be >= 1, --warmup >= 0")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (loss, optimizer) on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    res: dict[str, Any] = {"schema": SCHEMA_VERSION, "argv": args.argv,
                           "env": environment(device)}
    model_rate = None
    if "pretrain" in args.bench:
        res["pretrain"], variants = pretrain_bench(args, device)
        model_rate = res["pretrain"]["variants"]["ours"]["img_per_s"]
        del variants
    if "mask_tokens" in args.bench:
        res["mask_tokens"] = mask_tokens_bench(args, device)
    if "data" in args.bench:
        res["data"] = data_bench(args, device, model_rate)
    for name in TASK_BENCHMARKS:
        if name in args.bench:
            res[name] = task_bench(name, args, device)
    res["env"]["max_rss_mb"] = round(max_rss_mb(), 1)
    res["env"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print_table(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return res


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
