"""``log.jsonl``: one JSON record a line (run, resume, train, eval, monitor, stop…), appended as it is written; a fresh
run moves an earlier run's log to ``log.N.jsonl``.  :func:`maecore.engine.read_log` reads it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maecore.engine.loggers.base import Logger

NAME = "log.jsonl"


class JsonLines(Logger):
    name = "jsonl"

    def __init__(self) -> None:
        self.path: Path | None = None

    def open(self, out: Path) -> None:
        self.path = out / NAME

    def set_aside(self, out: Path) -> Path | None:
        """Nothing is lost: ``log.jsonl`` of an earlier run becomes ``log.N.jsonl`` (the first free N)."""
        path = out / NAME
        if not (path.exists() and path.stat().st_size):
            return None
        n = 1
        while (old := path.with_name(f"log.{n}.jsonl")).exists():
            n += 1
        path.rename(old)
        return old

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"type": kind, "step": step, **values}) + "\n")
