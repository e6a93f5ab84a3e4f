"""What a run is told: :class:`EngineConfig` (built from the command line by :func:`maecore.cli.config_from_args`),
the schedule flags a resume keeps, and the args a checkpoint stores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# flags that change the optimisation or the data order, not the network: a resumed run keeps the checkpoint's
# values unless --resume_override names them (keys a task does not have are skipped)
SCHEDULE_KEYS = ("batch_size", "accum_iter", "lr", "blr", "min_lr", "epochs", "warmup_epochs", "warmup_iters",
                 "max_iters", "milestones", "poly_after_warmup", "weight_decay", "wd_rule", "layer_decay", "clip_grad",
                 "seed", "mask_ratio", "mask_type", "drop_path", "model_ema_decay")


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
    loggers: tuple[str, ...] = ("jsonl", "tensorboard")  # where the records go (maecore.engine.loggers.LOGGERS)
    extra: dict[str, Any] = field(default_factory=dict)


def dump_args(args: Any) -> dict[str, Any]:
    """Args as a plain dict of JSON-able values (what checkpoints store)."""
    d = vars(args) if not isinstance(args, dict) else args
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v)) for k, v in d.items()}
