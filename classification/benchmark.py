"""Fine-tuning step throughput for ``tools/benchmark.py --bench finetune``.

The model, optimizer and loss are built by ``classification.train`` from its ``finetune_vit_*``
recipe (drop path, global pooling + ``fc_norm``, layer-decay AdamW, Mixup/CutMix into
SoftTargetCrossEntropy), so the timed step is the one ``python -m classification`` runs, minus
the data loader (a fixed synthetic batch already on the device): :func:`maecore.benchmark.task_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from classification.config import ClassificationConfig, parse_config
from classification.recipes import RECIPES
from classification.train import build_criterion, build_model, build_optimizer
from maecore.benchmark import TaskBench, task_step

NUM_CLASSES = 1000  # ImageNet-1k head


def recipe(arch: str) -> str:
    # sizes without a recipe of their own (tiny, small) borrow ViT-B's hyper-parameters
    return f"finetune_vit_{arch}" if f"finetune_vit_{arch}" in RECIPES else "finetune_vit_base"


def batch_loss(cfg: ClassificationConfig, runner: nn.Module, device: torch.device, batch_size: int) -> Callable[[], torch.Tensor]:
    criterion, mixup_fn = build_criterion(cfg, NUM_CLASSES)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, cfg.input_size, cfg.input_size, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g).to(device)

    def loss_fn() -> torch.Tensor:
        # Mixup/CutMix write into the batch in place: a copy stands in for the loader's fresh batch
        x, target = images.clone(), labels
        if mixup_fn is not None:
            x, target = mixup_fn(x, target)
        return criterion(runner(x).float(), target)

    return loss_fn


def info(cfg: ClassificationConfig, model: nn.Module) -> dict[str, Any]:
    mixup = cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None  # as build_criterion decides
    return {"patch_size": model.patch_size, "model": cfg.model, "recipe": cfg.recipe, "mixup": mixup}


BENCH = TaskBench(recipe, parse_config, lambda cfg, device: build_model(cfg, NUM_CLASSES), build_optimizer, batch_loss, info,
                  flags=("--data_path", "unused", "--num_classes", str(NUM_CLASSES)))


def benchmark_step(
    device: torch.device,
    batch_size: int,
    amp: str,
    compile: bool,
    arch: str | None = None,
    input_size: int | None = None,
    patch_size: int | None = None,
) -> tuple[Callable[[], torch.Tensor], int, dict[str, Any]]:
    """One fine-tuning step of ViT-``arch`` (default: the ``finetune_vit_base`` recipe, ViT-B/16 at
    224) on ``batch_size`` images; returns the step closure, the images per step and an ``info`` dict
    saying what was built (merged into the benchmark's JSON)."""
    return task_step(BENCH, device, batch_size, amp, compile, arch, input_size, patch_size)
