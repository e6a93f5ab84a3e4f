"""Hooks: everything a run does besides training — its logs, progress, evaluation, checkpoints, figures, stopping
on a signal — written as :class:`HookBase` subclasses that the loop (:class:`~maecore.engine.trainer.Trainer`)
calls at fixed points and knows nothing else about (detectron2's idea, ``engine/train_loop.py``).

The events, in the order a run meets them::

    before_train                  after the folder is claimed and the checkpoint (if any) loaded
    for each epoch:
        before_epoch
        for each micro-batch:
            before_step           only on the first micro-batch of an optimizer step, once its lr is set
            after_backward        its forward + backward done, its loss and logs added to trainer.storage
            after_step            only on the last: the optimizer stepped, trainer.step counted
        after_epoch               the epoch's batches done (or cut short by --max_steps), the weights checked finite
            after_eval            fired by Evaluation once trainer.eval_results holds the results
    after_train                   always, also after an error or a stop: cleanup
    on_stop                       fired by StopOnSignal at a step boundary: Checkpointer writes checkpoint-last.pth
                                  there, then the run ends with Preempted (exit status 75)

Hooks run in ``priority`` order (then registration order): the task's per-step callbacks first (an EMA of the
weights), then the loggers (:mod:`maecore.engine.loggers`: where the records go), the logs and progress, then the
hooks a task or user adds (:data:`NORMAL`), evaluation, the checkpoints, figures and last the stop check — so a
checkpoint holds every other hook's work of its step.

State: a hook with a ``state_key`` has its :meth:`~HookBase.state_dict` saved in every checkpoint under
``extra[state_key]`` and given back to :meth:`~HookBase.load_state_dict`
on resume; a checkpoint without that key (an older one) leaves the hook as constructed, and code that does not
know the key ignores it.  ``state_dict`` is called on every rank (it may gather); its tensors are checked with the
weights (a NaN/inf there stops the run: checkpoints hold finite numbers only).

A failing hook ends the run like any other error: its exception leaves :meth:`Trainer.fit` unchanged (a
``UserError`` is the CLI's one line), no checkpoint is written for the half-done step (the newest one stays the
newest), and every hook's ``after_train`` still runs (bars closed, signal handlers restored, logs closed, the
folder unlocked), so ``--resume auto`` continues from the last checkpoint.
"""

from __future__ import annotations

import signal
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from tqdm import tqdm

from maecore import distributed as du
from maecore.engine.precision import describe_amp
from maecore.engine.runfolder import LAST
from maecore.engine.signals import EXIT_REQUEUE, STOP_SIGNALS, Preempted

if TYPE_CHECKING:
    from maecore.engine.run import Run

CALLBACK, LOGGERS, LOG, PROGRESS, NORMAL, EVAL, CHECKPOINT, FIGURES, STOP = 10, 15, 20, 30, 50, 70, 80, 85, 90  # priorities
STATUS_EVERY_S = 10.0


