"""torchrun / torch.distributed helpers: gloo on CPU, nccl on GPU, single process otherwise.

Every collective has a timeout (``--dist_timeout``, minutes): a rank that died or hangs never leaves the
others waiting forever.  A collective that fails (a peer's connection lost, a timeout) is turned by
:func:`launch` into one line that names this process: ``rank 0 of 16 (host node3): …``.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from maecore.errors import UserError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """The processes of this job: the started process group's size, else what torchrun announces (``RANK`` and
    ``WORLD_SIZE``, from which :func:`init_distributed` starts the group), else 1.  A task's config is built before
    the group starts, and its derived values (the lr of the effective batch) count every process."""
    if is_dist():
        return world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return 1


DEFAULT_TIMEOUT_MIN = 30.0
_timeout = datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN)  # the process group's; AnyRank's group uses it too


class RankFailure(UserError):
    """A collective failed on this rank (another process died, hangs, or the network broke): one line
    that says which rank this is, on which host, and what happened."""


def init_distributed(device: str = "auto", timeout_min: float | None = None) -> torch.device:
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set); pick the device.

    ``device`` is "auto", "cpu" or "cuda".  Multi-node works the same way (torchrun sets
    MASTER_ADDR/PORT); the backend follows the device.  ``timeout_min`` (default
    :data:`DEFAULT_TIMEOUT_MIN`) bounds every collective, the start-up rendezvous included: past it a
    waiting rank fails (see :func:`launch`) instead of hanging on a dead or stuck peer.
    """
    global _timeout
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda and local_rank >= torch.cuda.device_count() == 1:
        local_rank = 0  # a launcher that binds one GPU to each task (SLURM --gpu-bind) shows each process one device
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_dist():
        if timeout_min is not None:
            if not timeout_min > 0:
                raise UserError(f"--dist_timeout must be > 0 minutes, got {timeout_min:g}")
            _timeout = datetime.timedelta(minutes=timeout_min)
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=_timeout, **_restart_store())
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")


def _restart_store() -> dict[str, Any]:
    """Under ``torchrun --max-restarts`` on one node: the agent's store with this restart's own key prefix.

    torchrun's c10d rendezvous shares one TCPStore across restarts without separating them (pytorch#135712):
    a restarted rank can read the address a dead rank published in the previous attempt and fail to connect
    (gloo "connectFullMesh ... Connection refused", nccl likewise).  The restart count is the same for every
    worker of one agent, so on one node it keys each attempt apart; across nodes the agents count restarts
    independently, and ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (set for torchrun) is the remedy."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)
    world = int(os.environ["WORLD_SIZE"])
    one_node = int(os.environ.get("LOCAL_WORLD_SIZE", -1)) == world
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared and not one_node and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0) or 0) and os.environ.get("RANK") == "0":
        print("note: torchrun --max-restarts over several nodes: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun, "
              "or a restart may fail to connect (pytorch#135712)", flush=True)
    if not (restart and one_node and shared):
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=_timeout)
    return {"store": dist.PrefixStore(f"maecore/restart_{restart}", store), "rank": int(os.environ["RANK"]), "world_size": world}


def timeout() -> datetime.timedelta:
    """The collectives' timeout of this process group."""
    return _timeout


def _span(td: datetime.timedelta) -> str:
    s = td.total_seconds()
    return f"{s:g} s" if s < 120 else f"{s / 60:g} min"


# what gloo / nccl / c10d say when a peer is gone or silent (gloo's are plain RuntimeErrors)
_DIST_MARKERS = ("gloo", "nccl", "c10d", "connection reset", "connection closed", "closed by peer", "broken pipe",
                 "connection refused")


def comm_failure(e: BaseException) -> str | None:
    """One line for a failed collective (naming this rank), or None if ``e`` is not one."""
    text = str(e).strip()
    low = text.lower()
    if not (isinstance(e, getattr(dist, "DistError", ())) or (isinstance(e, RuntimeError) and any(m in low for m in _DIST_MARKERS))):
        return None
    timed_out = "timed out" in low or "timeout" in low or isinstance(e, getattr(dist, "DistStoreError", ()))
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    first = first.split("] ", 1)[-1] if first.startswith("[") else first  # drop gloo's source location
    first = first.split(" This is typically", 1)[0]
    if len(first) > 160:
        first = first[:157] + "..."
    who = f"rank {rank()} of {world_size()} (host {socket.gethostname()})"
    if timed_out:
        what = (f"no answer from the other ranks within {_span(_timeout)} (--dist_timeout): one of them hangs or died "
                "(see their logs)")
    else:
        what = "lost the connection to another rank (it died or was killed: see its log)"
    return f"{who}: {what} [{first}]"


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
    no device sync, no blocking collective per step.  Each :meth:`poll` starts a background all-reduce (max)
    of ``width`` integers over a CPU (gloo) group and returns the result of the one started by the previous
    call, long finished by then; every rank calls ``poll`` at the same points, so all see the same answer at
    the same call, one call after the first rank raised its flag.  :attr:`agreed` holds that answer flag by
    flag (which signals were received, anywhere).  In a single process the local flags are the answer."""

    def __init__(self, width: int = 1) -> None:
        self.group = dist.new_group(backend="gloo", timeout=_timeout) if is_dist() else None
        self.width = width
        self.buf = torch.zeros(width, dtype=torch.int32)
        self.work = None
        self.agreed = [False] * width

    def poll(self, local: bool | Sequence[bool]) -> bool:
        flags = [bool(local)] if isinstance(local, bool) else [bool(f) for f in local]
        if len(flags) != self.width:
            raise ValueError(f"AnyRank({self.width}).poll got {len(flags)} flags")
        if self.group is None:
            self.agreed = flags
            return any(flags)
        if self.work is not None:
            self.work.wait()
            self.agreed = [bool(v) for v in self.buf.tolist()]
        self.buf = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        self.work = dist.all_reduce(self.buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return any(self.agreed)

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
    """Start the process group (under torchrun), call ``run(args, device)``, always tear down.  A failed
    collective becomes a :class:`RankFailure` naming this rank (one ``error: …`` line from the CLIs)."""
    device = init_distributed(args.device, getattr(args, "dist_timeout", None))
    try:
        return run(args, device)
    except RuntimeError as e:
        if is_dist() and (msg := comm_failure(e)):
            raise RankFailure(msg) from e
        raise
    finally:
        cleanup()
