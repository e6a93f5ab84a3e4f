"""The one training engine every task uses.

Loop with gradient accumulation, per-iteration lr schedule with per-group ``lr_scale`` (layer decay),
mixed precision (bf16 autocast; fp16 + GradScaler on request), grad clipping, DDP or FSDP2 (``--fsdp``: sharded
per transformer block, checkpoints gathered whole in the DDP layout), checkpoints that resume mid-epoch to the
exact same numbers, progress bar, TensorBoard and JSON-lines logs.

A task supplies the model, the optimizer, the dataset and a ``step_fn(model, batch) -> (loss, logs)``.
Host syncs happen only every ``log_every`` steps and at checkpoints, never per iteration.

Nothing is lost, and a failure is one line (``error: …``, status 2), never a traceback:

* Finite checkpoints only.  Before a checkpoint is written its weights and optimizer state are checked (one
  fused inf-norm over all tensors); a NaN/inf loss (checked every ``log_every`` steps) or weight stops the
  run with one line naming the step and the last checkpoint that is finite (re-read to make sure).  Resuming
  from a non-finite checkpoint is refused.
* One run per output folder.  ``run.lock`` (pid and host; an OS record lock, so a crashed run leaves no
  stale lock) refuses a second concurrent run.  A fresh run into a folder that holds a checkpoint is refused unless
  ``--resume`` or ``--overwrite`` is given; ``--overwrite`` moves the old checkpoints and ``args.json`` into
  ``previous-N/`` (and the old ``log.jsonl`` to ``log.N.jsonl``): nothing is deleted.  ``args.json`` is
  written only after these checks.
* Resume checks the run's flags against the checkpoint's saved args before anything in the folder is touched:
  the task's model flags (``model_keys``) must match; the schedule flags (:data:`SCHEDULE_KEYS`) must too,
  unless ``--resume_override KEY[,KEY…]`` (or ``all``) takes the new value, which is printed and logged.
* A failed save (disk full, quota…) is one line naming the file; the previous checkpoint stays intact.  A
  DataLoader worker's error is unwrapped to its own line.
* SIGTERM, SIGUSR1, SIGUSR2 and SIGINT (what SLURM / Kubernetes send before a kill, submitit's time-limit signal,
  and Ctrl-C) finish the current optimizer step, write ``checkpoint-last.pth`` atomically, print one line and exit with status
  :data:`EXIT_REQUEUE` = 75 (``EX_TEMPFAIL``: "try again"): a job script requeues on 75 and the run continues
  with ``--resume auto`` to the same numbers as an uninterrupted run.  Under DDP every rank stops at the
  same step, and every rank learns which signals were received (:attr:`Preempted.signals`: a launcher requeues on
  its own signal only).  Further signals while stopping are ignored (a second Ctrl-C outside the save aborts at once;
  the save itself is atomic either way).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from maecore import distributed as du
from maecore.checkpoint import (
    CheckpointWriteError,
    FolderLock,
    checkpoint_args,
    checkpoint_nonfinite,
    float_tensors,
    folder_checkpoints,
    load_file,
    nonfinite,
    nonfinite_names,
    rng_state,
    save_atomic,
    set_aside,
    set_rng_state,
)
from maecore.cli import non_negative_float, non_negative_int, positive_float, positive_int
from maecore.data import ResumableSampler, SeededDataset, ignore_stop_signals, shutdown_workers, worker_error_line
from maecore.errors import NonFiniteError, UserError
from maecore.optim import set_lr
from maecore.vit import set_fused_attention

NonFiniteLossError = NonFiniteError  # the older name

EXIT_REQUEUE = 75  # EX_TEMPFAIL (sysexits.h): stopped on a signal, checkpointed; requeue and --resume auto
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT") if hasattr(signal, n))
LAST = "checkpoint-last.pth"
# flags that change the optimisation or the data order, not the network: a resumed run keeps the checkpoint's
# values unless --resume_override names them (keys a task does not have are skipped)
SCHEDULE_KEYS = ("batch_size", "accum_iter", "lr", "blr", "min_lr", "epochs", "warmup_epochs", "warmup_iters",
                 "max_iters", "milestones", "poly_after_warmup", "weight_decay", "wd_rule", "layer_decay", "clip_grad",
                 "seed", "mask_ratio", "mask_type", "drop_path", "model_ema_decay")


class Preempted(SystemExit):
    """Raised by :meth:`Trainer.fit` after a stop signal, once ``checkpoint-last.pth`` is written: uncaught, the
    process exits with status :data:`EXIT_REQUEUE` (75) and no traceback.  ``signals``: the names of the stop
    signals any rank received (the same on every rank), e.g. ``("SIGUSR2",)``."""

    def __init__(self, message: str, signals: Sequence[str] = ()) -> None:
        super().__init__(EXIT_REQUEUE)
        self.message = message
        self.signals = tuple(signals)


class StopSignals:
    """Turns SIGTERM / SIGUSR1 / SIGINT into a request to stop at the next optimizer-step boundary (installed
    by :meth:`Trainer.fit` in the main thread, restored after).  Later signals are ignored while stopping and
    always during a save; a second SIGINT outside a save raises KeyboardInterrupt (the user insists)."""

    def __init__(self) -> None:
        self.signum = 0  # the first one
        self.received: set[int] = set()
        self.saving = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only: nothing to install from elsewhere
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._old.items():
            if h is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(s, h)
        self._old.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received.add(signum)
        if not self.signum:
            self.signum = signum
        elif signum == getattr(signal, "SIGINT", None) and not self.saving:
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another rank"

    @contextlib.contextmanager
    def deferred(self):
        """A block (a checkpoint write) that no signal interrupts."""
        saving, self.saving = self.saving, True
        try:
            yield
        finally:
            self.saving = saving

@dataclass
class EngineConfig:
    output_dir: str
    epochs: int
    batch_size: int
    accum_iter: int = 1
    num_workers: int = 4
    pin_mem: bool = True
    seed: int = 0
    amp: str = "auto"  # auto | bf16 | fp16 | none
    attn: str = "auto"  # auto | fused | explicit (see resolve_attention)
    clip_grad: float | None = None
    log_every: int = 20
    save_every_steps: int = 0  # also save checkpoint-last every N optimizer steps (0: epoch ends only)
    keep_every: int = 20  # keep checkpoint-<epoch>.pth every N epochs (and the last)
    eval_every: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs); for smoke runs
    resume: str = ""  # "", "auto" (output_dir/checkpoint-last.pth) or a path
    overwrite: bool = False  # a fresh run may use a folder holding checkpoints (they are set aside)
    resume_override: str = ""  # "KEY,KEY" or "all": schedule flags a resume takes from the command line
    progress: bool = True
    compile: bool = False
    find_unused_parameters: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state per block over the ranks (FSDP2)
    best_key: str | None = None  # eval metric whose maximum is kept as checkpoint-best.pth
    extra: dict[str, Any] = field(default_factory=dict)


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)?  Elsewhere bf16 autocast is emulated and
    slower than fp32, so ``--amp auto`` stays fp32 there."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except RuntimeError:  # a build without the probes
        return False


def resolve_amp(amp: str, device: torch.device, cpu_bf16: bool = True) -> str:
    """The precision a run uses.  ``auto``: bf16 on GPUs that support it, and on CPUs with native bf16
    (AVX512-BF16/AMX: 1.3-2.3x faster steps, measured in docs/benchmarks.md) unless ``cpu_bf16`` is False;
    fp32 (``none``) elsewhere.  The engine prints the choice and logs it (``amp`` in log.jsonl)."""
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "none"
        return "bf16" if cpu_bf16 and device.type == "cpu" and cpu_has_native_bf16() else "none"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (use bf16 or none on CPU)")
    if amp not in ("bf16", "fp16", "none"):
        raise UserError(f"unknown --amp {amp!r}: use auto, bf16, fp16 or none")
    return amp


def describe_amp(amp: str, resolved: str, device: torch.device) -> str:
    """One line saying which precision a run uses and why (``--amp auto`` differs between machines)."""
    name = {"bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler", "none": "fp32"}[resolved]
    if amp != "auto":
        return f"precision: {name} (--amp {amp})"
    if device.type == "cuda":
        why = "the GPU supports bf16" if resolved == "bf16" else "the GPU has no bf16"
    else:
        why = "this CPU has native bf16 (AVX512-BF16/AMX)" if resolved == "bf16" else "this CPU has no native bf16"
    return f"precision: {name} (--amp auto: {why})"


def resolve_attention(attn: str, device: torch.device, amp: str) -> str:
    """The attention kernel a run trains with.  ``auto``: the explicit softmax path under bf16 autocast on a CPU,
    SDPA's fused kernels elsewhere.  torch's fused CPU attention is slow in bf16, above all its backward (6x the
    explicit path's time on the demo's ViT-tiny/8): explicit steps are 1.45x faster there, 1.5x in MAE pretraining,
    ~1.1x on a ViT-B/16 at 224, and no slower in detection/segmentation (docs/benchmarks.md); in fp32 and on GPUs
    the fused kernels win.  Both compute the same function (equal up to rounding)."""
    if attn == "auto":
        return "explicit" if device.type == "cpu" and amp == "bf16" else "fused"
    if attn not in ("fused", "explicit"):
        raise UserError(f"unknown --attn {attn!r}: use auto, fused or explicit")
    return attn


def use_attention(model: nn.Module, attn: str, device: torch.device, amp: str) -> str:
    """Set ``model``'s attention modules to the kernel :func:`resolve_attention` picks; returns it.  Training and the
    ``--eval`` paths both call it, so a run's own evaluation and a later one of its checkpoint compute alike."""
    resolved = resolve_attention(attn, device, amp)
    set_fused_attention(model, resolved == "fused")
    return resolved


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainStep:
    """The one training step of the toolkit: forward under autocast, backward (scaled for fp16 and for
    gradient accumulation, without DDP's all-reduce on non-boundary micro-batches), then the optimizer
    update (unscale, clip, step, zero_grad).  :class:`Trainer` runs it in its loop; the benchmarks time
    the very same object (``step(batch)``), so what is measured is what trains.

    ``runner`` is what the forward calls (the DDP wrapper, a compiled module, or ``model`` itself);
    ``model`` is the bare module (its parameters are clipped).  No host sync happens here: the loss comes
    back as a device tensor and a non-finite loss only sets ``self.nonfinite`` on the device.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFn, device: torch.device,
                 amp: str = "none", accum_iter: int = 1, clip_grad: float | None = None,
                 runner: nn.Module | None = None, ddp: DistributedDataParallel | None = None,
                 fsdp: nn.Module | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.step_fn = step_fn
        self.device = device
        self.amp = amp
        self.accum_iter = accum_iter
        self.clip_grad = clip_grad
        self.runner = runner if runner is not None else model
        self.ddp = ddp
        self.fsdp = fsdp  # the FSDP2 root: gradient reduction is switched off on non-boundary micro-batches
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def backward(self, batch: Any, sync: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; ``sync=False`` skips DDP's gradient all-reduce (not an
        accumulation boundary).  Returns the (unscaled) loss and the step function's logs."""
        if self.fsdp is not None:
            self.fsdp.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if (sync or self.ddp is None) else self.ddp.no_sync():
            with autocast(self.device, self.amp):
                loss, logs = self.step_fn(self.runner, batch)
            self.nonfinite |= ~torch.isfinite(loss.detach())
            scaled = loss / self.accum_iter
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss, logs

    def update(self) -> None:
        """The optimizer step at an accumulation boundary."""
        opt = self.optimizer
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    def __call__(self, batch: Any) -> torch.Tensor:
        """One whole optimizer step on ``batch`` (``accum_iter`` micro-batches of the same batch): what the
        benchmarks time.  Returns the last loss, on the device."""
        for _ in range(self.accum_iter - 1):
            self.backward(batch, sync=False)
        loss, _ = self.backward(batch, sync=True)
        self.update()
        return loss


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


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


