"""The precision and attention kernel a run trains with, chosen by one rule for training and the ``--eval`` paths."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from maecore.errors import UserError
from maecore.models.layers import set_fused_attention


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)?  Elsewhere bf16 autocast is emulated and
    slower than fp32, so ``--amp auto`` stays fp32 there."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except RuntimeError:  # a build without the probes
        return False


def resolve_amp(amp: str, device: torch.device, cpu_bf16: bool = True) -> str:
    """The precision a run uses.  ``auto``: bf16 on GPUs that support it, and on CPUs with native bf16
    (AVX512-BF16/AMX: 1.3-2.3x faster steps, measured in docs/benchmarks.md) unless ``cpu_bf16`` is False;
    fp32 (``none``) elsewhere.  The engine prints the choice and logs it (``amp`` in log.jsonl)."""
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "none"
        return "bf16" if cpu_bf16 and device.type == "cpu" and cpu_has_native_bf16() else "none"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (use bf16 or none on CPU)")
    if amp not in ("bf16", "fp16", "none"):
        raise UserError(f"unknown --amp {amp!r}: use auto, bf16, fp16 or none")
    return amp


def describe_amp(amp: str, resolved: str, device: torch.device) -> str:
    """One line saying which precision a run uses and why (``--amp auto`` differs between machines)."""
    name = {"bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler", "none": "fp32"}[resolved]
    if amp != "auto":
        return f"precision: {name} (--amp {amp})"
    if device.type == "cuda":
        why = "the GPU supports bf16" if resolved == "bf16" else "the GPU has no bf16"
    else:
        why = "this CPU has native bf16 (AVX512-BF16/AMX)" if resolved == "bf16" else "this CPU has no native bf16"
    return f"precision: {name} (--amp auto: {why})"


def resolve_attention(attn: str, device: torch.device, amp: str) -> str:
    """The attention kernel a run trains with.  ``auto``: the explicit softmax path under bf16 autocast on a CPU,
    SDPA's fused kernels elsewhere.  torch's fused CPU attention is slow in bf16, above all its backward (6x the
    explicit path's time on the demo's ViT-tiny/8): explicit steps are 1.45x faster there, 1.5x in MAE pretraining,
    ~1.1x on a ViT-B/16 at 224, and no slower in detection/segmentation (docs/benchmarks.md); in fp32 and on GPUs
    the fused kernels win.  Both compute the same function (equal up to rounding)."""
    if attn == "auto":
        return "explicit" if device.type == "cpu" and amp == "bf16" else "fused"
    if attn not in ("fused", "explicit"):
        raise UserError(f"unknown --attn {attn!r}: use auto, fused or explicit")
    return attn


def use_attention(model: nn.Module, attn: str, device: torch.device, amp: str) -> str:
    """Set ``model``'s attention modules to the kernel :func:`resolve_attention` picks; returns it.  Training and the
    ``--eval`` paths both call it, so a run's own evaluation and a later one of its checkpoint compute alike."""
    resolved = resolve_attention(attn, device, amp)
    set_fused_attention(model, resolved == "fused")
    return resolved


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
