"""The one training step of the toolkit (:class:`TrainStep`), what the trainer runs and the benchmarks time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from maecore.engine.precision import autocast

StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainStep:
    """The one training step of the toolkit: forward under autocast, backward (scaled for fp16 and for
    gradient accumulation, without DDP's all-reduce on non-boundary micro-batches), then the optimizer
    update (unscale, clip, step, zero_grad).  :class:`Trainer` runs it in its loop; the benchmarks time
    the very same object (``step(batch)``), so what is measured is what trains.

    ``runner`` is what the forward calls (the DDP wrapper, a compiled module, or ``model`` itself);
    ``model`` is the bare module (its parameters are clipped).  No host sync happens here: the loss comes
    back as a device tensor and a non-finite loss only sets ``self.nonfinite`` on the device.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFn, device: torch.device,
                 amp: str = "none", accum_iter: int = 1, clip_grad: float | None = None,
                 runner: nn.Module | None = None, ddp: DistributedDataParallel | None = None,
                 fsdp: nn.Module | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.step_fn = step_fn
        self.device = device
        self.amp = amp
        self.accum_iter = accum_iter
        self.clip_grad = clip_grad
        self.runner = runner if runner is not None else model
        self.ddp = ddp
        self.fsdp = fsdp  # the FSDP2 root: gradient reduction is switched off on non-boundary micro-batches
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def backward(self, batch: Any, sync: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; ``sync=False`` skips DDP's gradient all-reduce (not an
        accumulation boundary).  Returns the (unscaled) loss and the step function's logs."""
        if self.fsdp is not None:
            self.fsdp.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if (sync or self.ddp is None) else self.ddp.no_sync():
            with autocast(self.device, self.amp):
                loss, logs = self.step_fn(self.runner, batch)
            self.nonfinite |= ~torch.isfinite(loss.detach())
            scaled = loss / self.accum_iter
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss, logs

    def update(self) -> None:
        """The optimizer step at an accumulation boundary."""
        opt = self.optimizer
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    def __call__(self, batch: Any) -> torch.Tensor:
        """One whole optimizer step on ``batch`` (``accum_iter`` micro-batches of the same batch): what the
        benchmarks time.  Returns the last loss, on the device."""
        for _ in range(self.accum_iter - 1):
            self.backward(batch, sync=False)
        loss, _ = self.backward(batch, sync=True)
        self.update()
        return loss


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x
