"""What the three ``python -m TASK predict`` commands share: the inputs (images, folders, globs), the
checkpoint (whose task must be the command's), device and precision, batched decoding, progress and the
names of the files written.

Every image goes through :func:`maecore.data.images.load_rgb`; a file it cannot use (a text file in a folder, a
truncated JPEG) is skipped with one ``warning:`` line and counted in the summary, never fatal.  A missing
input, a checkpoint of another task or one without saved args is one ``error:`` line (exit 2).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from maecore.checkpoint import checkpoint_args, load_file, unwrap_state_dict
from maecore.cli import non_negative_int, positive_int
from maecore.convert.trained import TASK_COMMANDS, describe_task, task_of
from maecore.data.images import UNREADABLE, load_rgb
from maecore.data.workers import ignore_stop_signals
from maecore.engine import describe_amp, resolve_amp
from maecore.errors import UserError

STATUS_EVERY_S = 10.0


# ---- inputs ---------------------------------------------------------------------------------------
def _files_under(folder: Path) -> list[Path]:
    """Every regular file below ``folder`` (hidden files and folders left out), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Images, folders (searched recursively: every file in them is tried) and globs (``'imgs/*.jpg'``,
    ``'**'`` recursive), in the order given, each file once.  An input that names nothing is a
    :class:`UserError`."""
    out: list[Path] = []
    for text in inputs:
        p = Path(text)
        if p.is_dir():
            found = _files_under(p)
        elif p.exists():
            found = [p]
        elif glob.has_magic(text):
            found = []
            for m in sorted(glob.glob(text, recursive=True)):
                q = Path(m)
                found += _files_under(q) if q.is_dir() else [q]
            if not found:
                raise UserError(f"no file matches {text!r}")
        else:
            raise UserError(f"input not found: {text}")
        out += found
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise UserError(f"no files in {', '.join(inputs)}")
    return unique


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A file stem per input for the files written (``img.jpg`` -> ``img``), made unique where two inputs
    share one (``img``, ``img_2``)."""
    used: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.stem or "image"
        n = used.get(stem, 0) + 1
        used[stem] = n
        out.append(stem if n == 1 else f"{stem}_{n}")
    return out


class ImageInputs(Dataset):
    """``(index, transform(image) or None, error or None)`` for each path; decoding runs in the loader's
    workers and a file that is not a usable image comes back as its error message."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], Any] | None = None) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        try:
            image = load_rgb(self.paths[i])
        except UNREADABLE as e:
            return i, None, (str(e).strip().splitlines() or [type(e).__name__])[0]
        return i, (image if self.transform is None else self.transform(image)), None


def _as_list(batch: list) -> list:
    return batch


def input_batches(paths: Sequence[Path], transform: Callable[[Any], Any] | None, batch_size: int,
                  num_workers: int) -> Iterator[list[tuple[int, Any, str | None]]]:
    """Batches of :class:`ImageInputs` items, in input order (decoded ahead by ``num_workers`` workers)."""
    loader = DataLoader(ImageInputs(paths, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_as_list, worker_init_fn=ignore_stop_signals if num_workers else None)
    yield from loader


# ---- the checkpoint ---------------------------------------------------------------------------------
def load_task_checkpoint(path: str | os.PathLike, task: str) -> dict[str, Any]:
    """A trained checkpoint of ``task`` written by this toolkit's trainer, read safely; a checkpoint of another
    task, a pretraining checkpoint or a file without saved args is a one-line :class:`UserError`."""
    return check_task_checkpoint(load_file(path), path, task)


def check_task_checkpoint(ckpt: Any, path: str | os.PathLike, task: str) -> dict[str, Any]:
    """``ckpt`` (read from ``path``) if it is a trained ``task`` checkpoint with saved args, else the one-line error."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a checkpoint of this toolkit (no dict of weights)")
    found = task_of(ckpt)
    if found != task:
        what = describe_task(found)
        hint = f"; use {TASK_COMMANDS[found]} predict" if found in TASK_COMMANDS else ""
        raise UserError(f"{path} is {what}, not a trained {task} checkpoint{hint}")
    if checkpoint_args(ckpt) is None:
        raise UserError(f"{path}: a {task} state dict without the training args this toolkit saves "
                        f"(the network is built from them); evaluate it with python -m {task} --eval instead")
    unwrap_state_dict(ckpt)  # a checkpoint with no tensors says so here
    return ckpt


# ---- device, precision ------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def setup_runtime(args: argparse.Namespace) -> tuple[torch.device, str]:
    """The device and the resolved precision; prints the precision line as training does."""
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    print(describe_amp(args.amp, amp, device) + f" on {device}")
    return device, amp


# ---- the command line ----------------------------------------------------------------------------------
def add_predict_args(p: argparse.ArgumentParser, batch_size: int, batch_help: str = "images per forward pass") -> None:
    """The arguments every ``predict`` command has."""
    p.add_argument("checkpoint", help="a checkpoint written by training (checkpoint-best.pth, checkpoint-last.pth)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders (searched recursively) or globs ('imgs/*.jpg')")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--batch_size", type=positive_int, default=batch_size, help=batch_help)
    p.add_argument("--num_workers", type=non_negative_int, default=2, help="image-decoding workers")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="auto = bf16 on GPUs that support it and on CPUs with native bf16, else fp32 (as in training)")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar (a status line every 10 s)")


class Progress:
    """A tqdm bar on a terminal, else a status line every :data:`STATUS_EVERY_S` seconds; a summary at the end
    with the images done, the files skipped and the time."""

    def __init__(self, total: int, enabled: bool = True, unit: str = "img") -> None:
        self.total, self.done, self.skipped = total, 0, 0
        self.t0 = self.last = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True)

    def skip(self, path: Path, why: str) -> None:
        self.skipped += 1
        msg = f"warning: skipped {path}: not a usable image ({why})"
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)
        self.advance(1, counted=False)

    def advance(self, n: int = 1, counted: bool = True) -> None:
        if counted:
            self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.time()
        if now - self.last >= STATUS_EVERY_S:
            seen = self.done + self.skipped
            rate = seen / max(now - self.t0, 1e-9)
            left = (self.total - seen) / rate if rate > 0 else 0
            print(f"  {seen}/{self.total} files, {rate:.1f}/s, {int(left)}s left", flush=True)
            self.last = now

    def close(self, out: Path | str) -> str:
        if self.bar is not None:
            self.bar.close()
        line = (f"predicted {self.done} image{'s' if self.done != 1 else ''} in {time.time() - self.t0:.1f}s -> {out}"
                + (f" ({self.skipped} file{'s' if self.skipped != 1 else ''} skipped: not usable images)" if self.skipped else ""))
        print(line, flush=True)
        return line


def prepare_output(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder (-o is the output folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from None
    return out


__all__ = ["ImageInputs", "Progress", "add_predict_args", "check_task_checkpoint", "expand_inputs", "input_batches", "load_task_checkpoint",
           "output_stems", "prepare_output", "resolve_device", "setup_runtime"]
