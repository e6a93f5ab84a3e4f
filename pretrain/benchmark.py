"""Pretraining benchmarks for ``tools/benchmark.py`` (``pipeline.benchmark``): the training step (ours vs
the official recipe), the encoder with vs without mask tokens (paper Table 1c / 2) and the input pipeline.

"Ours" is the engine's own step, ``maecore.engine.TrainStep`` around ``pretrain.train.make_step_fn``:
what ``python -m pretrain`` runs, minus the data loader (a fixed pinned host batch, copied to the device
each step as the loader's would be).  The baseline is the official ``main_pretrain.py`` step written
out on purpose: it is the comparison.  Timing, memory and the report's environment come from
``maecore.benchmark``.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from maecore.benchmark import Timing, Variant, flop_rate, fmt, run_windows, speedup, step_memory, summary
from maecore.engine import TrainStep, autocast, to_device, use_attention
from maecore.errors import UserError
from maecore.models.layers import set_fused_attention
from maecore.optim import adamw
from pretrain.model import MaskedAutoencoderViT, build_mae
from pretrain.train import make_step_fn
from pretrain.train import optimizer_groups as train_groups

WEIGHT_DECAY = 0.05
LR = 1.5e-4
BETAS = (0.9, 0.95)
PAPER_TABLE2_SPEEDUP = {8: 2.8, 1: 3.7}  # ViT-L, by decoder depth


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


def _with_without(counts: dict[bool, dict[str, int]]) -> dict[str, Any]:
    return {"with_mask_tokens": counts[True], "without_mask_tokens": counts[False],
            "ratio": counts[True]["total"] / counts[False]["total"],
            "encoder_ratio": counts[True]["encoder"] / counts[False]["encoder"]}


# --------------------------------------------------------------------------------------------------
# Pretraining step: ours and the official recipe
# --------------------------------------------------------------------------------------------------
def host_batch(batch_size: int, input_size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A loader-like ``(images, labels, skipped)`` batch of normalised-image-like noise in host memory,
    pinned when it will be copied to a GPU."""
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randn(batch_size, 3, input_size, input_size, generator=g),
             torch.zeros(batch_size, dtype=torch.long), torch.zeros(batch_size, dtype=torch.long))
    return tuple(t.pin_memory() for t in batch) if device.type == "cuda" else batch


def optimizer_groups(model: nn.Module) -> list[dict]:
    return train_groups(model, WEIGHT_DECAY)  # main_pretrain.py's groups, as training makes them


def ours_variant(model: MaskedAutoencoderViT, batch: tuple[torch.Tensor, ...], device: torch.device, amp: str,
                 mask_ratio: float, compile_model: bool = False, attn: str = "auto") -> Variant:
    """The engine's step: the engine's attention kernel (``--attn auto``: SDPA, or the explicit softmax under bf16 on
    a CPU), bf16 autocast without a scaler on GPU (fp16 gets the engine's GradScaler), fused AdamW
    (``maecore.optim.adamw``), pinned + non-blocking host->device copy, no host sync."""
    attention = use_attention(model, attn, device, amp)
    opt = adamw(optimizer_groups(model), LR, BETAS, device)
    runner = torch.compile(model) if compile_model else model
    train_step = TrainStep(model, opt, make_step_fn(mask_ratio), device, amp, runner=runner)

    def step() -> torch.Tensor:
        return train_step(to_device(batch, device))

    def forward() -> torch.Tensor:  # for the CPU memory estimate: eager, under the step's autocast (bf16 saves bf16)
        with autocast(device, amp):
            return train_step.step_fn(model, to_device(batch, device))[0]

    fused = "fused" if opt.defaults.get("fused") else "foreach" if opt.defaults.get("foreach") else "for-loop"
    info = {"attention": "sdpa" if attention == "fused" else "explicit",
            "amp": amp, "grad_scaler": train_step.scaler is not None, "optimizer": f"AdamW ({fused})",
            "host_sync_per_step": False, "compile": compile_model, "ddp_find_unused_parameters": False,
            **step_memory(step, forward, model, opt, device)}
    return Variant("ours", step, batch[0].shape[0], info)


