"""Weights & Biases (``--loggers … wandb``; ``pip install 'mae-toolkit[wandb]'``): every record's numbers as one
history row, ``<type>/<key>`` against the run's optimizer ``step`` (W&B's x-axis for every key); the run's args as its
config.  Where it goes is W&B's own business: ``WANDB_MODE=offline`` (no network; ``wandb sync`` later),
``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_DIR`` (default: the run folder, ``<output_dir>/wandb/``).

The W&B run id is checkpointed (``extra["wandb"]``): a resumed run appends to the same W&B run.  Steps a resume
repeats (those after the checkpoint it resumes from) are logged again, as in ``log.jsonl``: rows are logged with the
step as a value, not as W&B's own step, which refuses to go back.  The W&B run is started once the checkpoint is
loaded (the records before it, ``cleanup`` and ``resume``, wait for it) and finished when the run ends, marked
failed unless the run finished (a stop or an error: ``--resume`` continues it).  W&B failing to start a run (online
without a login…) is one ``error:`` line before training; failing later, one warning line, and training goes on.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from maecore.engine.loggers.base import Logger, scalars
from maecore.errors import UserError

INSTALL = "pip install 'mae-toolkit[wandb]' (or pip install wandb)"


def available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def check_available() -> None:
    if not available():
        raise UserError(f"--loggers wandb: the wandb package is not installed: {INSTALL}")


class WandB(Logger):
    name = "wandb"
    state_key = "wandb"

    def __init__(self) -> None:
        check_available()
        self.id = ""  # the W&B run's id: from the checkpoint on resume, else W&B's new one
        self.out: Path | None = None
        self.run: Any = None
        self.waiting: list[tuple[str, int, dict[str, Any]]] = []

    def open(self, out: Path) -> None:
        self.out = out  # rank 0 alone is opened: the others never start a W&B run

    def before_train(self) -> None:
        if self.out is None or self.run is not None:
            return
        import wandb

        try:
            self.run = wandb.init(id=self.id or None, resume="allow" if self.id else None, name=self.out.name,
                                  dir=None if os.environ.get("WANDB_DIR") else str(self.out), config=dict(self.trainer.args))
        except Exception as e:  # not logged in, no network in online mode…: the run was asked to log there
            what = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"--loggers wandb: W&B could not start a run: {what} (WANDB_MODE=offline logs without "
                            "network, wandb sync uploads later)") from None
        self.id = self.run.id
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        for record in self.waiting:
            self.write(*record)
        self.waiting = []

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if self.run is None:
            if self.out is not None:
                self.waiting.append((kind, step, values))
            return
        row = {f"{kind}/{k}": v for k, v in scalars(values, skip=("step",)).items()}
        if not row:
            return
        try:
            self.run.log({**row, "step": step})
        except Exception as e:  # logging never stops training: one line, and W&B is off for the rest of the run
            print(f"warning: --loggers wandb: {type(e).__name__}: {' '.join(str(e).split())}; W&B logging off, "
                  "training goes on", file=sys.stderr, flush=True)
            self.out = None
            with contextlib.suppress(Exception):
                self.finish(1)

    def after_train(self) -> None:
        self.finish(0 if self.trainer.finished else 1)

    def close(self) -> None:
        self.finish(0)

    def finish(self, exit_code: int) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=exit_code)

    def state_dict(self) -> dict[str, Any]:
        return {"id": self.id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.id = str(state.get("id") or "")
