"""Finite checkpoints only: the run stops with one line at the first NaN/inf loss or weight, naming the step and
the last checkpoint that is finite (re-read to make sure); a checkpoint is written only from finite state."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from maecore import distributed as du
from maecore.checkpoint import checkpoint_nonfinite, float_tensors, load_file, nonfinite, nonfinite_names
from maecore.engine.fsdp import local_shard
from maecore.errors import NonFiniteError, UserError

if TYPE_CHECKING:
    from maecore.engine.run import Run


class FiniteGuard:
    """The trainer's NaN/inf watch.  The loss is checked on the device every micro-batch without a sync
    (:attr:`TrainStep.nonfinite`); :meth:`check` is the host sync that reads it (every ``log_every`` steps) and,
    with ``weights``, the weights, optimizer state and hooks' states (before a checkpoint, after an epoch)."""

    def __init__(self, trainer: Run) -> None:
        self.t = weakref.proxy(trainer)
        self.first_bad = torch.zeros((), dtype=torch.long, device=trainer.device)  # first step with a NaN/inf loss (0: none)
        self.verified_at = -1  # the step whose weights were last checked finite
        self.last_good: Path | None = None  # the newest checkpoint-last.pth known finite, and its step
        self.last_good_step = 0

    def note_step(self) -> None:
        """After an optimizer step: the first step with a non-finite loss, kept on the device (no sync)."""
        t = self.t
        self.first_bad = torch.where((self.first_bad == 0) & t.train_step.nonfinite, t.step, self.first_bad)

    def _state_tensors(self) -> list[torch.Tensor]:
        t = self.t
        ts = float_tensors(list(t.model.state_dict().values()))
        ts += float_tensors([st for st in t.optimizer.state.values()])
        ts += float_tensors(list(t.hook_states().values()))
        return [x for x in map(local_shard, ts) if x.numel()]  # under --fsdp each rank checks its shards

    def check(self, weights: bool = False) -> None:
        """One host sync: did any rank see a non-finite loss since the last check (and, with ``weights``,
        does any weight or optimizer state hold NaN/inf now)?  Stops the run with one line if so."""
        t = self.t
        flags = [t.train_step.nonfinite.float()]
        if weights:
            flags.append(nonfinite(self._state_tensors()).float().to(t.device))
        vals = du.all_reduce_sum(torch.stack(flags)).tolist()
        bad_loss, bad_weights = vals[0] > 0, len(vals) > 1 and vals[1] > 0
        if not (bad_loss or bad_weights):
            if weights:
                self.verified_at = t.step
            return
        if bad_loss:
            firsts = [s for s in du.all_gather_object(int(self.first_bad)) if s > 0]
            what = f"loss is not finite (NaN/inf) at step {min(firsts) if firsts else t.step} (epoch {t.epoch})"
        else:
            names = nonfinite_names({k: local_shard(v) for k, v in t.model.state_dict().items()})
            what = (f"weights are not finite (NaN/inf) after step {t.step} (epoch {t.epoch}): "
                    + (f"{len(names)} of {len(t.model.state_dict())} model tensors (first {names[0]!r})" if names
                       else "in the optimizer (or EMA) state"))
        msg = None
        if du.is_main():
            msg = f"{what}; stopped, {self.last_finite()}"
        raise NonFiniteError(du.broadcast_object(msg))

    def last_finite(self) -> str:
        """Names the last checkpoint-last.pth of this run — after re-reading it to be sure it is finite."""
        path = self.last_good
        if path is None or not path.is_file():
            return "no checkpoint was written"
        try:
            ckpt = load_file(path)
        except UserError:
            return f"{path} is no longer readable"
        if not isinstance(ckpt, dict) or checkpoint_nonfinite(ckpt):
            return f"{path} is not finite either"
        return f"the last finite checkpoint is {path} (step {ckpt.get('step', '?')})"

    def kept(self) -> str:
        """What a failed save leaves: the last checkpoint-last.pth, intact."""
        if self.last_good is not None and self.last_good.is_file():
            return f"kept {self.last_good} (step {self.last_good_step}), intact"
        return "no earlier checkpoint of this run to keep"