class Trainer:
    """Runs ``cfg.epochs`` epochs of ``step_fn`` over ``dataset`` with ``optimizer`` and ``schedule``.

    Hooks: ``evaluate(model, epoch) -> dict`` every ``eval_every`` epochs, ``on_epoch_end(model,
    epoch)`` (figures), ``after_step(model, step)`` (EMA…); ``extra_state`` modules (EMA weights…)
    are checkpointed too.  ``model`` here is the bare module; the trainer wraps it in DDP.
    ``schedule(t)`` gives the lr at fractional epoch ``t``, or at optimizer step ``t`` (0-based) when it has a true
    ``per_step`` attribute (``maecore.optim.WarmupStep`` / ``WarmupPoly``).
    ``model_keys``: the ``args`` keys that define the network (a resume must match them);
    ``schedule_keys``: those a resume keeps unless ``--resume_override`` names them.
    ``device_batch(batch) -> batch`` runs on every batch once it is on the device (``maecore.data.UInt8Normalize``:
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
    ) -> None:
        self.cfg = cfg
        self.device_batch = device_batch  # finishes a batch on the device (e.g. uint8 -> normalised: maecore.data)
        self.device = device
        self.model = model.to(device)
        self.optimizer = optimizer
        self.step_fn = step_fn
        self.schedule = schedule
        self.args = dict(args or {})
        self.evaluate = evaluate
        self.on_epoch_end = on_epoch_end
        self.after_step = after_step
        self.extra_state = extra_state or {}
        self.model_keys = tuple(model_keys)
        self.schedule_keys = tuple(k for k in schedule_keys if k not in self.model_keys)
        self.out = Path(cfg.output_dir)
        self.amp = resolve_amp(cfg.amp, device)
        self.attn = use_attention(self.model, cfg.attn, device, self.amp)
        self.logger = RunLogger(self.out, du.is_main())
        self.lock = FolderLock(self.out)

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
            if self.extra_state or after_step is not None:
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
        self.stop_vote = du.AnyRank(len(STOP_SIGNALS))  # one flag per signal: every rank learns which were sent

        self.epoch = 0
        self.iter_in_epoch = 0
        self.step = 0
        self.best = -math.inf
        self.last_good: Path | None = None  # the newest checkpoint-last.pth known finite, and its step
        self.last_good_step = 0
        self._first_bad = torch.zeros((), dtype=torch.long, device=device)  # first step with a NaN/inf loss (0: none)
        self._verified_at = -1  # the step whose weights were last checked finite
        self._saved_at: tuple[int, int, int] | None = None  # (epoch, iter, step) of the last checkpoint-last

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
            "extra": {k: m.state_dict() for k, m in self.extra_state.items()},
            "args": self.args,
        }

    def save(self, *names: str) -> None:
        """Write checkpoint(s) on rank 0 (every rank takes part: RNG states are gathered, errors agreed) —
        only from finite weights and optimizer state."""
        self.check_finite(weights=self._verified_at != self.step)
        state = self.state_dict()
        err = None
        if du.is_main():
            with self.signals.deferred():
                for name in names:
                    try:
                        path = save_atomic(state, self.out / name)
                    except CheckpointWriteError as e:
                        err = f"cannot write checkpoint {e.path}: {e.reason}; {self._kept()}"
                        break
                    if name == LAST:
                        self.last_good, self.last_good_step = path, self.step
        err = du.broadcast_object(err)  # the barrier, too
        if err:
            raise UserError(err)
        if LAST in names:
            self._saved_at = (self.epoch, self.iter_in_epoch, self.step)

    def _kept(self) -> str:
        if self.last_good is not None and self.last_good.is_file():
            return f"kept {self.last_good} (step {self.last_good_step}), intact"
        return "no earlier checkpoint of this run to keep"

    def _resume_path(self) -> Path | None:
        if not self.cfg.resume:
            return None
        if self.cfg.resume == "auto":
            return self.last_path if self.last_path.exists() else None
        return Path(self.cfg.resume)

    def _check_resume(self, ckpt: Any, path: Path) -> dict[str, tuple[Any, Any]]:
        """Refuse (one line) a checkpoint this run cannot continue; return the overridden schedule flags
        ``{key: (old, new)}``.  Reads only: nothing is written or moved."""
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "model" not in ckpt:
            raise UserError(f"{path}: not a training checkpoint of this toolkit (no model/optimizer state)")
        saved = checkpoint_args(ckpt) or {}

        def differ(keys: Sequence[str]) -> list[tuple[str, Any, Any]]:
            return [(k, saved[k], self.args[k]) for k in keys
                    if k in saved and k in self.args and _jsonable(saved[k]) != _jsonable(self.args[k])]

        def show(d: list[tuple[str, Any, Any]]) -> str:
            return ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, old, new in d)

        if d := differ(self.model_keys):
            raise UserError(f"cannot resume from {path}: it was trained with other model flags ({show(d)}); the network "
                            "cannot change on resume: resume with its flags, or start afresh in another --output_dir (or with --overwrite)")
        wanted = {k.strip() for k in self.cfg.resume_override.split(",") if k.strip()}
        if bad := sorted(wanted & set(self.model_keys)):
            raise UserError(f"--resume_override {','.join(bad)}: model flags cannot change on resume")
        if unknown := sorted(wanted - set(self.args) - {"all"}):
            raise UserError(f"--resume_override: no flag named {', '.join(unknown)}")
        d = differ(self.schedule_keys)
        if refused := [x for x in d if "all" not in wanted and x[0] not in wanted]:
            keys = ",".join(k for k, _, _ in refused)
            raise UserError(f"cannot resume from {path}: flags changed since its run ({show(refused)}); pass "
                            f"--resume_override {keys} (or all) to take the new values, or resume with the old ones")
        sd, ck = self.model.state_dict(), ckpt["model"]
        missing = [k for k in sd if k not in ck]
        unexpected = [k for k in ck if k not in sd]
        shapes = [k for k in sd if k in ck and tuple(getattr(ck[k], "shape", ())) != tuple(sd[k].shape)]
        if missing or unexpected or shapes:
            raise UserError(f"{path}: model does not match the checkpoint (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}, other shape {shapes[:3]})")
        groups = ckpt["optimizer"].get("param_groups", []) if isinstance(ckpt["optimizer"], dict) else []
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            hint = ("; a checkpoint from before --wd_rule (issue #24) resumes with --wd_rule uniform"
                    if "wd_rule" in self.args and "wd_rule" not in saved else "")
            raise UserError(f"{path}: its optimizer state has other parameter groups than this run's optimizer{hint}")
        if what := checkpoint_nonfinite(ckpt):
            raise UserError(f"cannot resume from {path}: it holds NaN/inf in {what}; resume from an earlier checkpoint")
        return {k: (old, new) for k, old, new in d}

    def _claim(self) -> tuple[dict[str, Any] | None, Path | None, dict[str, tuple[Any, Any]]]:
        """Checks first (reading only), then the folder is this run's: lock, old checkpoints set aside
        (``--overwrite``), ``args.json``, logs.  Returns the checkpoint to resume from (or None), its path and
        the overridden flags.  All ranks agree on a refusal."""
        cfg = self.cfg
        ckpt, path, overrides = None, None, {}
        err = None
        try:
            if cfg.overwrite and cfg.resume == "auto":
                raise UserError("--overwrite starts afresh, --resume auto continues: give one of them")
            if du.is_main() and (owner := self.lock.holder()):
                raise self.lock.busy_error(owner)
            path = self._resume_path()
            if path is not None:
                ckpt = load_file(path, map_location="cpu")
                overrides = self._check_resume(ckpt, path)
            elif cfg.resume_override and not cfg.resume:
                raise UserError("--resume_override needs --resume")
            if du.is_main():
                self._check_fresh(path)
                self.lock.acquire()  # the first write into the folder
                self._check_fresh(path)  # again under the lock: a run that just ended may have saved
        except UserError as e:
            err = str(e)
        errs = [e for e in du.all_gather_object(err) if e]
        if errs:
            self.lock.release()
            raise UserError(errs[0])
        if du.is_main():
            if path is None:
                if cfg.overwrite and (moved := set_aside(self.out, [p.name for p in folder_checkpoints(self.out)] + ["args.json"])):
                    print(f"{self.out}: the earlier run's checkpoints and args.json moved to {moved.name}/ (--overwrite)")
                if (old := self.logger.set_aside()) is not None:
                    print(f"{self.logger.path} was from an earlier run: moved to {old.name}")
            (self.out / "args.json").write_text(json.dumps(self.args, indent=1, default=str))
            self.logger.open()
        du.barrier()
        return ckpt, path, overrides

    def _check_fresh(self, resume_path: Path | None) -> None:
        if resume_path is not None or self.cfg.overwrite:
            return
        if old := folder_checkpoints(self.out):
            raise UserError(f"{self.out} holds {', '.join(p.name for p in old[:3])}{' …' if len(old) > 3 else ''} from an "
                            "earlier run: --resume auto continues it, --overwrite starts afresh (the old files are set "
                            "aside, not deleted)")

    def _load(self, ckpt: dict[str, Any], path: Path, overrides: dict[str, tuple[Any, Any]]) -> None:
        """Continue from ``ckpt`` (checked by :meth:`_check_resume`)."""
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
        for k, m in self.extra_state.items():
            if k in ckpt.get("extra", {}):
                m.load_state_dict(ckpt["extra"][k])
        self.epoch, self.iter_in_epoch, self.step = ckpt["epoch"], ckpt["iter_in_epoch"], ckpt["step"]
        self.best = ckpt.get("best", -math.inf)
        rngs = ckpt.get("rng") or []
        if rngs:
            set_rng_state(rngs[du.rank()] if du.rank() < len(rngs) else rngs[0])
        self.last_good, self.last_good_step = path, self.step
        self._verified_at = self.step
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
                taken = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in overrides.items())
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
        for m in self.fsdp_modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in self.fsdp_modules:
                m.reshard()
                m.set_reshard_after_forward(m is not self.model, recurse=False)

    # ---- non-finite guard ---------------------------------------------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        ts = float_tensors(list(self.model.state_dict().values()))
        ts += float_tensors([st for st in self.optimizer.state.values()])
        ts += float_tensors([m.state_dict() for m in self.extra_state.values()])
        return [t for t in map(_local, ts) if t.numel()]  # under --fsdp each rank checks its shards

    def check_finite(self, weights: bool = False) -> None:
        """One host sync: did any rank see a non-finite loss since the last check (and, with ``weights``,
        does any weight or optimizer state hold NaN/inf now)?  Stops the run with one line if so."""
        flags = [self.train_step.nonfinite.float()]
        if weights:
            flags.append(nonfinite(self._state_tensors()).float().to(self.device))
        vals = du.all_reduce_sum(torch.stack(flags)).tolist()
        bad_loss, bad_weights = vals[0] > 0, len(vals) > 1 and vals[1] > 0
        if not (bad_loss or bad_weights):
            if weights:
                self._verified_at = self.step
            return
        if bad_loss:
            firsts = [s for s in du.all_gather_object(int(self._first_bad)) if s > 0]
            what = f"loss is not finite (NaN/inf) at step {min(firsts) if firsts else self.step} (epoch {self.epoch})"
        else:
            names = nonfinite_names({k: _local(v) for k, v in self.model.state_dict().items()})
            what = (f"weights are not finite (NaN/inf) after step {self.step} (epoch {self.epoch}): "
                    + (f"{len(names)} of {len(self.model.state_dict())} model tensors (first {names[0]!r})" if names
                       else "in the optimizer (or EMA) state"))
        msg = None
        if du.is_main():
            msg = f"{what}; stopped, {self._last_finite()}"
        raise NonFiniteError(du.broadcast_object(msg))

    def _last_finite(self) -> str:
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

    # ---- stopping on a signal -----------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """Every rank calls this at the same points: do all agree that some rank got a stop signal?"""
        return self.stop_vote.poll([s in self.signals.received for s in STOP_SIGNALS])

    def _stop(self) -> None:
        """Checkpoint where the run stands (a step boundary), say so in one line, exit with EXIT_REQUEUE."""
        self.signals.saving = True  # from here to the exit no signal interrupts (a second Ctrl-C included)
        self.stop_vote.close()  # every rank is here: finish the vote in flight
        if self._saved_at != (self.epoch, self.iter_in_epoch, self.step):
            self.save(LAST)
        agreed = [signal.Signals(s).name for s, on in zip(STOP_SIGNALS, self.stop_vote.agreed) if on]
        name = self.signals.name if self.signals.signum else (f"{'/'.join(agreed)} on another rank" if agreed else self.signals.name)
        msg = (f"stopped by {name} after step {self.step} (epoch {self.epoch}, batch {self.iter_in_epoch}): "
               f"wrote {self.last_path}; exit status {EXIT_REQUEUE}: continue with --resume auto")
        if du.is_main():
            self.logger.log("stop", self.step, signal=name, signals=agreed, epoch=self.epoch, iter_in_epoch=self.iter_in_epoch)
            print(msg, file=sys.stderr, flush=True)
        raise Preempted(msg, agreed)

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        ckpt, path, overrides = self._claim()
        last_eval: dict[str, Any] = {}
        t_start = time.time()
        finished = False
        try:
            if ckpt is not None:
                assert path is not None
                self._load(ckpt, path, overrides)
                del ckpt
            self.signals.install()
            if du.is_main():
                print(describe_amp(cfg.amp, self.amp, self.device) + f"; attention: {self.attn} (--attn {cfg.attn})")
            self.logger.log("run", self.step, amp=self.amp, amp_flag=cfg.amp, attn=self.attn, device=str(self.device),
                            world_size=du.world_size(), threads=torch.get_num_threads())
            while self.epoch < cfg.epochs and not self._done():
                if self._stop_requested():
                    self._stop()
                epoch = self.epoch
                self.train_one_epoch()
                last_eval = self._epoch_end(epoch, complete=self.epoch > epoch)
            finished = True
        finally:
            shutdown_workers(self.loader)  # persistent workers would otherwise outlive the run (--max_steps, a stop)
            self.signals.restore()
            if finished:
                self.stop_vote.close()
            self.logger.close()
            self.lock.release()
        summary = {"steps": self.step, "epochs": self.epoch, "time_s": time.time() - t_start, **last_eval}
        return summary

    def _done(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _epoch_end(self, epoch: int, complete: bool) -> dict[str, Any]:
        """Evaluate, checkpoint, draw.  An epoch cut short by --max_steps was checkpointed already."""
        cfg = self.cfg
        results: dict[str, Any] = {}
        final = self.epoch >= cfg.epochs or self._done()
        self.check_finite(weights=True)  # before evaluating NaN weights or drawing them
        if self.evaluate is not None and ((epoch + 1) % cfg.eval_every == 0 or final):
            self.model.eval()
            with torch.no_grad(), self.whole_weights():
                results = self.evaluate(self.model, epoch)
            self.logger.log("eval", self.step, epoch=epoch, **results)
        names = [LAST] if complete else []
        if cfg.keep_every and ((epoch + 1) % cfg.keep_every == 0 or final):
            names.append(f"checkpoint-{epoch}.pth")
        if cfg.best_key and cfg.best_key in results and results[cfg.best_key] > self.best:
            self.best = results[cfg.best_key]
            names.append("checkpoint-best.pth")
        if names:
            self.save(*names)
        if self.on_epoch_end is not None:
            with self.whole_weights():  # rank 0 alone draws: no collective may run in its forward passes
                if du.is_main():
                    self.on_epoch_end(self.model, epoch)
        return results

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
        cfg = self.cfg
        model, opt = self.runner, self.optimizer
        model.train()
        self.sampler.set_epoch(self.epoch, start=self.iter_in_epoch * cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        n_acc = 0
        t0 = time.time()
        # a bar on a terminal; elsewhere (logs, --no_progress, the demo) a status line every STATUS_EVERY_S
        use_bar = cfg.progress and du.is_main() and sys.stderr.isatty()
        bar = tqdm(
            total=self.iters_per_epoch,
            initial=self.iter_in_epoch,
            desc=f"epoch {self.epoch}",
            disable=not use_bar,
            dynamic_ncols=True,
            leave=False,
        )
        status = None if use_bar or not du.is_main() else _Status(self)
        for batch in self._batches():
            it = self.iter_in_epoch
            if it >= self.iters_per_epoch:
                break
            boundary = (it + 1) % cfg.accum_iter == 0
            if it % cfg.accum_iter == 0:
                # fractional epochs (the official MAE clock), or the optimizer step for schedules counted in
                # iterations (detectron2, mmseg): exact whatever the epoch length and the accumulation
                clock = self.step if getattr(self.schedule, "per_step", False) else self.epoch + it / self.iters_per_epoch
                lr = self.schedule(clock)
                set_lr(opt, lr)
            batch = to_device(batch, self.device)
            if self.device_batch is not None:
                batch = self.device_batch(batch)
            loss, logs = self.train_step.backward(batch, sync=boundary)
            for k, v in {"loss": loss, **logs}.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
            n_acc += 1
            self.iter_in_epoch += 1
            bar.update(1)
            if not boundary:
                continue
            self.train_step.update()
            self.step += 1
            # the first step with a non-finite loss, kept on the device (no sync): the stop line names it
            self._first_bad = torch.where((self._first_bad == 0) & self.train_step.nonfinite, self.step, self._first_bad)
            if self.after_step is not None:
                self.after_step(self.model, self.step)
            if self.step % cfg.log_every == 0 or self._done():
                self.check_finite()
                vals = {k: self._mean(v, k, n_acc) for k, v in sums.items()}
                dt = time.time() - t0
                vals.update(lr=lr, epoch=self.epoch + it / self.iters_per_epoch,
                            img_per_s=n_acc * cfg.batch_size * du.world_size() / max(dt, 1e-9))
                self.logger.log("train", self.step, **vals)
                self.last_train_log = vals
                bar.set_postfix(loss=f"{vals['loss']:.4f}", lr=f"{lr:.2e}")
                sums, n_acc, t0 = {}, 0, time.time()
            if status is not None:
                status.tick()
            if self._done():
                break
            if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                self.save(LAST)
            if self._stop_requested():
                bar.close()
                self._stop()
        bar.close()
        if self.iter_in_epoch >= self.iters_per_epoch:
            self.epoch += 1
            self.iter_in_epoch = 0
        elif self._done():
            self.save(LAST)

    @staticmethod
    def _mean(v: torch.Tensor, key: str, n: int) -> float:
        """Counts (keys starting with ``n_``) are summed over steps and ranks, the rest averaged."""
        if key.startswith("n_"):
            return float(du.all_reduce_sum(v).item())
        return float(du.all_reduce_mean(v / n).item())


# ---- FSDP2 (--fsdp) -----------------------------------------------------------------------------------
def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """What ``--fsdp`` shards one unit at a time: every transformer block (the encoder's and the MAE decoder's);
    the rest (embeddings, norms, heads) goes with the root."""
    from maecore.vit import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def shard_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Module]:
    """Shard ``model`` in place with FSDP2 (``fully_shard`` per block, then the root) over the default process
    group; returns the FSDP modules.  Rank 0's initial weights are broadcast first (what DDP does at
    construction: ranks seed differently), and the optimizer, built on the unsharded parameters, is pointed at
    the sharded ones (same groups, same order: its checkpoints keep the layout of a DDP run's)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if any(optimizer.state.values()):
        raise RuntimeError("shard_model needs an optimizer that has not stepped yet")
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, 0)
    # the MAE returns views (pred = x[:, 1:]); FSDP2 warns that an in-place op on one would skip its hook: no step
    # function of the toolkit modifies a model output in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    units = fsdp_units(model)
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    now = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [now[names[id(p)]] for p in group["params"]]
    return [*units, model]


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) parameter or state; a plain tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP-sharded model, official key names, on rank 0's CPU (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (a collective: all ranks call it,
    in the same order), on rank 0's CPU; empty on the other ranks.  Integer parameter ids as usual."""
    sd = optimizer.state_dict()
    main = du.is_main()
    state: dict[int, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        whole = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in st.items()}
        if main:
            state[i] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in whole.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if main else {}


