"""Mask R-CNN step throughput for ``tools/benchmark.py --bench detection``.

The detector and optimizer come from ``detection.train`` with a ViTDet recipe (``vitdet_b`` by
default: ViT-B/16 trunk with window + global attention, simple feature pyramid, 2-conv RPN,
4conv1fc box head, 4-conv mask head, layer-decay AdamW), so the timed step is the one
``python -m detection`` runs, minus the data loader: a fixed batch of LSJ-sized images with
instances in torchvision's Mask R-CNN target format, already on the device: :func:`maecore.benchmark.task_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from detection.config import DetectionConfig, parse_config
from detection.data import masks_to_boxes
from detection.train import build_model, build_optimizer
from maecore.benchmark import TaskBench, task_step

NUM_CLASSES = 80  # COCO
INSTANCES = 8  # COCO train2017 averages ~7.3 instances per image


def synthetic_targets(batch_size: int, size: int, device: torch.device, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """``batch_size`` images in [0, 1] (the model normalises) with ``INSTANCES`` elliptical objects
    each: ``masks`` (N, H, W) uint8, ``boxes`` xyxy recomputed from the masks as the LSJ crop does,
    ``labels`` in 1..80."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, targets = [], []
    for _ in range(batch_size):
        # object radii from 1/32 to 1/4 of the side: small, medium and large objects at 1024
        r = size * (1 / 32 + torch.rand(INSTANCES, 2, generator=g) * (1 / 4 - 1 / 32))
        c = r + torch.rand(INSTANCES, 2, generator=g) * (size - 2 * r)
        inside = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2
        masks = (inside <= 1).to(torch.uint8)
        targets.append(
            {
                "boxes": masks_to_boxes(masks).to(device),
                "masks": masks.to(device),
                "labels": torch.randint(1, NUM_CLASSES + 1, (INSTANCES,), generator=g).to(device),
            }
        )
        images.append(torch.rand(3, size, size, generator=g).to(device))
    return images, targets


def recipe(arch: str) -> str:
    # ViT-L/H have recipes of their own (layer decay, drop path, activation checkpointing); other
    # sizes borrow ViT-B's
    return {"large": "vitdet_l", "huge": "vitdet_h"}.get(arch, "vitdet_b")


def batch_loss(cfg: DetectionConfig, runner: nn.Module, device: torch.device, batch_size: int) -> Callable[[], torch.Tensor]:
    # the model copies targets and normalises into new tensors: the fixed batch is never modified
    images, targets = synthetic_targets(batch_size, cfg.input_size, device)

    def loss_fn() -> torch.Tensor:
        return sum(runner(images, targets).values())  # RPN + box + mask losses, as train.step_fn

    return loss_fn


def info(cfg: DetectionConfig, model: nn.Module) -> dict[str, Any]:
    return {"patch_size": model.backbone.net.patch_size, "recipe": cfg.recipe, "backbone": cfg.backbone,
            "instances_per_image": INSTANCES}


BENCH = TaskBench(recipe, parse_config, lambda cfg, device: build_model(cfg, NUM_CLASSES), build_optimizer, batch_loss, info)


def benchmark_step(
    device: torch.device,
    batch_size: int,
    amp: str,
    compile: bool,
    arch: str | None = None,
    input_size: int | None = None,
    patch_size: int | None = None,
) -> tuple[Callable[[], torch.Tensor], int, dict[str, Any]]:
    """One Mask R-CNN training step with a ViTDet-``arch`` trunk (default ``vitdet_b``: ViT-B/16 at
    1024) on ``batch_size`` images; returns the step closure, the images per step and an ``info`` dict
    saying what was built."""
    return task_step(BENCH, device, batch_size, amp, compile, arch, input_size, patch_size)