class HookBase:
    """A do-nothing hook: override the events it needs.  ``self.trainer`` (a weak proxy, set when registered)
    is the run: its ``cfg``, ``model``, ``optimizer``, ``step``, ``epoch``, ``storage``, ``logger``, ``save()``…
    and, in ``after_backward``, ``batch``: the micro-batch just trained on, as the step function got it (its labels,
    for a hook that learns from them: ``maecore.monitor``'s online classifier)."""

    trainer: Run
    priority: int = NORMAL
    state_key: str | None = None  # checkpointed under extra[state_key] when set

    def before_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def before_step(self) -> None: ...
    def after_backward(self) -> None: ...
    def after_step(self) -> None: ...
    def after_eval(self) -> None: ...
    def after_epoch(self) -> None: ...
    def on_stop(self) -> None: ...
    def after_train(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


EVENTS = ("before_train", "before_epoch", "before_step", "after_backward", "after_step", "after_eval", "after_epoch",
          "on_stop", "after_train")


class HookList:
    """A trainer's hooks, in the order they run: by ``priority``, then as registered."""

    def __init__(self, trainer: Run) -> None:
        self.trainer = weakref.proxy(trainer)  # the trainer owns its hooks, not the other way round (no cycle)
        self._hooks: list[HookBase] = []

    def __iter__(self) -> Iterator[HookBase]:
        return iter(self._hooks)

    def register(self, hooks: Iterable[HookBase | None]) -> None:
        new = [h for h in hooks if h is not None]
        keys = [h.state_key for h in [*self._hooks, *new] if h.state_key]
        if dup := sorted({k for k in keys if keys.count(k) > 1}):
            raise ValueError(f"two hooks keep their state under the same key: {', '.join(dup)}")
        for h in new:
            h.trainer = self.trainer
        self._hooks = sorted([*self._hooks, *new], key=lambda h: h.priority)  # stable: equal priorities keep their order

    def call(self, event: str) -> None:
        for h in self._hooks:
            getattr(h, event)()

    def after_train(self, failed: bool) -> None:
        """Every hook's ``after_train``, even after one fails; its error is raised once all ran — unless the run
        failed already: then that error is the one the user sees, and this one a warning line."""
        first: Exception | None = None
        for h in self._hooks:
            try:
                h.after_train()
            except Exception as e:
                if failed:
                    print(f"warning: {type(h).__name__}.after_train failed too: {e}", file=sys.stderr, flush=True)
                first = first or e
        if first is not None and not failed:
            raise first

    def state_dicts(self) -> dict[str, Any]:
        return {h.state_key: h.state_dict() for h in self._hooks if h.state_key}

    def load_state_dicts(self, saved: Mapping[str, Any]) -> None:
        """A key the checkpoint lacks (an older run): that hook stays as constructed."""
        for h in self._hooks:
            if h.state_key and h.state_key in saved:
                h.load_state_dict(saved[h.state_key])


# ---- the task's callbacks (Trainer(after_step=, extra_state=, evaluate=, on_epoch_end=)) --------------------------
class StepCallback(HookBase):
    """``fn(model, step)`` after every optimizer step (classification's EMA of the weights)."""

    priority = CALLBACK

    def __init__(self, fn: Callable[[nn.Module, int], None]) -> None:
        self.fn = fn

    def after_step(self) -> None:
        self.fn(self.trainer.model, self.trainer.step)


class ModuleState(HookBase):
    """A module checkpointed with the run under ``extra[key]`` (the EMA weights)."""

    priority = CALLBACK

    def __init__(self, key: str, module: nn.Module) -> None:
        self.state_key = key
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)


class Evaluation(HookBase):
    """``evaluate(model, epoch) -> results`` every ``eval_every`` epochs and after the last, in eval mode, without
    gradients, whole weights under ``--fsdp``; logged as an ``eval`` record and left in ``trainer.eval_results``
    (empty for an epoch without evaluation) for the best checkpoint and the run's summary."""

    priority = EVAL

    def __init__(self, evaluate: Callable[[nn.Module, int], dict[str, float]]) -> None:
        self.evaluate = evaluate

    def after_epoch(self) -> None:
        t = self.trainer
        epoch = t.trained_epoch
        t.eval_results = {}
        if (epoch + 1) % t.cfg.eval_every and not t.final:
            return
        t.model.eval()
        with torch.no_grad(), t.whole_weights():
            results = self.evaluate(t.model, epoch)
        t.logger.log("eval", t.step, epoch=epoch, **results)
        t.eval_results = results
        t.call_hooks("after_eval")


class EpochEndCallback(HookBase):
    """``fn(model, epoch)`` on rank 0 after each epoch's checkpoint (pretraining's reconstruction figures)."""

    priority = FIGURES

    def __init__(self, fn: Callable[[nn.Module, int], None]) -> None:
        self.fn = fn

    def after_epoch(self) -> None:
        t = self.trainer
        with t.whole_weights():  # rank 0 alone draws: no collective may run in its forward passes
            if du.is_main():
                self.fn(t.model, t.trained_epoch)


