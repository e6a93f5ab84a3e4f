"""The loop: epochs of :class:`~maecore.engine.step.TrainStep` over a resumable sampler, and the checkpoint
it writes and resumes from; everything else a run does is a hook (:mod:`maecore.engine.hooks`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from maecore import distributed as du
from maecore.checkpoint import (
    CheckpointWriteError,
    checkpoint_args,
    rng_state,
    save_atomic,
    set_rng_state,
)
from maecore.data.sampler import ResumableSampler, SeededDataset
from maecore.data.workers import ignore_stop_signals, shutdown_workers, worker_error_line
from maecore.engine.config import SCHEDULE_KEYS, EngineConfig
from maecore.engine.fsdp import full_model_state, full_optimizer_state, init_root, load_sharded, shard_model
from maecore.engine.guard import FiniteGuard
from maecore.engine.hooks import (
    Checkpointer,
    EpochEndCallback,
    Evaluation,
    HookBase,
    HookList,
    ModuleState,
    Progress,
    StepCallback,
    StopOnSignal,
    TrainLog,
)
from maecore.engine.loggers import build_loggers
from maecore.engine.logs import RunLogger
from maecore.engine.precision import resolve_amp, use_attention
from maecore.engine.runfolder import LAST, RunFolder, show_value
from maecore.engine.signals import StopSignals
from maecore.engine.step import StepFn, TrainStep, to_device
from maecore.engine.storage import MetricStorage
from maecore.errors import UserError
from maecore.optim import set_lr


class Trainer:
    """Runs ``cfg.epochs`` epochs of ``step_fn`` over ``dataset`` with ``optimizer`` and ``schedule``.

    ``model`` here is the bare module; the trainer wraps it in DDP (or shards it: ``--fsdp``).  What else a run
    does is a hook (:class:`~maecore.engine.hooks.HookBase`): the standard ones (the loggers ``cfg.loggers``, logs,
    progress, checkpoints, the stop on a signal) are registered here, with the task's callbacks as hooks: ``evaluate(model, epoch) -> dict``
    every ``eval_every`` epochs, ``on_epoch_end(model, epoch)`` (figures), ``after_step(model, step)`` (EMA…),
    and ``extra_state`` modules (EMA weights…) checkpointed under ``extra``; ``hooks`` and :meth:`register_hooks`
    add more.  ``model_keys``: the ``args`` keys that define the network (a resume must match them);
    ``schedule(t)`` gives the lr at fractional epoch ``t``, or at optimizer step ``t`` (0-based) when it has a true
    ``per_step`` attribute (``maecore.optim.WarmupStep`` / ``WarmupPoly``).
    ``schedule_keys``: those a resume keeps unless ``--resume_override`` names them.
    ``device_batch(batch) -> batch`` runs on every batch once it is on the device (``maecore.data.pixels.UInt8Normalize``:
    uint8 images from the fast decoders normalised there); without it batches go to ``step_fn`` as loaded.
    Constructing a trainer writes nothing; :meth:`fit` claims the output folder first.
    """

    def __init__(
        self,
        cfg: EngineConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        step_fn: StepFn,
        schedule: Callable[[float], float],
        device: torch.device,
        args: dict[str, Any] | None = None,
        collate_fn: Callable | None = None,
        evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
        on_epoch_end: Callable[[nn.Module, int], None] | None = None,
        after_step: Callable[[nn.Module, int], None] | None = None,
        extra_state: dict[str, nn.Module] | None = None,
        model_keys: Sequence[str] = (),
        schedule_keys: Sequence[str] = SCHEDULE_KEYS,
        device_batch: Callable[[Any], Any] | None = None,
        hooks: Iterable[HookBase] = (),
    ) -> None:
        self.cfg = cfg
        self.device_batch = device_batch  # finishes a batch on the device (e.g. uint8 -> normalised: maecore.data.pixels)
        self.device = device
        self.model = model.to(device)
        self.optimizer = optimizer
        self.step_fn = step_fn
        self.schedule = schedule
        self.args = dict(args or {})
        self.out = Path(cfg.output_dir)
        self.amp = resolve_amp(cfg.amp, device)
        self.attn = use_attention(self.model, cfg.attn, device, self.amp)
        self.logger = RunLogger(self.out, du.is_main(), build_loggers(cfg.loggers))
        self.folder = RunFolder(cfg, self.args, self.logger, model_keys, schedule_keys)
        self.lock = self.folder.lock

        if len(dataset) < cfg.batch_size * du.world_size():  # type: ignore[arg-type]
            raise UserError(
                f"dataset has {len(dataset)} images, fewer than one global batch "  # type: ignore[arg-type]
                f"({cfg.batch_size} x {du.world_size()} processes)"
            )
        self.sampler = ResumableSampler(len(dataset), True, cfg.seed, du.rank(), du.world_size())  # type: ignore[arg-type]
        # Own generator: creating loader iterators must not consume the global RNG, or a resumed
        # run would draw different masks/drop-paths than an uninterrupted one.
        self.loader = DataLoader(
            SeededDataset(dataset),
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_mem and device.type == "cuda",
            drop_last=True,
            collate_fn=collate_fn,
            persistent_workers=cfg.num_workers > 0,
            generator=torch.Generator().manual_seed(cfg.seed),
            worker_init_fn=ignore_stop_signals if cfg.num_workers > 0 else None,
        )
        self.iters_per_epoch = self.sampler.num_samples // cfg.batch_size
        if self.iters_per_epoch < cfg.accum_iter:
            raise UserError(f"an epoch has {self.iters_per_epoch} batches, fewer than --accum_iter {cfg.accum_iter}")

        self.ddp = None
        self.fsdp_modules: list[nn.Module] = []
        if cfg.fsdp:
            if not du.is_dist():
                raise UserError("--fsdp shards the model over the processes of a torchrun job: launch it with torchrun")
            if extra_state or after_step is not None:
                raise UserError("--fsdp does not keep an EMA of the weights (it would need them whole on every rank): "
                                "drop --model_ema, or train without --fsdp")
            self.fsdp_modules = shard_model(self.model, optimizer)
        elif du.is_dist():
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        runner = self.ddp or self.model
        self.runner = torch.compile(runner) if cfg.compile else runner
        self.train_step = TrainStep(self.model, optimizer, step_fn, device, self.amp, cfg.accum_iter, cfg.clip_grad,
                                    runner=self.runner, ddp=self.ddp, fsdp=self.model if self.fsdp_modules else None)
        self.scaler = self.train_step.scaler
        self.signals = StopSignals()
        self.storage = MetricStorage()

        self.epoch = 0
        self.iter_in_epoch = 0
        self.step = 0
        self.lr = 0.0  # the learning rate of the step in progress
        self.trained_epoch = 0  # the epoch the last pass of the loop ran (after_epoch: the one just ended)
        self.best = -math.inf
        self.eval_results: dict[str, Any] = {}  # the last evaluation's (Evaluation hook); the summary's too
        self.batch: Any = None  # the micro-batch in progress, as step_fn gets it: for the hooks' after_backward
        self.finished = False  # fit ran to its end (no error, no stop)
        self.guard = FiniteGuard(self)
        self.saved_at: tuple[int, int, int] | None = None  # (epoch, iter, step) of the last checkpoint-last

        self._hooks = HookList(self)
        self.register_hooks([
            *([StepCallback(after_step)] if after_step is not None else []),
            *(ModuleState(k, m) for k, m in (extra_state or {}).items()),
            *self.logger.loggers,
            TrainLog(),
            Progress(),
            *([Evaluation(evaluate)] if evaluate is not None else []),
            Checkpointer(),
            *([EpochEndCallback(on_epoch_end)] if on_epoch_end is not None else []),
            StopOnSignal(),
            *hooks,
        ])

    # ---- hooks ----------------------------------------------------------------------------------
    @property
    def hooks(self) -> tuple[HookBase, ...]:
        """The registered hooks, in the order they run."""
        return tuple(self._hooks)

    def register_hooks(self, hooks: Iterable[HookBase | None]) -> None:
        """Add hooks (``None`` entries are skipped); all run in ``priority`` order, then registration order."""
        self._hooks.register(hooks)

    def call_hooks(self, event: str) -> None:
        """Every hook's ``event`` (one of :data:`~maecore.engine.hooks.EVENTS`), in order."""
        self._hooks.call(event)

    def hook_states(self) -> dict[str, Any]:
        """The states of the hooks with a ``state_key`` (checkpointed under ``extra``)."""
        return self._hooks.state_dicts()

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out / LAST

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint; under ``--fsdp`` the model and optimizer state are gathered whole (on rank 0, on the
        CPU; the other ranks' entries are empty), so every checkpoint has the same plain layout."""
        sharded = bool(self.fsdp_modules)
        return {
            "model": full_model_state(self.model) if sharded else self.model.state_dict(),
            "optimizer": full_optimizer_state(self.optimizer) if sharded else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,  # the epoch to continue in …
            "iter_in_epoch": self.iter_in_epoch,  # … after this many of its batches
            "step": self.step,
            "best": self.best,
            "rng": du.all_gather_object(rng_state()),  # one per rank
            "extra": self.hook_states(),  # the EMA weights (extra_state=) and every hook's with a state_key
            "args": self.args,
        }

    def save(self, *names: str) -> None:
        """Write checkpoint(s) on rank 0 (every rank takes part: RNG states are gathered, errors agreed) —
        only from finite weights and optimizer state."""
        self.check_finite(weights=self.guard.verified_at != self.step)
        state = self.state_dict()
        err = None
        if du.is_main():
            with self.signals.deferred():
                for name in names:
                    try:
                        path = save_atomic(state, self.out / name)
                    except CheckpointWriteError as e:
                        err = f"cannot write checkpoint {e.path}: {e.reason}; {self.guard.kept()}"
                        break
                    if name == LAST:
                        self.guard.last_good, self.guard.last_good_step = path, self.step
        err = du.broadcast_object(err)  # the barrier, too
        if err:
            raise UserError(err)
        if LAST in names:
            self.saved_at = (self.epoch, self.iter_in_epoch, self.step)

    def _load(self, ckpt: dict[str, Any], path: Path, overrides: dict[str, tuple[Any, Any]]) -> None:
        """Continue from ``ckpt`` (checked by :meth:`RunFolder.check_resume`)."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.fsdp_modules:
            load_sharded(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])
        else:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if overrides:  # the optimizer's hyper-parameters (weight decay, lr scales…) are this run's, not the checkpoint's
            for g, f in zip(self.optimizer.param_groups, fresh):
                g.update(f)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self._hooks.load_state_dicts(ckpt.get("extra", {}))
        self.epoch, self.iter_in_epoch, self.step = ckpt["epoch"], ckpt["iter_in_epoch"], ckpt["step"]
        self.best = ckpt.get("best", -math.inf)
        rngs = ckpt.get("rng") or []
        if rngs:
            set_rng_state(rngs[du.rank()] if du.rank() < len(rngs) else rngs[0])
        self.guard.last_good, self.guard.last_good_step = path, self.step
        self.guard.verified_at = self.step
        notes = []
        saved = checkpoint_args(ckpt) or {}
        if self.iter_in_epoch and ("batch_size" in overrides or "accum_iter" in overrides):
            # the same place in the epoch, counted in samples, at the new batch size (on an accumulation boundary)
            done = self.iter_in_epoch * int(saved.get("batch_size", self.cfg.batch_size))
            it = done // self.cfg.batch_size
            self.iter_in_epoch = min(it - it % self.cfg.accum_iter, self.iters_per_epoch)
            notes.append(f"batch {self.iter_in_epoch} of the epoch at the new batch size")
        if du.is_main():
            print(f"resumed from {path}: epoch {self.epoch}, batch {self.iter_in_epoch}, step {self.step}")
            if overrides:
                taken = ", ".join(f"{k} {show_value(a)} -> {show_value(b)}" for k, (a, b) in overrides.items())
                print(f"resume: new values taken over the checkpoint's (--resume_override): {taken}"
                      + (f"; {'; '.join(notes)}" if notes else ""))
            self.logger.log("resume", self.step, checkpoint=str(path), epoch=self.epoch, iter_in_epoch=self.iter_in_epoch,
                            overrides={k: [a, b] for k, (a, b) in overrides.items()})

    @contextlib.contextmanager
    def whole_weights(self):
        """Under ``--fsdp``: every block's parameters gathered for the block (forward passes then run no collective,
        so ranks may evaluate unequal numbers of batches and rank 0 may draw alone), sharded again after."""
        if not self.fsdp_modules:
            yield
            return
        init_root(self.model)
        for m in self.fsdp_modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in self.fsdp_modules:
                m.reshard()
                m.set_reshard_after_forward(m is not self.model, recurse=False)

    def check_finite(self, weights: bool = False) -> None:
        """The one host sync of the NaN/inf watch (:meth:`FiniteGuard.check`)."""
        self.guard.check(weights)

    # ---- the loop ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """``--max_steps`` reached."""
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    @property
    def final(self) -> bool:
        """The epoch just ended is the run's last (all epochs done, or ``--max_steps`` reached)."""
        return self.epoch >= self.cfg.epochs or self.done

    @property
    def epoch_complete(self) -> bool:
        """The epoch just ended ran all its batches (not cut short by ``--max_steps``)."""
        return self.epoch > self.trained_epoch

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        ckpt, path, overrides = self.folder.claim(self.model, self.optimizer)
        t_start = time.time()
        failed = True
        try:
            if ckpt is not None:
                assert path is not None
                self._load(ckpt, path, overrides)
                del ckpt
            self.call_hooks("before_train")
            while self.epoch < cfg.epochs and not self.done:
                self.train_one_epoch()
                self.check_finite(weights=True)  # before evaluating NaN weights or drawing them
                self.call_hooks("after_epoch")
            self.finished = True
            failed = False
        finally:
            shutdown_workers(self.loader)  # persistent workers would otherwise outlive the run (--max_steps, a stop)
            try:
                self._hooks.after_train(failed)
            finally:
                self.logger.close()
                self.folder.release()
        return {"steps": self.step, "epochs": self.epoch, "time_s": time.time() - t_start, **self.eval_results}

    def _batches(self):
        """The loader's batches; a worker's UserError (too many bad files…) comes out as its own one line."""
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as e:
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:  # the other workers stop too (no more warnings after the error line)
                    shutdown()
                raise UserError(worker_error_line(e)) from None
            yield batch

    def train_one_epoch(self) -> None:
        """One epoch's batches from where the run stands (mid-epoch after a resume), or up to ``--max_steps``."""
        cfg = self.cfg
        self.trained_epoch = self.epoch
        self.runner.train()
        self.sampler.set_epoch(self.epoch, start=self.iter_in_epoch * cfg.batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        self.call_hooks("before_epoch")
        for batch in self._batches():
            it = self.iter_in_epoch
            if it >= self.iters_per_epoch:
                break
            boundary = (it + 1) % cfg.accum_iter == 0
            if it % cfg.accum_iter == 0:
                # fractional epochs (the official MAE clock), or the optimizer step for schedules counted in
                # iterations (detectron2, mmseg): exact whatever the epoch length and the accumulation
                per_step = getattr(self.schedule, "per_step", False)
                self.lr = self.schedule(self.step if per_step else self.epoch + it / self.iters_per_epoch)
                set_lr(self.optimizer, self.lr)
                self.call_hooks("before_step")
            batch = to_device(batch, self.device)
            if self.device_batch is not None:
                batch = self.device_batch(batch)
            self.batch = batch
            loss, logs = self.train_step.backward(batch, sync=boundary)
            self.storage.put({"loss": loss, **logs})
            self.iter_in_epoch += 1
            self.call_hooks("after_backward")
            self.batch = batch = None  # not kept alive beside the next one
            if not boundary:
                continue
            self.train_step.update()
            self.step += 1
            self.guard.note_step()  # the first step with a non-finite loss, on the device: the stop line names it
            self.call_hooks("after_step")
            if self.done:
                break
        if self.iter_in_epoch >= self.iters_per_epoch:
            self.epoch += 1
            self.iter_in_epoch = 0
