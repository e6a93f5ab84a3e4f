"""The run's logs: ``log.jsonl`` (one JSON record a line: run, resume, train, eval, stop…) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLogger:
    """JSON lines (``log.jsonl``) and TensorBoard scalars, written by rank 0 only."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.dir = output_dir
        self.path = output_dir / "log.jsonl"
        self.tb = None

    def open(self) -> None:
        """Create the folder and the TensorBoard writer: only once the run owns the folder."""
        if not self.enabled or self.tb is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but logging must never kill a run
            self.tb = None

    def set_aside(self) -> Path | None:
        """A fresh (not resumed) run in a folder that already has a ``log.jsonl``: move the old log to
        ``log.N.jsonl`` (nothing is lost) so that readers of the new one see this run only."""
        if not (self.enabled and self.path.exists() and self.path.stat().st_size):
            return None
        n = 1
        while (old := self.path.with_name(f"log.{n}.jsonl")).exists():
            n += 1
        self.path.rename(old)
        return old

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        rec = {"type": kind, "step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_log(path: str | Path, kind: str | None = None) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "log.jsonl"
    if not p.exists():
        return []
    recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in recs if kind is None or r["type"] == kind]
