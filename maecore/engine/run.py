"""The run as its hooks see it: a :class:`typing.Protocol` of what a hook (and the NaN/inf guard) may read and
call on the trainer.  Hooks are written against this, not against :class:`~maecore.engine.trainer.Trainer`, so the
loop can import its standard hooks without an import circle (the trainer satisfies it structurally; a test checks
that it does)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from maecore.engine.config import EngineConfig
    from maecore.engine.signals import StopSignals
    from maecore.engine.step import TrainStep
    from maecore.engine.storage import MetricStorage


class RunLog(Protocol):
    """The run's log as hooks and the run folder use it (:class:`~maecore.engine.logs.RunLogger` is the one there
    is): written against this, the engine's hooks need not import the loggers, which are hooks themselves."""

    path: Path  # the run's log.jsonl

    def open(self) -> None: ...
    def set_aside(self) -> Path | None: ...
    def log(self, kind: str, step: int, **values: Any) -> None: ...
    def close(self) -> None: ...


class Run(Protocol):
    """What :class:`~maecore.engine.hooks.HookBase` subclasses find in ``self.trainer``."""

    cfg: EngineConfig
    args: dict[str, Any]  # the run's flags, as its checkpoints store them
    device: torch.device
    model: nn.Module  # the bare module (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    train_step: TrainStep
    out: Path  # the run folder
    logger: RunLog
    storage: MetricStorage  # the step's losses and logs, for the log hooks
    signals: StopSignals
    amp: str
    attn: str
    epoch: int
    iter_in_epoch: int
    iters_per_epoch: int
    step: int  # optimizer steps done
    trained_epoch: int
    lr: float
    best: float
    eval_results: dict[str, Any]
    batch: Any  # the micro-batch just trained on, in after_backward (None elsewhere)
    finished: bool
    saved_at: tuple[int, int, int] | None

    @property
    def last_path(self) -> Path: ...
    @property
    def done(self) -> bool: ...
    @property
    def final(self) -> bool: ...
    @property
    def epoch_complete(self) -> bool: ...

    def save(self, *names: str) -> None: ...
    def call_hooks(self, event: str) -> None: ...
    def hook_states(self) -> dict[str, Any]: ...
    def check_finite(self, weights: bool = False) -> None: ...
    def whole_weights(self) -> contextlib.AbstractContextManager[None]: ...