def _shard_like(full: Any, like: Any) -> Any:
    """``full`` (a whole tensor every rank holds) cut like the sharded ``like`` (no communication)."""
    if not (_is_dtensor(like) and torch.is_tensor(full) and full.dim() and tuple(full.shape) == tuple(like.shape)):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
    """Load a whole (checkpoint) model and optimizer state into an FSDP-sharded model and its optimizer; every rank
    holds the checkpoint and keeps its own shards."""
    mine = model.state_dict()
    model.load_state_dict({k: _shard_like(v, mine[k]) if k in mine else v for k, v in model_state.items()})
    by_id = {pid: p for saved, group in zip(optim_state["param_groups"], optimizer.param_groups)
             for pid, p in zip(saved["params"], group["params"])}
    state = {i: {k: _shard_like(v, by_id[i]) for k, v in st.items()} for i, st in optim_state["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": optim_state["param_groups"]})


STATUS_EVERY_S = 10.0


class _Status:
    """Where a run stands, one line every :data:`STATUS_EVERY_S` seconds when no progress bar is drawn: step,
    epoch, the last logged loss (no extra host sync), lr, images/s since the last line, time left."""

    def __init__(self, trainer: Trainer) -> None:
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
        vals = getattr(t, "last_train_log", None) or {}
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