def grad_norm(parameters) -> torch.Tensor:
    """The official ``misc.get_grad_norm_`` (computed every step even without clipping)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    return torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)


def baseline_variant(model: MaskedAutoencoderViT, batch: tuple[torch.Tensor, ...], device: torch.device,
                     mask_ratio: float) -> Variant:
    """The official ``main_pretrain.py`` step on the same model: explicit softmax attention, fp16
    autocast + GradScaler (``NativeScalerWithGradNormCount``, unscale + grad norm every step) on a
    GPU and fp32 on CPU, default ``torch.optim.AdamW`` (for-loop on CPU, foreach on CUDA),
    ``loss.item()`` and ``torch.cuda.synchronize()`` every iteration."""
    set_fused_attention(model, False)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in optimizer_groups(model)]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    params = list(model.parameters())
    images = batch[0]

    def forward() -> torch.Tensor:
        imgs = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        return loss

    def step() -> torch.Tensor:
        loss = forward()
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
            "ddp_find_unused_parameters": True, **step_memory(step, forward, model, opt, device)}
    return Variant("baseline", step, images.shape[0], info)


def pretrain_bench(device: torch.device, timing: Timing, *, model_name: str, batch_size: int, input_size: int,
                   mask_ratio: float, decoder_depth: int, amp: str, compile_model: bool, baseline: bool,
                   seed: int, attn: str = "auto") -> dict[str, Any]:
    """One full MAE training step, ours (and with ``baseline`` the official recipe on the same weights):
    img/s, step time, peak memory, TFLOP/s and MFU."""
    torch.manual_seed(seed)
    model = build_mae(model_name, img_size=input_size, decoder_depth=decoder_depth).to(device)
    batch = host_batch(batch_size, input_size, device, seed)
    # same weights: the baseline's copy is made before either variant trains
    base = baseline_variant(copy.deepcopy(model), batch, device, mask_ratio) if baseline else None
    ours = ours_variant(model, batch, device, amp, mask_ratio, compile_model, attn)
    variants = [ours] + ([base] if base is not None else [])
    run_windows(variants, device, timing)

    macs = mae_macs(model, mask_ratio)
    train_flops = 6 * macs["total"]  # forward + backward ≈ 3 × forward; 2 FLOPs per multiply-add
    out: dict[str, Any] = {
        "model": model_name, "batch_size": batch_size, "input_size": input_size, "mask_ratio": mask_ratio,
        "decoder_depth": decoder_depth, "amp": amp, "compile": compile_model,
        "warmup": timing.warmup, "windows": timing.windows, "steps_per_window": timing.steps,
        "forward_macs_per_img": macs, "train_flops_per_img": train_flops, "variants": {},
    }
    for v in variants:
        s = summary(v)
        out["variants"][v.name] = s | flop_rate(s["img_per_s"], train_flops, device, v.info["amp"])
    out["speedup_vs_baseline"] = speedup(ours, base) if base is not None else None
    return out


def format_pretrain(p: dict[str, Any]) -> list[str]:
    lines = ["", f"## pretraining step: {p['model']}, batch {p['batch_size']}, {p['input_size']} px, mask {p['mask_ratio']}, "
             f"decoder depth {p['decoder_depth']}",
             f"{'variant':<10} {'img/s':>9} {'step s':>8} {'peak MB':>9} {'TFLOP/s':>8} {'MFU':>6}  how"]
    for name, v in p["variants"].items():
        how = f"{v['attention']}, amp {v['amp']}, {v['optimizer']}, sync/step {v['host_sync_per_step']}"
        lines.append(f"{name:<10} {v['img_per_s']:>9.2f} {v['step_s']:>8.3f} {fmt(v.get('peak_mem_mb'), 0):>9} "
                     f"{v['tflops']:>8.3f} {fmt(v['mfu'], 3):>6}  {how}")
    if p["speedup_vs_baseline"] is not None:
        lines.append(f"speed-up vs baseline: {p['speedup_vs_baseline']:.2f}x (median of per-window ratios)")
    return lines


# --------------------------------------------------------------------------------------------------
# Encoder with vs without mask tokens (Table 1c / Table 2)
# --------------------------------------------------------------------------------------------------
def mask_tokens_bench(device: torch.device, *, model_name: str, batch_size: int, input_size: int, mask_ratio: float,
                      decoder_depth: int, amp: str, seed: int, warmup: int, windows: int, optimizer: bool = True,
                      fvcore: bool = True) -> dict[str, Any]:
    """One MAE holding the ``encoder_mask_token`` parameter, run with the flag on (every position
    goes through the encoder) and off (visible patches only): same weights, same decoder.
    Timed: the engine's forward + backward (the part the design changes); the optimizer step,
    identical for both, is timed separately (unless ``optimizer`` is False) and added for the
    full-step ratio."""
    torch.manual_seed(seed)
    model = build_mae(model_name, img_size=input_size, decoder_depth=decoder_depth, encoder_mask_tokens=True).to(device)
    set_fused_attention(model, True)
    batch = to_device(host_batch(batch_size, input_size, device, seed), device)
    opt = adamw(optimizer_groups(model), LR, BETAS, device)  # its state appears at the first step() only
    train_step = TrainStep(model, opt, make_step_fn(mask_ratio), device, amp)

    def fwd_bwd(with_tokens: bool) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            model.encoder_mask_tokens = with_tokens
            loss, _ = train_step.backward(batch)
            opt.zero_grad(set_to_none=True)
            return loss

        return step

    with_v = Variant("with_mask_tokens", fwd_bwd(True), batch_size)
    without_v = Variant("without_mask_tokens", fwd_bwd(False), batch_size)
    run_windows([without_v, with_v], device, Timing(warmup, windows, 1))

    opt_s = None
    if optimizer:
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        opt_v = Variant("adamw_step", lambda: (opt.step(), torch.zeros(()))[1], batch_size)
        run_windows([opt_v], device, Timing(1, windows, 1))
        opt_s = statistics.median(opt_v.windows)
        opt.zero_grad(set_to_none=True)

    t_with, t_without = statistics.median(with_v.windows), statistics.median(without_v.windows)
    res: dict[str, Any] = {
        "model": model_name, "batch_size": batch_size, "decoder_depth": decoder_depth, "mask_ratio": mask_ratio, "amp": amp,
        "with_mask_tokens": summary(with_v), "without_mask_tokens": summary(without_v),
        "speedup_fwd_bwd": speedup(without_v, with_v),
        "optimizer_step_s": opt_s,
        "speedup_step": (t_with + opt_s) / (t_without + opt_s) if opt_s is not None else None,
        "paper_table2_speedup": PAPER_TABLE2_SPEEDUP.get(decoder_depth),
        "macs_analytic": _with_without({k: mae_macs(model, mask_ratio, k) for k in (True, False)}),
    }
    if fvcore:
        model.cpu()
        fv = {}
        for k in (True, False):
            model.encoder_mask_tokens = k
            fv[k] = fvcore_macs(model, mask_ratio, input_size)
        res["macs_fvcore"] = _with_without(fv)
    return res


def format_mask_tokens(m: dict[str, Any]) -> list[str]:
    lines = ["", f"## encoder with vs without mask tokens: {m['model']}, batch {m['batch_size']}, decoder depth {m['decoder_depth']}",
             f"fwd+bwd s: with {m['with_mask_tokens']['step_s']:.3f}, without {m['without_mask_tokens']['step_s']:.3f} "
             f"-> {m['speedup_fwd_bwd']:.2f}x; with AdamW step: {fmt(m['speedup_step'])}x "
             f"(paper Table 2: {fmt(m['paper_table2_speedup'], 1)}x)"]
    for label, key in (("analytic:", "macs_analytic"), ("fvcore:", "macs_fvcore")):
        if key in m:
            c = m[key]
            lines.append(f"GMACs/img {label:<9} with {c['with_mask_tokens']['total'] / 1e9:.2f}, without "
                         f"{c['without_mask_tokens']['total'] / 1e9:.2f} -> {c['ratio']:.2f}x (encoder {c['encoder_ratio']:.2f}x)")
    return lines


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


def data_sets(work: Path, data_path: str | None, data_images: int, synthetic_size: int, photo_sizes: list[str],
              seed: int) -> list[tuple[str, str, Path]]:
    """(name, image size, folder) of every image set the data benchmark reads."""
    if data_path:
        return [("user", "as stored", Path(data_path))]
    from synthetic import make_imagenet

    sets = []
    per_class = max(1, math.ceil(data_images / 10))
    root = make_imagenet(work / "synthetic", per_class, 0, size=synthetic_size, seed=seed, overwrite=True)
    sets.append(("synthetic", f"{synthetic_size}x{synthetic_size}", root / "train"))
    for text in photo_sizes:
        sets.append(("photos", text, make_photo_folder(work / f"photos_{text}", data_images, parse_hw(text), seed)))
    return sets


H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 peak
GPU_MFU_ASSUMED = 0.45


def gpu_rate_assumption(model_name: str = "mae_vit_base_patch16", input_size: int = 224, mask_ratio: float = 0.75) -> dict[str, Any]:
    """The images per second one GPU would consume pretraining ``model_name`` (its default 8 x 512 decoder): the
    analytic training FLOPs per image (2 FLOPs per multiply-add, x 3 for forward + backward: :func:`mae_macs`)
    at 45 % of an H100's dense bf16 peak.  The model is built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = build_mae(model_name, img_size=input_size)
    macs = mae_macs(model, mask_ratio)["total"]
    flops = 6 * macs
    rate = GPU_MFU_ASSUMED * H100_BF16_TFLOPS * 1e12 / flops
    return {"model": model_name, "input_size": input_size, "mask_ratio": mask_ratio, "forward_macs_per_img": macs,
            "train_flops_per_img": flops, "peak_tflops": H100_BF16_TFLOPS, "mfu": GPU_MFU_ASSUMED, "gpu_img_per_s": rate,
            "text": f"{model_name} ({input_size} px, mask {mask_ratio:g}, decoder 8 x 512): {flops / 1e9:.1f} GFLOP per image "
                    f"per training step (6 x {macs / 1e9:.2f} G multiply-adds) at {GPU_MFU_ASSUMED:.0%} of "
                    f"{H100_BF16_TFLOPS:g} TFLOP/s (H100 SXM, dense bf16) = {rate:.0f} img/s per GPU"}


