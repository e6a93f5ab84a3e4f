"""Trained task checkpoints of this toolkit: which task a checkpoint belongs to, told from its keys.

A classifier is the encoder with ``head`` (a linear probe's ``head.0`` BatchNorm + ``head.1`` Linear); a
detector holds the trunk under ``backbone.net.`` and torchvision's ``roi_heads.``; a segmentor the trunk under
``backbone.`` and mmseg's ``decode_head.``; an MAE its ``decoder_embed``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

TASKS = ("classification", "detection", "segmentation")
TASK_COMMANDS = {t: f"python -m {t}" for t in TASKS}


def _state_keys(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                return _state_keys(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return [k.removeprefix("module.") for k in obj]
    return []


def task_of_keys(keys: Iterable[str]) -> str | None:
    """``classification``, ``detection``, ``segmentation``, ``pretrain`` (an MAE) or ``None`` from state-dict keys."""
    keys = list(keys)
    starts = lambda *p: any(k.startswith(p) for k in keys)  # noqa: E731
    if starts("decode_head.") and starts("backbone."):
        return "segmentation"
    if starts("roi_heads.", "rpn.") and starts("backbone.net."):
        return "detection"
    if starts("decoder_embed.", "decoder_blocks."):
        return "pretrain"
    if ("head.weight" in keys or "head.1.weight" in keys) and "patch_embed.proj.weight" in keys:
        return "classification"
    return None


def task_of(obj: Any) -> str | None:
    """The task of a checkpoint object (ours, or a bare state dict with our task's keys); see :func:`task_of_keys`."""
    return task_of_keys(_state_keys(obj))


def describe_task(task: str | None) -> str:
    return {
        "classification": "a trained classification checkpoint",
        "detection": "a trained detection checkpoint",
        "segmentation": "a trained segmentation checkpoint",
        "pretrain": "an MAE pretraining checkpoint (fine-tune it first)",
        None: "not a trained task checkpoint of this toolkit",
    }[task]
