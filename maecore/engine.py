"""The one training engine every task uses.

Loop with gradient accumulation, per-iteration lr schedule with per-group ``lr_scale`` (layer decay),
mixed precision (bf16 autocast; fp16 + GradScaler on request), grad clipping, DDP, checkpoints that
resume mid-epoch to the exact same numbers, a non-finite-loss stop that leaves the last good
checkpoint alone, progress bar, TensorBoard and JSON-lines logs.

A task supplies the model, the optimizer, the dataset and a ``step_fn(model, batch) -> (loss, logs)``.
Host syncs happen only every ``log_every`` steps and at checkpoints, never per iteration.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from maecore import distributed as du
from maecore.checkpoint import load_file, rng_state, save_atomic, set_rng_state
from maecore.cli import non_negative_float, non_negative_int, positive_int
from maecore.data import ResumableSampler, SeededDataset
from maecore.errors import NonFiniteError, UserError
from maecore.optim import set_lr

NonFiniteLossError = NonFiniteError  # the older name

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
    clip_grad: float | None = None
    log_every: int = 20
    save_every_steps: int = 0  # also save checkpoint-last every N optimizer steps (0: epoch ends only)
    keep_every: int = 20  # keep checkpoint-<epoch>.pth every N epochs (and the last)
    eval_every: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs); for smoke runs
    resume: str = ""  # "", "auto" (output_dir/checkpoint-last.pth) or a path
    progress: bool = True
    compile: bool = False
    find_unused_parameters: bool = False
    best_key: str | None = None  # eval metric whose maximum is kept as checkpoint-best.pth
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' means bf16 where the GPU supports it, fp32 on CPU (CPU autocast is rarely faster)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (use bf16 or none on CPU)")
    if amp not in ("bf16", "fp16", "none"):
        raise UserError(f"unknown --amp {amp!r}: use auto, bf16, fp16 or none")
    return amp


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
                 runner: nn.Module | None = None, ddp: DistributedDataParallel | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.step_fn = step_fn
        self.device = device
        self.amp = amp
        self.accum_iter = accum_iter
        self.clip_grad = clip_grad
        self.runner = runner if runner is not None else model
        self.ddp = ddp
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def backward(self, batch: Any, sync: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; ``sync=False`` skips DDP's gradient all-reduce (not an
        accumulation boundary).  Returns the (unscaled) loss and the step function's logs."""
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
        self.path = output_dir / "log.jsonl"
        self.tb = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
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
    ) -> None:
        self.cfg = cfg
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
        self.out = Path(cfg.output_dir)
        self.amp = resolve_amp(cfg.amp, device)
        self.logger = RunLogger(self.out, du.is_main())

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
        )
        self.iters_per_epoch = self.sampler.num_samples // cfg.batch_size
        if self.iters_per_epoch < cfg.accum_iter:
            raise UserError(f"an epoch has {self.iters_per_epoch} batches, fewer than --accum_iter {cfg.accum_iter}")

        self.ddp = None
        if du.is_dist():
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        runner = self.ddp or self.model
        self.runner = torch.compile(runner) if cfg.compile else runner
        self.train_step = TrainStep(self.model, optimizer, step_fn, device, self.amp, cfg.accum_iter, cfg.clip_grad,
                                    runner=self.runner, ddp=self.ddp)
        self.scaler = self.train_step.scaler

        self.epoch = 0
        self.iter_in_epoch = 0
        self.step = 0
        self.best = -math.inf
        self.last_good: Path | None = None

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out / "checkpoint-last.pth"

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
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
        """Write checkpoint(s) on rank 0 (every rank takes part: RNG states are gathered)."""
        self.check_finite()
        state = self.state_dict()
        if du.is_main():
            for name in names:
                path = save_atomic(state, self.out / name)
                if name == "checkpoint-last.pth":
                    self.last_good = path
        du.barrier()

    def resume(self) -> bool:
        path = self.last_path if self.cfg.resume == "auto" else Path(self.cfg.resume)
        if self.cfg.resume == "auto" and not path.exists():
            return False
        ckpt = load_file(path, map_location="cpu")
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "model" not in ckpt:
            raise UserError(f"{path}: not a training checkpoint of this toolkit (no model/optimizer state)")
        missing, unexpected = self.model.load_state_dict(ckpt["model"], strict=False)
        if missing or unexpected:
            raise UserError(f"{path}: model does not match the checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.optimizer.load_state_dict(ckpt["optimizer"])
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
        self.last_good = path
        if du.is_main():
            print(f"resumed from {path}: epoch {self.epoch}, batch {self.iter_in_epoch}, step {self.step}")
        return True

    # ---- non-finite guard ---------------------------------------------------------------------
    def check_finite(self) -> None:
        """One host sync: did any rank see a non-finite loss since the last check?"""
        flag = du.all_reduce_sum(self.train_step.nonfinite.float())
        if flag.item() > 0:
            where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
            raise NonFiniteError(
                f"loss is not finite (NaN/inf) by step {self.step} (epoch {self.epoch}); stopped, {where}"
            )

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.resume() if cfg.resume else False
        if not resumed and (old := self.logger.set_aside()) is not None:
            print(f"{self.logger.path} was from an earlier run: moved to {old.name}")
        last_eval: dict[str, Any] = {}
        t_start = time.time()
        try:
            while self.epoch < cfg.epochs and not self._done():
                epoch = self.epoch
                self.train_one_epoch()
                last_eval = self._epoch_end(epoch, complete=self.epoch > epoch)
        finally:
            self.logger.close()
        summary = {"steps": self.step, "epochs": self.epoch, "time_s": time.time() - t_start, **last_eval}
        return summary

    def _done(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _epoch_end(self, epoch: int, complete: bool) -> dict[str, Any]:
        """Evaluate, checkpoint, draw.  An epoch cut short by --max_steps was checkpointed already."""
        cfg = self.cfg
        results: dict[str, Any] = {}
        final = self.epoch >= cfg.epochs or self._done()
        if self.evaluate is not None and ((epoch + 1) % cfg.eval_every == 0 or final):
            self.model.eval()
            with torch.no_grad():
                results = self.evaluate(self.model, epoch)
            self.logger.log("eval", self.step, epoch=epoch, **results)
        names = ["checkpoint-last.pth"] if complete else []
        if cfg.keep_every and ((epoch + 1) % cfg.keep_every == 0 or final):
            names.append(f"checkpoint-{epoch}.pth")
        if cfg.best_key and cfg.best_key in results and results[cfg.best_key] > self.best:
            self.best = results[cfg.best_key]
            names.append("checkpoint-best.pth")
        if names:
            self.save(*names)
        if self.on_epoch_end is not None and du.is_main():
            self.on_epoch_end(self.model, epoch)
        return results

    def train_one_epoch(self) -> None:
        cfg = self.cfg
        model, opt = self.runner, self.optimizer
        model.train()
        self.sampler.set_epoch(self.epoch, start=self.iter_in_epoch * cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        n_acc = 0
        t0 = time.time()
        bar = tqdm(
            total=self.iters_per_epoch,
            initial=self.iter_in_epoch,
            desc=f"epoch {self.epoch}",
            disable=not (cfg.progress and du.is_main()),
            dynamic_ncols=True,
            leave=False,
        )
        for batch in self.loader:
            it = self.iter_in_epoch
            if it >= self.iters_per_epoch:
                break
            boundary = (it + 1) % cfg.accum_iter == 0
            if it % cfg.accum_iter == 0:
                lr = self.schedule(self.epoch + it / self.iters_per_epoch)
                set_lr(opt, lr)
            batch = to_device(batch, self.device)
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
            if self.after_step is not None:
                self.after_step(self.model, self.step)
            if self.step % cfg.log_every == 0 or self._done():
                self.check_finite()
                vals = {k: self._mean(v, k, n_acc) for k, v in sums.items()}
                dt = time.time() - t0
                vals.update(lr=lr, epoch=self.epoch + it / self.iters_per_epoch,
                            img_per_s=n_acc * cfg.batch_size * du.world_size() / max(dt, 1e-9))
                self.logger.log("train", self.step, **vals)
                bar.set_postfix(loss=f"{vals['loss']:.4f}", lr=f"{lr:.2e}")
                sums, n_acc, t0 = {}, 0, time.time()
            if self._done():
                break
            if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                self.save("checkpoint-last.pth")
        bar.close()
        if self.iter_in_epoch >= self.iters_per_epoch:
            self.epoch += 1
            self.iter_in_epoch = 0
        elif self._done():
            self.save("checkpoint-last.pth")

    @staticmethod
    def _mean(v: torch.Tensor, key: str, n: int) -> float:
        """Counts (keys starting with ``n_``) are summed over steps and ranks, the rest averaged."""
        if key.startswith("n_"):
            return float(du.all_reduce_sum(v).item())
        return float(du.all_reduce_mean(v / n).item())


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
                   help="auto = bf16 on GPUs that support it, fp32 on CPU")
    g.add_argument("--clip_grad", type=non_negative_float, default=None)
    g.add_argument("--log_every", type=positive_int, default=20, help="log (and sync) every N optimizer steps")
    g.add_argument("--save_every_steps", type=non_negative_int, default=0, help="also checkpoint every N steps")
    g.add_argument("--keep_every", type=non_negative_int, default=20, help="keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--eval_every", type=positive_int, default=1)
    g.add_argument("--max_steps", type=non_negative_int, default=0, help="stop after N optimizer steps (smoke runs)")
    g.add_argument("--resume", default="", help="'auto' (output_dir/checkpoint-last.pth) or a checkpoint path")
    g.add_argument("--no_progress", dest="progress", action="store_false")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def dump_args(args: Any) -> dict[str, Any]:
    """Args as a plain dict of JSON-able values (what checkpoints store)."""
    d = vars(args) if not isinstance(args, dict) else args
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v)) for k, v in d.items()}


__all__ = [
    "EngineConfig",
    "NonFiniteError",
    "NonFiniteLossError",
    "TrainStep",
    "Trainer",
    "add_engine_args",
    "config_from_args",
    "dump_args",
    "read_log",
]
