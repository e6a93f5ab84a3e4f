"""The one training engine every task uses.

Loop with gradient accumulation, per-iteration lr schedule with per-group ``lr_scale`` (layer decay),
mixed precision (bf16 autocast; fp16 + GradScaler on request), grad clipping, DDP or FSDP2 (``--fsdp``: sharded
per transformer block, checkpoints gathered whole in the DDP layout), checkpoints that resume mid-epoch to the
exact same numbers, progress bar, TensorBoard and JSON-lines logs.

A task supplies the model, the optimizer, the dataset and a ``step_fn(model, batch) -> (loss, logs)``.
Host syncs happen only every ``log_every`` steps and at checkpoints, never per iteration.

One file a job:

* :mod:`~maecore.engine.trainer` — the loop (:class:`Trainer`) and the checkpoint it writes and resumes from;
* :mod:`~maecore.engine.hooks` — everything else a run does, as hooks: logs, progress, evaluation, checkpoints,
  figures, the stop on a signal; a new capability is one :class:`HookBase` subclass (``Trainer(hooks=[…])``);
* :mod:`~maecore.engine.step` — :class:`TrainStep`, the one step the trainer runs and the benchmarks time;
* :mod:`~maecore.engine.storage` — what the loop measured since the last log line;
* :mod:`~maecore.engine.runfolder` — the output folder: lock, fresh/overwrite policy, resume checks, ``args.json``;
* :mod:`~maecore.engine.precision` — ``--amp`` and ``--attn``; :mod:`~maecore.engine.signals` — stop signals;
  :mod:`~maecore.engine.logs` — the run's records, handed to :mod:`~maecore.engine.loggers` (``--loggers``: ``log.jsonl``,
  TensorBoard, W&B; one file and one hook a logger); :mod:`~maecore.engine.fsdp` — ``--fsdp``;
  :mod:`~maecore.engine.config` — :class:`EngineConfig` (its flags are :func:`maecore.cli.add_engine_args`).

Nothing is lost, and a failure is one line (``error: …``, status 2), never a traceback:

* Finite checkpoints only.  Before a checkpoint is written its weights and optimizer state are checked (one
  fused inf-norm over all tensors); a NaN/inf loss (checked every ``log_every`` steps) or weight stops the
  run with one line naming the step and the last checkpoint that is finite (re-read to make sure).  Resuming
  from a non-finite checkpoint is refused.
* One run per output folder, never overwritten by mistake; a resume checked against the checkpoint's flags
  (:mod:`~maecore.engine.runfolder`).
* A failed save (disk full, quota…) is one line naming the file; the previous checkpoint stays intact.  A
  DataLoader worker's error is unwrapped to its own line.
* SIGTERM, SIGUSR1, SIGUSR2 and SIGINT (what SLURM / Kubernetes send before a kill, submitit's time-limit signal,
  and Ctrl-C) finish the current optimizer step, write ``checkpoint-last.pth`` atomically, print one line and exit with status
  :data:`EXIT_REQUEUE` = 75 (``EX_TEMPFAIL``: "try again"): a job script requeues on 75 and the run continues
  with ``--resume auto`` to the same numbers as an uninterrupted run.  Under DDP every rank stops at the
  same step, every rank learns which signals were received (:attr:`Preempted.signals`: a launcher requeues on
  its own signal only), and every rank ends with 75.  Further signals while stopping are ignored, to the process's
  exit (torchrun's SIGTERM to the other ranks once one has exited included); a second Ctrl-C while the current
  step finishes aborts at once (a save is atomic either way).
"""

from __future__ import annotations

from maecore.engine.config import SCHEDULE_KEYS, EngineConfig, dump_args
from maecore.engine.fsdp import fsdp_units, full_model_state, full_optimizer_state, load_sharded, shard_model
from maecore.engine.hooks import (
    Checkpointer,
    EpochEndCallback,
    Evaluation,
    HookBase,
    ModuleState,
    Progress,
    StepCallback,
    StopOnSignal,
    TrainLog,
)
from maecore.engine.loggers import LOGGERS, Logger
from maecore.engine.logs import RunLogger, read_log
from maecore.engine.precision import (
    autocast,
    cpu_has_native_bf16,
    describe_amp,
    resolve_amp,
    resolve_attention,
    use_attention,
)
from maecore.engine.runfolder import LAST, RunFolder
from maecore.engine.signals import EXIT_REQUEUE, STOP_SIGNALS, Preempted, StopSignals
from maecore.engine.step import StepFn, TrainStep, to_device
from maecore.engine.storage import MetricStorage
from maecore.engine.trainer import Trainer
from maecore.errors import NonFiniteError

NonFiniteLossError = NonFiniteError  # the older name

__all__ = [
    "EXIT_REQUEUE",
    "LAST",
    "LOGGERS",
    "SCHEDULE_KEYS",
    "STOP_SIGNALS",
    "Checkpointer",
    "EngineConfig",
    "EpochEndCallback",
    "Evaluation",
    "HookBase",
    "Logger",
    "MetricStorage",
    "ModuleState",
    "NonFiniteError",
    "NonFiniteLossError",
    "Preempted",
    "Progress",
    "RunFolder",
    "RunLogger",
    "StepCallback",
    "StepFn",
    "StopOnSignal",
    "StopSignals",
    "TrainLog",
    "TrainStep",
    "Trainer",
    "autocast",
    "cpu_has_native_bf16",
    "describe_amp",
    "dump_args",
    "fsdp_units",
    "full_model_state",
    "full_optimizer_state",
    "load_sharded",
    "read_log",
    "resolve_amp",
    "resolve_attention",
    "shard_model",
    "to_device",
    "use_attention",
]
