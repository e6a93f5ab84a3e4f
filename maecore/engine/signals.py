"""Stop signals: what SLURM / Kubernetes / submitit / Ctrl-C send before a kill, turned into a request to stop
at the next optimizer-step boundary (:class:`maecore.engine.hooks.StopOnSignal` acts on it)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Sequence
from typing import Any

EXIT_REQUEUE = 75  # EX_TEMPFAIL (sysexits.h): stopped on a signal, checkpointed; requeue and --resume auto
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT") if hasattr(signal, n))


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