def _jsonable(v: Any) -> Any:
    """A saved arg and a command-line one compare as they read in args.json (tuples are lists)."""
    return json.loads(json.dumps(v, default=str))


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def config_from_args(args: Any, **overrides: Any) -> EngineConfig:
    """Build an EngineConfig from an argparse namespace with the engine's flag names."""
    names = {f for f in EngineConfig.__dataclass_fields__}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(overrides)
    return EngineConfig(**kw)


def add_engine_args(parser) -> None:
    """The engine's flags, named as in the official MAE scripts where those have one."""
    g = parser.add_argument_group("engine")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, logs, figures")
    g.add_argument("--epochs", type=positive_int, default=800)
    g.add_argument("--batch_size", type=positive_int, default=64, help="per-process batch size")
    g.add_argument("--accum_iter", type=positive_int, default=1, help="gradient accumulation steps")
    g.add_argument("--num_workers", type=non_negative_int, default=8)
    g.add_argument("--pin_mem", action="store_true", default=True, help="pin host memory (GPU)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="auto = bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    g.add_argument("--attn", default="auto", choices=["auto", "fused", "explicit"],
                   help="attention kernel: auto = the explicit softmax path under bf16 on CPUs (torch's fused CPU kernel "
                        "is slow there), SDPA's fused kernels elsewhere")
    g.add_argument("--clip_grad", type=non_negative_float, default=None)
    g.add_argument("--log_every", type=positive_int, default=20, help="log (and sync) every N optimizer steps")
    g.add_argument("--save_every_steps", type=non_negative_int, default=0, help="also checkpoint every N steps")
    g.add_argument("--keep_every", type=non_negative_int, default=20, help="keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--eval_every", type=positive_int, default=1)
    g.add_argument("--max_steps", type=non_negative_int, default=0, help="stop after N optimizer steps (smoke runs)")
    g.add_argument("--resume", default="", help="'auto' (output_dir/checkpoint-last.pth) or a checkpoint path")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a folder holding checkpoints: they are moved to previous-N/, not deleted")
    g.add_argument("--resume_override", default="", metavar="KEY[,KEY...]",
                   help="on resume, take these schedule flags (batch_size, lr, epochs…; 'all') from the command line "
                        "instead of refusing a change")
    g.add_argument("--no_progress", dest="progress", action="store_false")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dist_timeout", type=positive_float, default=du.DEFAULT_TIMEOUT_MIN, metavar="MIN",
                   help="under torchrun: minutes a collective waits for the other ranks before failing with a line "
                        "naming this rank (a dead or stuck rank never hangs the job forever)")


def dump_args(args: Any) -> dict[str, Any]:
    """Args as a plain dict of JSON-able values (what checkpoints store)."""
    d = vars(args) if not isinstance(args, dict) else args
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v)) for k, v in d.items()}


__all__ = [
    "EXIT_REQUEUE",
    "SCHEDULE_KEYS",
    "EngineConfig",
    "NonFiniteError",
    "NonFiniteLossError",
    "Preempted",
    "TrainStep",
    "Trainer",
    "add_engine_args",
    "config_from_args",
    "dump_args",
    "read_log",
]
