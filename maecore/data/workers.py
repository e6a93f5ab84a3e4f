"""DataLoader workers: their errors as one line, their signals left to the training process, their end."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # its import registers multiprocessing's exit hook: before ours (below)
from typing import Any


def worker_error_line(e: BaseException) -> str:
    """The one line of an exception re-raised by a DataLoader worker (whose message carries the worker's
    whole traceback): the original exception's own message."""
    msg = str(e)
    if "Original Traceback" not in msg:
        return msg
    lines = [line for line in msg.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else msg
    for prefix in (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def _kill_daemonic_children() -> None:
    """Exit hook: end the DataLoader workers still alive (a persistent loader a script let go of without shutting
    it down).  multiprocessing's own hook would SIGTERM them and wait, forever, since ``ignore_stop_signals``
    makes them ignore SIGTERM; SIGKILL is what a daemonic child gets at its parent's exit anyway."""
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(5)


# registered after multiprocessing's own hook (multiprocessing.util, imported above), so it runs first (atexit is LIFO)
atexit.register(_kill_daemonic_children)


def shutdown_workers(loader: Any) -> None:
    """Stop a DataLoader's persistent workers now (the loader stays usable: a next ``iter`` starts new ones).
    Without this they live as long as the loader object, which a reference cycle can keep until exit."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        loader._iterator = None


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT/SIGTERM/SIGUSR1, which the training process
    handles (it finishes the step and checkpoints): a worker killed by a Ctrl-C sent to the process group, or
    by SLURM signalling every process, would make the main process fail with 'worker exited unexpectedly'.
    Workers still end with their parent: the trainer shuts them down when ``fit`` ends (``shutdown_workers``),
    and an exit hook kills any left (``_kill_daemonic_children``)."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if s is not None:
            signal.signal(s, signal.SIG_IGN)
