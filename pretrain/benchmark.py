"""Pretraining benchmarks for ``tools/benchmark.py`` (``pipeline.benchmark``): the training step (ours vs
the official recipe), the encoder with vs without mask tokens (paper Table 1c / 2); the input pipeline's is
``pretrain.benchmark_data``.  :func:`benchmark_step` is the task interface's step benchmark, as every task package
has it (:func:`maecore.benchmark.task_step` on what pretraining supplies).

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
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from maecore.benchmark import TaskBench, Timing, Variant, flop_rate, fmt, run_windows, speedup, step_memory, summary, task_step
from maecore.engine import TrainStep, autocast, to_device, use_attention
from maecore.errors import UserError
from maecore.models.layers import set_fused_attention
from maecore.optim import adamw
from pretrain.config import PretrainConfig, parse_config
from pretrain.model import MaskedAutoencoderViT, build_mae
from pretrain.train import build_model, build_optimizer, make_step_fn
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
# The task interface's step benchmark
# --------------------------------------------------------------------------------------------------
def recipe(arch: str) -> str:
    return "paper"  # every size takes the paper's hyper-parameters (its 8 x 512 decoder, normalised pixels)


def batch_loss(cfg: PretrainConfig, runner: nn.Module, device: torch.device, batch_size: int) -> Callable[[], torch.Tensor]:
    images = host_batch(batch_size, cfg.input_size, torch.device("cpu"))[0].to(device)

    def loss_fn() -> torch.Tensor:
        return runner(images, mask_ratio=cfg.mask_ratio)[0]  # the MAE loss, as train.make_step_fn

    return loss_fn


def info(cfg: PretrainConfig, model: nn.Module) -> dict[str, Any]:
    return {"patch_size": model.patch_size, "model": cfg.model, "recipe": cfg.recipe, "mask_ratio": cfg.mask_ratio}


BENCH = TaskBench(recipe, parse_config, lambda cfg, device: build_model(cfg), build_optimizer, batch_loss, info,
                  flags=("--data_path", "unused"))


def benchmark_step(
    device: torch.device,
    batch_size: int,
    amp: str,
    compile: bool,
    arch: str | None = None,
    input_size: int | None = None,
    patch_size: int | None = None,
) -> tuple[Callable[[], torch.Tensor], int, dict[str, Any]]:
    """One pretraining step of MAE ViT-``arch`` (default ``base``, with the ``paper`` recipe: 224 px, mask 75 %) on
    ``batch_size`` images, as every task package's ``benchmark_step``: the step closure, the images per step and what
    was built.  (``--bench pretrain`` times the same step against the official one: :func:`pretrain_bench`.)"""
    return task_step(BENCH, device, batch_size, amp, compile, arch, input_size, patch_size)
