"""torchrun / torch.distributed helpers: gloo on CPU, nccl on GPU, single process otherwise."""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_distributed(device: str = "auto") -> torch.device:
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set); pick the device.

    ``device`` is "auto", "cpu" or "cuda".  Multi-node works the same way (torchrun sets
    MASTER_ADDR/PORT); the backend follows the device.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_dist():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
        t /= world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (also a barrier)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class AnyRank:
    """Agree, at the same call on every rank, whether any rank has raised a flag (a stop signal) — cheaply:
    no device sync, no blocking collective per step.  Each :meth:`poll` starts a background all-reduce of
    one integer over a CPU (gloo) group and returns the result of the one started by the previous call, long
    finished by then; every rank calls ``poll`` at the same points, so all see the same answer at the same
    call, one call after the first rank raised its flag.  In a single process the local flag is the answer."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if is_dist() else None
        self.buf = torch.zeros(1, dtype=torch.int32)
        self.work = None

    def poll(self, local: bool) -> bool:
        if self.group is None:
            return local
        agreed = False
        if self.work is not None:
            self.work.wait()
            agreed = bool(self.buf.item())
        self.buf = torch.tensor([int(local)], dtype=torch.int32)
        self.work = dist.all_reduce(self.buf, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """Finish the all-reduce in flight (every rank started it, so it completes)."""
        if self.work is not None:
            self.work.wait()
            self.work = None


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (callers add the rank, so ranks draw different masks/augs)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def launch(run: Callable[[Any, torch.device], Any], args: Any) -> Any:
    """Start the process group (under torchrun), call ``run(args, device)``, always tear down."""
    device = init_distributed(args.device)
    try:
        return run(args, device)
    finally:
        cleanup()
