"""Stop signals: what SLURM / Kubernetes / submitit / Ctrl-C send before a kill, turned into a request to stop
at the next optimizer-step boundary (:class:`maecore.engine.hooks.StopOnSignal` acts on it)."""

from __future__ import annotations

import atexit
import contextlib
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

EXIT_REQUEUE = 75  # EX_TEMPFAIL (sysexits.h): stopped on a signal, checkpointed; requeue and --resume auto
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT") if hasattr(signal, n))


class Preempted(SystemExit):
    """Raised by :meth:`Trainer.fit` after a stop signal, once ``checkpoint-last.pth`` is written: uncaught, the
    process exits with status :data:`EXIT_REQUEUE` (75) and no traceback.  ``signals``: the names of the stop
    signals any rank received (the same on every rank), e.g. ``("SIGUSR2",)``.

    From the stop to the process's exit the stop signals stay ignored (:meth:`StopSignals.hold`): a launcher that
    sees one rank end stops the others with SIGTERM, and a rank still shutting down must end with 75 as well.  A
    caller that catches this and carries on calls :meth:`release` to put back the handlers the run found."""

    def __init__(self, message: str, signals: Sequence[str] = ()) -> None:
        super().__init__(EXIT_REQUEUE)
        self.message = message
        self.signals = tuple(signals)
        self.release: Callable[[], None] = lambda: None


class StopSignals:
    """Turns SIGTERM / SIGUSR1 / SIGINT into a request to stop at the next optimizer-step boundary (installed
    by :meth:`Trainer.fit` in the main thread, restored after; after a stop, held until the process exits:
    :meth:`hold`).  Later signals are ignored while stopping and always during a save; a second SIGINT outside
    a save raises KeyboardInterrupt (the user insists)."""

    def __init__(self) -> None:
        self.signum = 0  # the first one
        self.received: set[int] = set()
        self.saving = False
        self._old: dict[int, Any] = {}
        self._held = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only: nothing to install from elsewhere
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        if self._held:
            atexit.unregister(self._ignore_at_exit)
            self._held = self.saving = False
        for s, h in self._old.items():
            if h is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(s, h)
        self._old.clear()

    def hold(self) -> None:
        """The run has stopped and this process is on its way out: ignore the stop signals until it has exited.

        torchrun ends every other worker with SIGTERM as soon as one exits; a rank that is still tearing down
        (the process group, the interpreter, a library's exit hook) would die of it (status -15) instead of
        ending with 75.  Our handler (which ignores them now) stays until the exit hooks run; then the signals
        are ignored at the OS level, since Python drops its handlers early in interpreter shutdown and its
        default for SIGTERM kills.  A SIGKILL still ends a process that hangs.  :meth:`restore` undoes it."""
        if self._old and not self._held:
            self.saving = self._held = True
            atexit.register(self._ignore_at_exit)

    def _ignore_at_exit(self) -> None:
        for s in self._old:
            signal.signal(s, signal.SIG_IGN)

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
