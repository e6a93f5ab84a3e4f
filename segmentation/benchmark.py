"""UperNet step throughput for ``tools/benchmark.py --bench segmentation``.

The model comes from ``segmentation.train`` with its ADE20K recipe (``base`` by default: ViT-B/16,
512 crop, UperNet 768 channels + auxiliary FCN head, drop path 0.1) and the optimizer is the one
``segmentation.train.build_optimizer`` makes (layer-decay AdamW), so the timed step is the one
``python -m segmentation`` runs, minus the data loader: a fixed batch of crops and label maps
(with ignored pixels) already on the device: :func:`maecore.benchmark.task_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from maecore.benchmark import TaskBench, task_step
from segmentation.config import SegmentationConfig, parse_config
from segmentation.data import IGNORE_INDEX
from segmentation.model import maybe_sync_batchnorm
from segmentation.train import build_model, build_optimizer


def synthetic_batch(batch_size: int, size: int, num_classes: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-image-like crops and (B, H, W) int64 label maps: blocky regions of random classes
    with about 10 % ignored (255) pixels, as ADE20K's unlabelled 0 becomes after ``reduce_zero_label``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    cell = max(size // 16, 1)
    coarse = torch.randint(0, num_classes, (batch_size, -(-size // cell), -(-size // cell)), generator=g)
    labels = coarse.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :size, :size].contiguous()
    labels[torch.rand(labels.shape, generator=g) < 0.1] = IGNORE_INDEX
    return images.to(device), labels.to(device)


def recipe(arch: str) -> str:
    return "large" if arch == "large" else "base"  # other sizes borrow ViT-B's heads and hyper-parameters


def batch_loss(cfg: SegmentationConfig, runner: nn.Module, device: torch.device, batch_size: int) -> Callable[[], torch.Tensor]:
    images, labels = synthetic_batch(batch_size, cfg.input_size, cfg.num_classes, device)

    def loss_fn() -> torch.Tensor:
        return runner(images, labels)[0]  # decode + 0.4 x auxiliary cross-entropy, as train.step_fn

    return loss_fn


def info(cfg: SegmentationConfig, model: nn.Module) -> dict[str, Any]:
    return {"patch_size": model.backbone.patch_size, "recipe": cfg.recipe, "num_classes": cfg.num_classes}


# the optimizer is the one python -m segmentation uses
BENCH = TaskBench(recipe, parse_config, lambda cfg, device: maybe_sync_batchnorm(build_model(cfg), device), build_optimizer,
                  batch_loss, info, flags=("--data_path", "unused"))


def benchmark_step(
    device: torch.device,
    batch_size: int,
    amp: str,
    compile: bool,
    arch: str | None = None,
    input_size: int | None = None,
    patch_size: int | None = None,
) -> tuple[Callable[[], torch.Tensor], int, dict[str, Any]]:
    """One UperNet training step with a ViT-``arch`` backbone (default: the ``base`` recipe, ViT-B/16
    on 512 crops) on ``batch_size`` crops; returns the step closure, the images per step and an ``info``
    dict saying what was built."""
    return task_step(BENCH, device, batch_size, amp, compile, arch, input_size, patch_size)
