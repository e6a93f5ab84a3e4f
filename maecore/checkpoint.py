"""Checkpoints are data: plain dicts of tensors and numbers, written atomically, read with
``weights_only=True``."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import socket
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maecore.errors import UserError


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, quota, permissions…); the file at ``path`` is unchanged."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"cannot write {path}: {reason} (an earlier file there is unchanged)")


class _WriteRecorder:
    """The file object handed to ``torch.save``: its C++ writer turns an OSError raised by ``write`` into an
    opaque ``inline_container.cc`` RuntimeError, so the real error (ENOSPC, EDQUOT…) is kept here."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save to a temp file beside ``path``, fsync, then rename: a crash never leaves half a file, and a
    failed write (disk full…) leaves the earlier file intact and raises :class:`CheckpointWriteError` (one line)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointWriteError(path, _reason(e)) from None
    rec = None
    try:
        with os.fdopen(fd, "wb") as f:
            rec = _WriteRecorder(f)
            torch.save(obj, rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if rec is not None and rec.error is not None:
            raise CheckpointWriteError(path, _reason(rec.error)) from None
        if isinstance(e, OSError):
            raise CheckpointWriteError(path, _reason(e)) from None
        raise
    return path


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint safely; any unreadable, truncated or code-carrying file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_st

        try:
            return load_st(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if (what := _not_a_checkpoint(path)) is not None:  # text or other bytes: not a refusal for safety
            raise UserError(f"{path}: not a readable checkpoint ({what})") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refused to load (not plain checkpoint data): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = _not_a_checkpoint(path) or f"truncated or damaged: {first}"
        raise UserError(f"{path}: not a readable checkpoint ({what})") from None


def _not_a_checkpoint(path: Path) -> str | None:
    """What a file that torch could not read is, when that is not a checkpoint at all (torch's own message for
    a text file is ``KeyError: 101``); None for a zip archive or a pickle (protocol 2+), which torch writes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return str(err)
    if not head:
        return "the file is empty"
    if zipfile.is_zipfile(path):
        return None
    if head.startswith(b"PK"):
        return "a truncated or damaged zip archive: an interrupted copy or save?"
    if head[:1] != b"\x80":
        return f"neither a torch zip archive, a pickle nor safetensors; it starts with {head!r}"
    return None


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ours/official ``{'model': …}``, mm*'s ``{'state_dict': …}``,
    or a bare state dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                return unwrap_state_dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    raise UserError("no state dict found in checkpoint (expected a 'model' or 'state_dict' entry of tensors)")


def checkpoint_args(obj: Any) -> dict[str, Any] | None:
    """The run's args a training checkpoint of this toolkit stores (``Trainer.state_dict()['args']``), or
    ``None`` for a file without them (a converted or officially released checkpoint, a bare state dict)."""
    args = obj.get("args") if isinstance(obj, dict) else None
    return args if isinstance(args, dict) else None


EVAL_NAME = "eval.json"  # what --eval writes, in every task


def checkpoint_step(obj: Any) -> int | None:
    """The optimizer step a training checkpoint of this toolkit was saved at, or ``None`` (a file from elsewhere)."""
    step = obj.get("step") if isinstance(obj, dict) and checkpoint_args(obj) is not None else None
    return step if type(step) is int else None


def write_eval(out_dir: str | os.PathLike, task: str, checkpoint: str | os.PathLike, step: int | None,
               metrics: dict[str, Any]) -> Path:
    """``--eval``'s result, the same file and layout in every task: ``OUT/eval.json``, one flat record as the
    ``eval`` records of a run's ``log.jsonl`` — ``type`` "eval", the ``task``, the evaluated ``checkpoint`` and the
    ``step`` it was saved at (``None`` for a checkpoint from elsewhere), then the metrics under the names the task's
    training log gives them — so one reader serves both.  Written atomically (a reader never sees half a file)."""
    path = Path(out_dir) / EVAL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"type": "eval", "task": task, "checkpoint": str(checkpoint), "step": step, **metrics}
    tmp = path.with_name(f".{EVAL_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# ---- finiteness: a checkpoint holds finite numbers only --------------------------------------------
def float_tensors(obj: Any) -> list[torch.Tensor]:
    """Every floating-point tensor inside nested dicts / lists / tuples (a state dict, an optimizer state)."""
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() or x.is_complex():
                out.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out


@torch.no_grad()
def nonfinite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor (no host sync): does any element of ``tensors`` hold NaN or inf?  One fused
    reduction (the inf-norm of all tensors, per device and dtype, with ``torch._foreach_norm`` underneath):
    the max of |x| is NaN/inf exactly when some element is, and unlike a sum it cannot overflow."""
    ts = [t.detach() for t in tensors]
    if not ts:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(torch.nn.utils.get_total_norm(ts, norm_type=float("inf")))


def nonfinite_names(state: dict[str, Any]) -> list[str]:
    """The keys of ``state`` (a flat dict of tensors) holding NaN/inf: the slow, per-tensor look for messages."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and bool(nonfinite([v]))]


def checkpoint_nonfinite(ckpt: dict[str, Any]) -> str | None:
    """What in a training checkpoint is not finite ("84 of 86 model tensors (…)"), or ``None`` if all is."""
    parts = [k for k in ("model", "optimizer", "extra", "scaler") if k in ckpt]
    if not bool(nonfinite(float_tensors([ckpt[k] for k in parts]))):
        return None
    bad: list[str] = []
    model = ckpt.get("model")
    if isinstance(model, dict) and (names := nonfinite_names(model)):
        bad.append(f"{len(names)} of {len(model)} model tensors (first {names[0]!r})")
    for k in parts[1:]:
        if bool(nonfinite(float_tensors(ckpt[k]))):
            bad.append(f"its {k} state")
    return ", ".join(bad) or "some tensors"


# ---- an output folder belongs to one run ------------------------------------------------------------
try:
    import fcntl
except ImportError:  # not on Windows: there the folder is not locked
    fcntl = None  # type: ignore[assignment]


class FolderLock:
    """The lock that makes an output folder one run's: a POSIX record lock (``fcntl.lockf``) on
    ``<folder>/run.lock``, a file that holds the owner's pid and host.  The OS drops the lock when the process
    ends, however it ends, so a crashed or killed run never leaves a lock that blocks the next one (the file
    stays: it is not the lock).  A record lock, unlike ``flock``, belongs to the process alone, not to the
    DataLoader workers it forks, which may outlive a killed run by seconds.  Record locks do not exclude each
    other within one process, so the folders locked here are also kept in :attr:`HELD`."""

    NAME = "run.lock"
    HELD: set[str] = set()  # folders this process has locked

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / self.NAME
        self.fd: int | None = None

    def _key(self) -> str:
        return os.path.realpath(self.path)

    def _owner(self) -> str:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
        except OSError:
            return "another process"
        return f"pid {pid} on {host}" if pid else "another process"

    def holder(self) -> str | None:
        """Who holds the lock now ("pid 12 on node3"), or ``None``: a probe that creates and writes nothing."""
        if fcntl is None or self.fd is not None or not self.path.is_file():
            return None
        if self._key() in self.HELD:
            return f"pid {os.getpid()} on {socket.gethostname()}"
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return self._owner()
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)  # (drops this process's record locks on the file: it holds none, see HELD)

    def busy_error(self, owner: str) -> UserError:
        return UserError(f"{self.path.parent} is in use by another run ({owner}, see {self.NAME}): "
                         "wait for it to end, or use another output folder")

    def acquire(self) -> None:
        """Take the lock or raise :class:`UserError` naming the run that holds it."""
        if fcntl is None or self.fd is not None:
            return
        if self._key() in self.HELD:
            raise self.busy_error(f"pid {os.getpid()} on {socket.gethostname()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create {self.path}: {_reason(e)}") from None
        for attempt in range(5):  # another run's probe (holder()) holds a shared lock for an instant
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt == 4:
                    os.close(fd)
                    raise self.busy_error(self._owner()) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd
        self.HELD.add(self._key())

    def release(self) -> None:
        if self.fd is not None:
            self.HELD.discard(self._key())
            with contextlib.suppress(OSError):
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def folder_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints a training run leaves in its output folder (``checkpoint*.pth``)."""
    folder = Path(folder)
    return sorted(folder.glob("checkpoint*.pth")) if folder.is_dir() else []


# what save_atomic leaves of a checkpoint (checkpoint*.pth) when killed mid-write: tempfile.mkstemp's name, prefix
# ".<name>." and suffix ".tmp" around 8 of [a-z0-9_]
_CHECKPOINT_TEMP = re.compile(r"\.checkpoint[^/]*\.pth\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Delete the temporary checkpoints that saves killed mid-write (SIGKILL, a power cut) left in a run's output
    folder — each up to a whole checkpoint that nothing will read — and return their ``(name, bytes)``.  Only for
    the run that holds the folder's :class:`FolderLock`: no run that writes them can be alive then.  Only
    ``folder``'s own ``.checkpoint*.pth.XXXXXXXX.tmp`` files; any other file stays."""
    folder = Path(folder)
    removed: list[tuple[str, int]] = []
    for p in sorted(folder.glob(".checkpoint*.pth.*.tmp")) if folder.is_dir() else []:
        if not _CHECKPOINT_TEMP.fullmatch(p.name) or p.is_symlink() or not p.is_file():
            continue
        with contextlib.suppress(OSError):
            size = p.stat().st_size
            p.unlink()
            removed.append((p.name, size))
    return removed


def set_aside(folder: str | os.PathLike, names: Sequence[str]) -> Path | None:
    """Move ``names`` (files in ``folder`` that exist) into a new ``folder/previous-N/``: nothing is deleted.
    Returns that sub-folder, or ``None`` when there was nothing to move."""
    folder = Path(folder)
    files = [folder / n for n in names if (folder / n).exists()]
    if not files:
        return None
    n = 1
    while (dst := folder / f"previous-{n}").exists():
        n += 1
    dst.mkdir()
    for f in files:
        os.replace(f, dst / f.name)
    return dst


# ---- RNG state, so a resumed run continues the same random stream -------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