# ---- the standard hooks ---------------------------------------------------------------------------------------
class TrainLog(HookBase):
    """The ``run`` record (and the precision line) at the start; every ``log_every`` steps (and the last) the one
    host sync of those steps: a NaN/inf loss stops the run, then the means of ``trainer.storage`` (counts, keys
    starting with ``n_``, summed over steps and ranks) with lr, epoch and images/s go to log.jsonl and TensorBoard."""

    priority = LOG

    def before_train(self) -> None:
        t = self.trainer
        if du.is_main():
            print(describe_amp(t.cfg.amp, t.amp, t.device) + f"; attention: {t.attn} (--attn {t.cfg.attn})")
        t.logger.log("run", t.step, amp=t.amp, amp_flag=t.cfg.amp, attn=t.attn, device=str(t.device),
                     world_size=du.world_size(), threads=torch.get_num_threads())

    def before_epoch(self) -> None:
        self.trainer.storage.reset()  # a log line's window never spans two epochs

    def after_step(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        if t.step % cfg.log_every and not t.done:
            return
        t.check_finite()
        s = t.storage
        vals = {k: _mean(v, k, s.count) for k, v in s.sums.items()}
        dt = time.time() - s.since
        vals.update(lr=t.lr, epoch=t.epoch + (t.iter_in_epoch - 1) / t.iters_per_epoch,  # the last micro-batch's place
                    img_per_s=s.count * cfg.batch_size * du.world_size() / max(dt, 1e-9))
        t.logger.log("train", t.step, **vals)
        s.latest, s.latest_step = vals, t.step
        s.reset()


def _mean(v: torch.Tensor, key: str, n: int) -> float:
    """Counts (keys starting with ``n_``) are summed over steps and ranks, the rest averaged."""
    if key.startswith("n_"):
        return float(du.all_reduce_sum(v).item())
    return float(du.all_reduce_mean(v / n).item())


class Progress(HookBase):
    """A bar on a terminal; elsewhere (logs, --no_progress, the demo) a status line every :data:`STATUS_EVERY_S`."""

    priority = PROGRESS

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.status: StatusLine | None = None

    def before_epoch(self) -> None:
        t = self.trainer
        use_bar = t.cfg.progress and du.is_main() and sys.stderr.isatty()
        self.bar = tqdm(total=t.iters_per_epoch, initial=t.iter_in_epoch, desc=f"epoch {t.epoch}", disable=not use_bar,
                        dynamic_ncols=True, leave=False)
        self.status = None if use_bar or not du.is_main() else StatusLine(t)

    def after_backward(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def after_step(self) -> None:
        t, s = self.trainer, self.trainer.storage
        if self.bar is not None and s.latest_step == t.step:
            self.bar.set_postfix(loss=f"{s.latest['loss']:.4f}", lr=f"{s.latest['lr']:.2e}")
        if self.status is not None:
            self.status.tick()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    after_epoch = on_stop = after_train = close


class StatusLine:
    """Where a run stands, one line every :data:`STATUS_EVERY_S` seconds when no progress bar is drawn: step,
    epoch, the last logged loss (no extra host sync), lr, images/s since the last line, time left."""

    def __init__(self, trainer: Run) -> None:
        self.t = trainer
        self.last_time = time.time()
        self.last_step = trainer.step
        steps_per_epoch = trainer.iters_per_epoch // trainer.cfg.accum_iter
        total = trainer.cfg.epochs * steps_per_epoch
        self.total = min(total, trainer.cfg.max_steps) if trainer.cfg.max_steps else total

    def tick(self) -> None:
        now = time.time()
        if now - self.last_time < STATUS_EVERY_S:
            return
        t, cfg = self.t, self.t.cfg
        rate = (t.step - self.last_step) / (now - self.last_time)  # steps/s
        vals = t.storage.latest
        parts = [f"step {t.step}/{self.total}", f"epoch {t.epoch}"]
        if "loss" in vals:
            parts.append(f"loss {vals['loss']:.4f}")
        if "lr" in vals:
            parts.append(f"lr {vals['lr']:.2e}")
        parts.append(f"{rate * cfg.batch_size * cfg.accum_iter * du.world_size():.1f} img/s")
        if rate > 0:
            parts.append(f"{_duration((self.total - t.step) / rate)} left")
        print("  " + ", ".join(parts), flush=True)
        self.last_time, self.last_step = now, t.step


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Checkpointer(HookBase):
    """When ``checkpoint-last.pth`` and the kept ones are written (:meth:`Trainer.save` writes them):
    every ``save_every_steps`` steps; where ``--max_steps`` ends an epoch early; at each epoch end, with
    ``checkpoint-<epoch>.pth`` every ``keep_every`` epochs and after the last, and ``checkpoint-best.pth`` when
    ``best_key`` improved; on a stop, where the run stands (unless just written)."""

    priority = CHECKPOINT

    def after_step(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        if t.done:
            if t.iter_in_epoch < t.iters_per_epoch:  # the epoch end will not write checkpoint-last: write it here
                t.save(LAST)
        elif cfg.save_every_steps and t.step % cfg.save_every_steps == 0:
            t.save(LAST)

    def after_epoch(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        epoch = t.trained_epoch
        names = [LAST] if t.epoch_complete else []  # an epoch cut short by --max_steps was checkpointed already
        if cfg.keep_every and ((epoch + 1) % cfg.keep_every == 0 or t.final):
            names.append(f"checkpoint-{epoch}.pth")
        results = t.eval_results
        if cfg.best_key and cfg.best_key in results and results[cfg.best_key] > t.best:
            t.best = results[cfg.best_key]
            names.append("checkpoint-best.pth")
        if names:
            t.save(*names)

    def on_stop(self) -> None:
        t = self.trainer
        if t.saved_at != (t.epoch, t.iter_in_epoch, t.step):
            t.save(LAST)


class StopOnSignal(HookBase):
    """SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT stop the run at the next step boundary (or epoch start): every rank
    agrees on the same step (a vote that costs no sync per step), ``on_stop`` is fired (the checkpoint is written
    there), one line is printed and :class:`Preempted` raised (exit status :data:`EXIT_REQUEUE`).  The signal
    handlers are installed for the run only — after a stop, to the process's exit (:meth:`StopSignals.hold`)."""

    priority = STOP

    def __init__(self) -> None:
        self.vote = du.AnyRank(len(STOP_SIGNALS))  # one flag per signal: every rank learns which were sent
        self.stopped: Preempted | None = None

    def before_train(self) -> None:
        self.trainer.signals.install()
        self._check()

    def after_step(self) -> None:
        self._check()

    def after_epoch(self) -> None:
        self._check()

    def after_train(self) -> None:
        if self.stopped is None:
            self.trainer.signals.restore()
        else:  # a late signal (torchrun's SIGTERM once another rank has exited) must not turn 75 into a kill
            self.trainer.signals.hold()
            self.stopped.release = self.trainer.signals.restore
        if self.trainer.finished:
            self.vote.close()

    def _check(self) -> None:
        """Every rank calls this at the same points: do all agree that some rank got a stop signal?"""
        t = self.trainer
        if t.epoch >= t.cfg.epochs or t.done:
            return
        if self.vote.poll([s in t.signals.received for s in STOP_SIGNALS]):
            self.stop()

    def stop(self) -> None:
        """Checkpoint where the run stands (a step boundary), say so in one line, exit with EXIT_REQUEUE."""
        t = self.trainer
        t.signals.saving = True  # from here to the exit no signal interrupts (a second Ctrl-C included)
        self.vote.close()  # every rank is here: finish the vote in flight
        t.call_hooks("on_stop")
        agreed = [signal.Signals(s).name for s, on in zip(STOP_SIGNALS, self.vote.agreed) if on]
        name = t.signals.name if t.signals.signum else (f"{'/'.join(agreed)} on another rank" if agreed else t.signals.name)
        msg = (f"stopped by {name} after step {t.step} (epoch {t.epoch}, batch {t.iter_in_epoch}): "
               f"wrote {t.last_path}; exit status {EXIT_REQUEUE}: continue with --resume auto")
        if du.is_main():
            t.logger.log("stop", t.step, signal=name, signals=agreed, epoch=t.epoch, iter_in_epoch=t.iter_in_epoch)
            print(msg, file=sys.stderr, flush=True)
        self.stopped = Preempted(msg, agreed)
        raise self.stopped
