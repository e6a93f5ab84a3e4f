"""The run's loggers, one file each, chosen with ``--loggers`` (default ``jsonl tensorboard``): ``log.jsonl``
(:mod:`~maecore.engine.loggers.jsonl`), TensorBoard (:mod:`~maecore.engine.loggers.tensorboard`) and Weights &
Biases (:mod:`~maecore.engine.loggers.wandb`, an optional extra).  A new logger is one file: a
:class:`~maecore.engine.loggers.base.Logger` subclass, and its line in :data:`LOGGERS`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from maecore.engine.loggers.base import Logger, scalars
from maecore.engine.loggers.jsonl import JsonLines
from maecore.engine.loggers.tensorboard import TensorBoard
from maecore.engine.loggers.wandb import WandB
from maecore.errors import UserError

LOGGERS: dict[str, Callable[[], Logger]] = {
    "jsonl": JsonLines,
    "tensorboard": TensorBoard,
    "wandb": WandB,
}
DEFAULT = ("jsonl", "tensorboard")


def build_loggers(names: Sequence[str]) -> list[Logger]:
    """The loggers ``names`` (each once, in that order); an unknown or unavailable one is a ``UserError``."""
    if unknown := [n for n in names if n not in LOGGERS]:
        raise UserError(f"--loggers: no logger named {', '.join(unknown)} (choose from {', '.join(LOGGERS)})")
    return [LOGGERS[n]() for n in dict.fromkeys(names)]


__all__ = ["DEFAULT", "LOGGERS", "JsonLines", "Logger", "TensorBoard", "WandB", "build_loggers", "scalars"]
