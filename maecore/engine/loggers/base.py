"""What a logger is: one :class:`Logger` subclass in one file of this package, named in :data:`LOGGERS`
(``maecore/engine/loggers/__init__.py``), chosen with ``--loggers NAME …``.

A logger is a hook (:class:`~maecore.engine.hooks.HookBase`): it sees the run's events and may keep checkpointed state
(``state_key``: W&B's run id), and besides it gets every record the run writes, through the trainer's
:class:`~maecore.engine.logs.RunLogger` — on rank 0 only, and only once the run owns its folder:

    open(out)                  the run owns ``out`` (after the lock and the resume checks): create what it writes
    set_aside(out)             a fresh (not resumed) run: move an earlier run's output aside (or nothing)
    write(kind, step, values)  one record: ``{"type": kind, "step": step, **values}`` in ``log.jsonl``
    close()                    the run is over (also after an error or a stop); called again is harmless

A record's values are what the hook that wrote it gave: numbers, strings, lists, dicts (:func:`scalars` picks the
numbers).  A logger must never change what another writes, nor the run's numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from maecore.engine.hooks import LOGGERS, HookBase


class Logger(HookBase):
    """A do-nothing logger: a subclass names itself (``name``, the ``--loggers`` value) and overrides what it needs."""

    name: ClassVar[str] = ""
    priority = LOGGERS  # before every hook that logs: a logger's before_train runs first

    def open(self, out: Path) -> None: ...

    def set_aside(self, out: Path) -> Path | None:
        return None

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(values: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, int | float]:
    """The record's numbers (ints, floats, bools), but the keys in ``skip``."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and k not in skip}
