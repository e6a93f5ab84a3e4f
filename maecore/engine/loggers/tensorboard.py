"""``tensorboard/``: every number of a record as the scalar ``<type>/<key>`` at its step (but ``epoch`` and ``step``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maecore.engine.loggers.base import Logger, scalars


class TensorBoard(Logger):
    name = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None

    def open(self, out: Path) -> None:
        if self.writer is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but logging must never kill a run
            return
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in scalars(values, skip=("epoch", "step")).items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
