"""Fine-tuning step throughput for ``tools/benchmark.py --bench finetune``.

The model, optimizer and loss are built by ``classification.train`` from its ``finetune_vit_*``
recipe (drop path, global pooling + ``fc_norm``, layer-decay AdamW, Mixup/CutMix into
SoftTargetCrossEntropy), so the timed step is the one ``python -m classification`` runs, minus
the data loader (a fixed synthetic batch already on the device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from classification.recipes import RECIPES
from classification.train import build_criterion, build_model, build_optimizer, parse_args
from maecore.engine import TrainStep

NUM_CLASSES = 1000  # ImageNet-1k head


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
    arch = arch or "base"
    # sizes without a recipe of their own (tiny, small) borrow ViT-B's hyper-parameters
    recipe = f"finetune_vit_{arch}" if f"finetune_vit_{arch}" in RECIPES else "finetune_vit_base"
    argv = [
        "--recipe",
        recipe,
        "--model",
        arch,
        "--batch_size",
        str(batch_size),
        "--data_path",
        "unused",
        "--num_classes",
        str(NUM_CLASSES),
    ]
    if input_size is not None:
        argv += ["--input_size", str(input_size)]
    if patch_size is not None:
        argv += ["--patch_size", str(patch_size)]
    args = parse_args(argv)
    args.lr = args.blr * batch_size / 256  # as train.run does for one process

    model, _ = build_model(args, NUM_CLASSES)
    model.to(device).train()
    optimizer = build_optimizer(args, model, device)
    criterion, mixup_fn = build_criterion(args, NUM_CLASSES)
    runner = torch.compile(model) if compile else model

    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, args.input_size, args.input_size, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g).to(device)

    def loss_fn() -> torch.Tensor:
        # Mixup/CutMix write into the batch in place: a copy stands in for the loader's fresh batch
        x, target = images.clone(), labels
        if mixup_fn is not None:
            x, target = mixup_fn(x, target)
        return criterion(runner(x).float(), target)

    train_step = TrainStep(model, optimizer, lambda m, batch: (loss_fn(), {}), device, amp, runner=runner)

    def step() -> torch.Tensor:
        return train_step(None)  # the engine's step; the batch is fixed on the device

    info = {  # what was built: goes into the benchmark's JSON
        "arch": arch,
        "input_size": args.input_size,
        "patch_size": model.patch_size,
        "model": args.model,
        "recipe": recipe,
        "mixup": mixup_fn is not None,
    }
    return step, batch_size, info
