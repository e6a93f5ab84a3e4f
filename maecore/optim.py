"""Parameter groups (weight-decay exclusions, layer-wise lr decay), optimizers and lr schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    layer_id: Callable[[str], int] | None = None,
    num_layers: int | None = None,
    no_weight_decay: Iterable[str] = (),
) -> list[dict]:
    """Groups for AdamW: no weight decay for 1-D parameters (biases, norms, layer scale) and the
    names in ``no_weight_decay`` (pos-embed, cls token, relative position…); with ``layer_decay``
    < 1 each group also carries ``lr_scale = layer_decay ** (num_layers - layer_id(name))``
    (the BEiT rule; ``num_layers`` = depth + 1).  Frozen parameters are left out."""
    skip = tuple(no_weight_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or any(name == s or name.endswith("." + s) or name.startswith(s) for s in skip)
        lid = layer_id(name) if (layer_id is not None and layer_decay != 1.0) else 0
        key = (lid, no_wd)
        if key not in groups:
            scale = layer_decay ** (num_layers - lid) if (layer_id is not None and layer_decay != 1.0) else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": scale,
                "layer_id": lid,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over all parameters) on CUDA and on CPU, where it is
    3-6x faster than foreach or the for-loop (tools/benchmark.py); foreach where fused is missing."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    try:
        return torch.optim.AdamW(clean, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # a torch or device without the fused kernel
        return torch.optim.AdamW(clean, lr=lr, betas=betas, foreach=True)


@dataclass
class WarmupCosine:
    """Per-iteration schedule in fractional epochs: linear warm-up, then half-cycle cosine to min_lr
    (the official MAE ``adjust_learning_rate``)."""

    lr: float
    min_lr: float
    warmup: float
    total: float

    def __call__(self, t: float) -> float:
        if t < self.warmup:
            return self.lr * t / self.warmup
        span = max(self.total - self.warmup, 1e-12)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t - self.warmup, span) / span))


@dataclass
class WarmupStep:
    """Linear warm-up (from ``warmup_factor``·lr) then ×``gamma`` at each milestone (detectron2 style)."""

    lr: float
    warmup: float
    milestones: tuple[float, ...]
    gamma: float = 0.1
    warmup_factor: float = 0.001

    def __call__(self, t: float) -> float:
        base = self.lr * self.gamma ** sum(t >= m for m in self.milestones)
        if t < self.warmup:
            a = t / self.warmup
            return base * (self.warmup_factor * (1 - a) + a)
        return base


@dataclass
class WarmupPoly:
    """Linear warm-up then polynomial decay to ``min_lr`` (mmseg ``PolyLR``)."""

    lr: float
    warmup: float
    total: float
    power: float = 1.0
    min_lr: float = 0.0
    warmup_ratio: float = 1e-6

    def __call__(self, t: float) -> float:
        decayed = (self.lr - self.min_lr) * (1 - min(t, self.total) / self.total) ** self.power + self.min_lr
        if t < self.warmup:
            k = (1 - t / self.warmup) * (1 - self.warmup_ratio)
            return decayed * (1 - k)
        return decayed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
