"""The transfer runs' scheduler: ``Job`` (one run and where its result goes) and ``run_jobs``, which runs them
``parallel`` at a time, each its own process, passing stop signals on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from maecore.engine import EXIT_REQUEUE, STOP_SIGNALS, Preempted
from pipeline.context import ROOT, Context, entry_argv
from pipeline.plan import STAGE_NAMES, transfer_threads


@dataclass
class Job:
    """One transfer run: a CLI command, and what files its result (the CLI's summary dict) into the results."""

    stage: str
    label: str  # e.g. "finetune mae": prefixes the run's output lines when runs go side by side
    entry: str
    args: list[str]
    record: Callable[[dict], None]


def first_line(e: BaseException) -> str:
    """An exception in one line, for a stage's failure message (its type when it has no text)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class StageFailed(Exception):
    """A transfer run failed: ``stage`` names it, the message is its last error line, ``details`` its output."""

    def __init__(self, stage: str, message: str, details: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.details = details


def run_jobs(ctx: Context, jobs: list[Job], done: Callable[[Job], None]) -> None:
    """Run the transfer jobs, ``ctx.cfg["parallel"]`` at a time (1: one after another in this process).

    Side by side, each job is its own process (``python -m …``, as the report shows it) with its share of the
    cores as torch threads: on 2 cores two 1-thread runs finish together 1.37x sooner than the same two runs
    one after the other on 2 threads (a tiny ViT's step does not spread well over threads; docs/demo_study.md).
    Their output lines come prefixed with the job's label.  After a failure no new job starts; the running
    ones finish.  A stop signal is passed on to the runs (each checkpoints and exits 75), then the pipeline
    stops as a stage would; a run that the signal ends before it could checkpoint (still starting, or evaluating
    after its last step) counts as stopped too: its stage is rerun anyway."""
    parallel = int(ctx.cfg.get("parallel", 1))
    if parallel <= 1:
        for job in jobs:
            try:
                res = ctx.run(job.stage, job.entry, job.args)
            except Exception as e:  # noqa: BLE001 - any failure of a run fails its stage, named
                raise StageFailed(job.stage, first_line(e), traceback.format_exc()) from None
            job.record(res)
            done(job)
        return
    threads = transfer_threads(parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # the interpreter of the runs: torchrun's PYTHON_EXEC where it is set (a site's wrapper; the test suite's warm
    # start: tests/forkserver.py), as torchrun starts its workers
    python = os.environ.get("PYTHON_EXEC") or sys.executable
    pending = deque(jobs)
    running: dict[subprocess.Popen, tuple[Job, float, deque, threading.Thread]] = {}
    failed: list[tuple[Job, str, str]] = []
    stopped: list[Job] = []  # jobs that checkpointed on a stop signal (exit 75), or that it ended
    signalled: list[int] = []  # the stop signals this process received, in order
    told: dict[subprocess.Popen, int] = {}  # how many of them each run has been passed
    lock = threading.Lock()

    def pump(proc: subprocess.Popen, job: Job, tail: deque) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            tail.append(line.rstrip("\n"))
            with lock:
                print(f"[{job.label}] {line}", end="", flush=True)

    def note(signum: int, _frame: object) -> None:
        # only noted: the loop passes it on (pass_on), so a run started while a signal came, before it was in
        # `running`, gets it too, and none gets one twice (handler and loop share the main thread)
        signalled.append(signum)

    def pass_on() -> None:
        for proc in running:
            while told[proc] < len(signalled):
                if proc.poll() is None:
                    proc.send_signal(signalled[told[proc]])
                told[proc] += 1

    def ended_by_signal(code: int) -> bool:
        """Did a run exit because of a signal passed on (killed by it, or its KeyboardInterrupt's 130)?"""
        return any(code in (-s, 128 + s) for s in signalled)

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
    def may_start() -> bool:
        return not (failed or stopped or signalled)

    try:
        # after a failure or a stop the jobs still pending never start: the loop ends with the last running one
        while running or (pending and may_start()):
            while pending and len(running) < parallel and may_start():
                job = pending.popleft()
                with lock:
                    ctx.show(job.stage, job.entry, job.args, threads)
                # a session of its own: a Ctrl-C reaches the pipeline, which passes it on once
                proc = subprocess.Popen([python, *entry_argv(job.entry), *job.args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, start_new_session=True)
                tail: deque = deque(maxlen=200)
                reader = threading.Thread(target=pump, args=(proc, job, tail), daemon=True)
                reader.start()
                running[proc] = (job, time.time(), tail, reader)
                told[proc] = 0
            pass_on()
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                job, t0, tail, reader = running.pop(proc)
                del told[proc]
                reader.join()
                if proc.returncode == 0:
                    res = last_json(tail)
                    if res is None:
                        failed.append((job, f"{job.label}: it printed no result", "\n".join(tail)))
                        continue
                    res["wall_s"] = time.time() - t0
                    job.record(res)
                    done(job)
                elif proc.returncode == EXIT_REQUEUE or ended_by_signal(proc.returncode):
                    stopped.append(job)
                else:
                    errors = [t for t in tail if t.startswith("error:")]
                    why = errors[-1][len("error:"):].strip() if errors else (tail[-1] if tail else "no output")
                    failed.append((job, f"{job.label}: {why} ({exit_text(proc.returncode)})", "\n".join(tail)))
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if failed:
        raise StageFailed(failed[0][0].stage, failed[0][1], failed[0][2])
    if stopped or signalled:
        left = stopped + list(pending)
        first = min((j.stage for j in left), key=STAGE_NAMES.index) if left else jobs[-1].stage
        print(f"[{first}] stopped by a signal; rerun with --from-stage {first}", flush=True)
        raise Preempted(f"stopped by a signal during stage {first}")


def exit_text(code: int) -> str:
    """A run's exit status in words: ``exit 1``, or ``killed by SIGKILL`` (Popen's negative status)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit {code}"


def last_json(lines: Iterable[str]) -> dict | None:
    """The last line that is a JSON object: every CLI prints its summary so, at the end."""
    for line in reversed(list(lines)):
        if line.startswith("{"):
            try:
                res = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(res, dict):
                return res
    return None