class LoaderTimer:
    """Times windows of batches out of one DataLoader like the engine's (persistent workers, pinned memory on GPU),
    after its workers have started and produced a first batch; each batch is made ready for the model as the
    engine does (``to_device``, then ``finish``: the fast path's normalisation happens here, in this process).
    Without workers several timers can live side by side, so competing pipelines take turns (:func:`interleaved_rates`;
    with workers, a loader refills its prefetch queue after its turn, on the cores the next turn needs).  Records
    wall-clock seconds, and this process's CPU seconds (with 0 workers: all the work)."""

    PREFETCH = 2

    def __init__(self, dataset, batch_size: int, num_workers: int, batches: int, pin: bool, collate_fn=None,
                 finish=None, device: torch.device | None = None) -> None:
        from torch.utils.data import DataLoader, RandomSampler

        self.bs = min(batch_size, len(dataset))
        drain = self.PREFETCH * num_workers + 1
        sampler = RandomSampler(dataset, replacement=True, num_samples=self.bs * (batches + drain + 1))
        self.loader = DataLoader(dataset, batch_size=self.bs, sampler=sampler, num_workers=num_workers, pin_memory=pin,
                                 collate_fn=collate_fn, drop_last=True, persistent_workers=num_workers > 0,
                                 prefetch_factor=self.PREFETCH if num_workers else None)
        self.finish, self.device = finish, device or torch.device("cpu")
        self.images, self.wall, self.cpu = 0, 0.0, 0.0
        self.it = iter(self.loader)
        # start the workers and drain the batches they prefetched, so the timed ones arrive at the
        # steady-state rate (the main process consumes instantly, as a fast GPU would)
        for _ in range(drain):
            self.ready(next(self.it))

    def ready(self, batch):
        batch = to_device(batch, self.device)
        batch = self.finish(batch) if self.finish is not None else batch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return batch

    def window(self, batches: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            self.ready(next(self.it))
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        self.images += batches * self.bs

    def close(self) -> None:
        from maecore.data.workers import shutdown_workers

        shutdown_workers(self.loader)
        del self.it


def interleaved_rates(timers: list[LoaderTimer], batches: int, windows: int = 2) -> list[tuple[float, float]]:
    """(wall-clock img/s, img per CPU-second of this process) of each timer over ``batches`` batches, timed in
    ``windows`` turns per timer in mirrored order (A B B A ...): drift of a shared machine hits every pipeline alike."""
    sizes = [batches // windows + (k < batches % windows) for k in range(windows)]
    for k, n in enumerate(sizes):
        for t in (timers if k % 2 == 0 else timers[::-1]):
            if n:
                t.window(n)
    return [(t.images / t.wall, t.images / t.cpu if t.cpu > 0 else float("nan")) for t in timers]


def per_core(runs: list[dict[str, Any]], key: str = "img_per_s") -> float | None:
    """img/s of one core: the run in the main process (0 workers) if measured, else the 1-worker run (``key``:
    ``cpu_img_per_s``, images per CPU-second, exists for the 0-worker runs only)."""
    by = {r["num_workers"]: r.get(key) for r in runs}
    return by.get(0, by.get(1)) if key == "img_per_s" else by.get(0)


def data_summary(runs: list[dict[str, Any]], gpu_img_per_s: float) -> list[dict[str, Any]]:
    """Per image set and storage format: official vs fast img/s on one core and on the most workers measured,
    their ratio, and the cores each needs to feed one GPU (GPU img/s / img/s per core)."""
    out = []
    for ds, size, fmt_ in dict.fromkeys((r["dataset"], r["image_size"], r["format"]) for r in runs):
        sel = [r for r in runs if (r["dataset"], r["image_size"], r["format"]) == (ds, size, fmt_) and not r["jpeg_draft"]]
        off = [r for r in sel if r["pipeline"] == "official"]
        fast = [r for r in sel if r["pipeline"] == "fast"]
        if not off or not fast:
            continue
        most = max(r["num_workers"] for r in sel)
        o1, f1 = per_core(off), per_core(fast)
        oc, fc = per_core(off, "cpu_img_per_s"), per_core(fast, "cpu_img_per_s")
        oa = next(r["img_per_s"] for r in off if r["num_workers"] == most)
        fa = next(r["img_per_s"] for r in fast if r["num_workers"] == most)
        out.append({"dataset": ds, "image_size": size, "format": fmt_, "official_per_core": o1, "fast_per_core": f1,
                    "ratio_per_core": f1 / o1 if o1 and f1 else None, "official_per_cpu_s": oc, "fast_per_cpu_s": fc,
                    "ratio_per_cpu_s": fc / oc if oc and fc else None, "workers_all": most, "official_all": oa, "fast_all": fa,
                    "ratio_all": fa / oa, "official_cores_per_gpu": gpu_img_per_s / o1 if o1 else None,
                    "fast_cores_per_gpu": gpu_img_per_s / f1 if f1 else None})
    return out


DATA_FORMATS = ("folder", "packed", "packed-roi")  # how the data benchmark stores each generated set (see data_bench)


def data_bench(device: torch.device, *, input_size: int, batch_size: int, batches: int, num_workers: list[int],
               jpeg_draft: bool, model_img_per_s: float | None, data_path: str | None, data_dir: str | None,
               data_images: int, synthetic_size: int, photo_sizes: list[str], seed: int,
               formats: tuple[str, ...] = DATA_FORMATS) -> dict[str, Any]:
    """The pretraining input pipeline's img/s, the official (torchvision transforms, float batches; also with
    the old JPEG draft decoding with ``jpeg_draft``) next to the fast one (``--decode fast``: DCT scale from the
    crop, uint8, normalised in this process), for each worker count, on ``data_path`` or else on generated sets
    (written under ``data_dir`` or a temporary folder) stored as a folder, packed with the original bytes and packed
    with ``--roi`` (re-encoded at quality 90 with restart markers; ``formats``); next to the
    model step rate ``model_img_per_s`` and the cores each pipeline needs to feed one GPU
    (:func:`gpu_rate_assumption`)."""
    from maecore.data.packed.index import split_dir
    from maecore.data.packed.writer import pack
    from pretrain.data import build_pretrain_dataset, pretrain_collate, pretrain_device_batch

    tmp = None
    if data_dir:
        work = Path(data_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mae-bench-")
        work = Path(tmp.name)
    gpu = gpu_rate_assumption(input_size=input_size)
    runs = []
    try:
        stores = []
        for name, size, folder in data_sets(work, data_path, data_images, synthetic_size, photo_sizes, seed):
            if data_path:
                stores.append((name, size, "packed" if split_dir(folder) is not None else "folder", folder))
                continue
            for fmt_ in formats:
                if fmt_ in ("packed", "packed-roi"):
                    dst = work / fmt_ / f"{name}_{size}"
                    pack(folder, dst, force=True, workers=0, say=lambda _m: None, roi="mcu" if fmt_ == "packed-roi" else None)
                    stores.append((name, size, fmt_, dst))
                else:
                    stores.append((name, size, fmt_, folder))
        variants = [("official", False), *([("official", True)] if jpeg_draft else []), ("fast", False)]
        for name, size, fmt_, folder in stores:
            for nw in num_workers:
                def timer(pipeline: str, draft: bool, nw: int = nw, folder: Path = folder) -> LoaderTimer:
                    return LoaderTimer(build_pretrain_dataset(folder, input_size, jpeg_draft=draft, decode=pipeline), batch_size, nw,
                                       batches, device.type == "cuda", pretrain_collate(pipeline),
                                       pretrain_device_batch(pipeline, input_size, device), device)

                if nw == 0:  # the pipelines' loaders side by side, timed in turns: drift of a shared machine hits each alike
                    timers = [timer(pipeline, draft) for pipeline, draft in variants]
                    try:
                        rates = interleaved_rates(timers, batches, windows=4)
                    finally:
                        for t in timers:
                            t.close()
                else:  # one after the other: a loader's workers refill its prefetch queue after its turn, which would
                    rates = []  # steal the cores from the next pipeline's turn
                    for pipeline, draft in variants:
                        t = timer(pipeline, draft)
                        try:
                            rates.append(interleaved_rates([t], batches, windows=1)[0])
                        finally:
                            t.close()
                for (pipeline, draft), (rate, cpu_rate) in zip(variants, rates):
                    runs.append({"dataset": name, "image_size": size, "format": fmt_, "pipeline": pipeline, "jpeg_draft": draft,
                                 "num_workers": nw, "img_per_s": rate, "img_per_s_per_worker": rate / max(nw, 1),
                                 "cpu_img_per_s": cpu_rate if nw == 0 else None,
                                 "vs_model": rate / model_img_per_s if model_img_per_s else None})
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"input_size": input_size, "batch_size": batch_size, "batches": batches,
            "model_img_per_s": model_img_per_s, "gpu_assumption": gpu, "runs": runs,
            "summary": data_summary(runs, gpu["gpu_img_per_s"])}


def format_data(d: dict[str, Any]) -> list[str]:
    lines = ["", f"## data pipeline: decode + RandomResizedCrop({d['input_size']}, 0.2-1, bicubic) + flip + normalise, batch ready "
             f"for the model; model step rate {fmt(d['model_img_per_s'])} img/s",
             "official: torchvision transforms in the workers, float batches (draft: the old --jpeg_draft); "
             "fast: --decode fast (DCT scale from the crop, uint8, normalised in the main process); formats: folder, packed "
             "(original bytes), packed-roi (maecore.data.packed --roi: re-encoded q90 with restart markers, fast decodes the box only)",
             f"{'images':<10} {'size':>10} {'format':>10} {'pipeline':>9} {'draft':>6} {'workers':>7} {'img/s':>9} {'vs model':>9}"]
    for r in d["runs"]:
        lines.append(f"{r['dataset']:<10} {r['image_size']:>10} {r['format']:>10} {r['pipeline']:>9} {r['jpeg_draft']!s:>6} "
                     f"{r['num_workers']:>7} {r['img_per_s']:>9.1f} {fmt(r['vs_model']):>9}")
    gpu = d.get("gpu_assumption")
    if d.get("summary") and gpu:
        lines += ["", f"assumed GPU consumption: {gpu['text']}",
                  "per core = 0 workers (the main process alone; else 1 worker): wall-clock img/s, and img per CPU-second of "
                  "the process (what other jobs time-sharing the core do not change); all = the most workers measured",
                  f"{'images':<10} {'size':>10} {'format':>10} {'official/core':>14} {'fast/core':>10} {'ratio':>6} "
                  f"{'off./CPU-s':>10} {'fast/CPU-s':>10} {'ratio':>6} "
                  f"{'workers':>7} {'official':>9} {'fast':>9} {'ratio':>6} {'cores/GPU off.':>14} {'cores/GPU fast':>14}"]
        for r in d["summary"]:
            lines.append(f"{r['dataset']:<10} {r['image_size']:>10} {r['format']:>10} {fmt(r['official_per_core']):>14} "
                         f"{fmt(r['fast_per_core']):>10} {fmt(r['ratio_per_core']):>6} {fmt(r.get('official_per_cpu_s')):>10} "
                         f"{fmt(r.get('fast_per_cpu_s')):>10} {fmt(r.get('ratio_per_cpu_s')):>6} {r['workers_all']:>7} "
                         f"{r['official_all']:>9.1f} {r['fast_all']:>9.1f} {r['ratio_all']:>6.2f} "
                         f"{fmt(r['official_cores_per_gpu']):>14} {fmt(r['fast_cores_per_gpu']):>14}")
    return lines
