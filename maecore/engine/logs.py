"""The run's records (run, resume, train, eval, monitor, stop…): :class:`RunLogger` hands each to the run's loggers
(:mod:`maecore.engine.loggers`: ``log.jsonl``, TensorBoard, W&B…, chosen with ``--loggers``), on rank 0 only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maecore.engine.loggers import DEFAULT, Logger, build_loggers


class RunLogger:
    """Where a run's records go: ``loggers`` (default: ``log.jsonl`` and TensorBoard), written by rank 0 only
    (``enabled``), once :meth:`open` (the run owns the folder)."""

    def __init__(self, output_dir: Path, enabled: bool, loggers: Sequence[Logger] | None = None) -> None:
        self.enabled = enabled
        self.dir = output_dir
        self.path = output_dir / "log.jsonl"
        self.loggers = list(build_loggers(DEFAULT) if loggers is None else loggers)
        self.opened = False

    def open(self) -> None:
        """Create the folder and what each logger writes: only once the run owns the folder."""
        if not self.enabled or self.opened:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for lg in self.loggers:
            lg.open(self.dir)
        self.opened = True

    def set_aside(self) -> Path | None:
        """A fresh (not resumed) run in a folder that already has an earlier run's logs: each logger moves its own
        aside (``log.jsonl`` to ``log.N.jsonl``: nothing is lost), so that readers of the new one see this run only.
        Returns the old ``log.jsonl``'s new path, if it was moved."""
        if not self.enabled:
            return None
        moved = [lg.set_aside(self.dir) for lg in self.loggers]
        return next((p for p in moved if p is not None), None)

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        for lg in self.loggers:
            lg.write(kind, step, values)

    def close(self) -> None:
        """Each opened logger's ``close`` (rank 0's; once)."""
        if not self.opened:
            return
        self.opened = False
        for lg in self.loggers:
            lg.close()


def read_log(path: str | Path, kind: str | None = None) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "log.jsonl"
    if not p.exists():
        return []
    recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in recs if kind is None or r["type"] == kind]
