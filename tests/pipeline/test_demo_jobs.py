"""The demo's side-by-side transfer runs (pipeline.jobs.run_jobs) under a stop signal: real ``python -m
classification`` runs in their own processes, no mocks.  The signal reaches the runs, they stop (checkpoint,
exit 75), the pipeline stops without a traceback, naming the stage to resume from, and ``--from-stage`` resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import ROOT, forkserver

DEMO = [sys.executable, str(ROOT / "tools" / "demo.py")]
# unbuffered: the runs' lines reach the log as they are printed (the test waits for them); one thread: the resumed
# runs in the demo's process are tiny, and 2 threads on 2 busy cores make them 10x slower
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _world(tmp_path: Path) -> Path:
    from synthetic import make_world

    return make_world(tmp_path / "world", size=64, n_train=3, n_val=1, seed=0, tasks=("imagenet",))["imagenet"].parent


def _kill(proc: subprocess.Popen) -> None:
    """A demo that did not stop: kill the runs it started (sessions of their own, so not in its process group: found
    by their parent in /proc), then the demo."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    proc.kill()
    proc.wait()


def _config(world: Path, epochs: int) -> dict:
    """Three classification jobs from random init (two side by side, one pending): the smoke preset's flags, with
    ``epochs`` epochs and no step cap."""
    from pipeline.presets import PRESETS

    def flags(stage: str) -> list[str]:
        args = list(PRESETS["smoke"][stage])
        if "--max_steps" in args:
            del args[args.index("--max_steps"):args.index("--max_steps") + 2]
        args[args.index("--epochs") + 1] = str(epochs)
        return args

    return {"data_root": str(world), "inits": ["random"], "dense_inits": [], "parallel": 2,
            **{stage: flags(stage) for stage in ("linprobe", "partial", "finetune")}}


def test_a_stop_signal_while_the_runs_start_stops_the_stage(tmp_path, capsys):
    """A signal that ends the runs before they could checkpoint (still importing) stops the pipeline as one they
    checkpointed on: not a failed stage; the pending job never starts."""
    from maecore.engine import Preempted
    from pipeline.context import Context
    from pipeline.jobs import run_jobs
    from pipeline.presets import PRESETS
    from pipeline.stages import jobs_finetune, jobs_linprobe, jobs_partial

    assert threading.current_thread() is threading.main_thread()  # run_jobs takes the signals here
    ctx = Context(tmp_path / "run", {**PRESETS["smoke"], **_config(_world(tmp_path), epochs=1)})
    jobs = jobs_linprobe(ctx) + jobs_partial(ctx) + jobs_finetune(ctx)
    finished: list = []

    def hung(_signum: int, _frame: object) -> None:
        raise TimeoutError("run_jobs did not return after the stop signal")

    # the runs need seconds to import torch: half a second in, both are starting
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    old_alarm = signal.signal(signal.SIGALRM, hung)  # a hang fails the test (run_jobs takes SIGTERM, not SIGALRM)
    signal.alarm(60)
    timer.start()
    try:
        with pytest.raises(Preempted):
            run_jobs(ctx, jobs, finished.append)
    finally:
        timer.cancel()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_alarm)
    assert finished == []
    assert [stage for stage, _ in ctx.commands] == ["linprobe", "partial"]
    # the earliest unfinished stage in the pipeline's order (finetune runs first, and this one never started)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "[finetune] stopped by a signal; rerun with --from-stage finetune"


@pytest.mark.slow
def test_a_stop_signal_reaches_the_side_by_side_runs_then_the_demo_resumes(tmp_path):
    world = _world(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"results": {}, "commands": []}))  # the stages before finetune: done
    cfg = tmp_path / "long.json"
    cfg.write_text(json.dumps(_config(world, epochs=1000)))
    log = tmp_path / "demo.log"
    # the transfer stages run longest first: finetune, (detection, segmentation: no jobs here), linprobe, partial
    cmd = [*DEMO, "--preset", "smoke", "--output", str(out), "--from-stage", "finetune", "--to-stage", "partial"]
    with log.open("w") as f:
        proc = subprocess.Popen([*cmd, "--config", str(cfg)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**ENV, **forkserver.worker_env()})  # its runs from the warm server
    try:
        # both runs are training (an epoch done) before the signal comes
        deadline = time.time() + 120
        while not all(f"[{label}] epoch 0:" in log.read_text() for label in ("finetune random", "linprobe random")):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # a Ctrl-C: the runs are in sessions of their own, the demo passes it on
        rc = proc.wait(timeout=60)  # the pending partial job must not keep the demo waiting
    finally:
        if proc.poll() is None:
            _kill(proc)
    text = log.read_text()
    assert rc == 75, text[-3000:]
    assert "Traceback" not in text and "error:" not in text, text[-3000:]
    for label, folder in (("finetune random", "finetune/finetune-random"), ("linprobe random", "linprobe/linprobe-random")):
        assert f"[{label}] stopped by SIGINT after step" in text
        assert (out / folder / "checkpoint-last.pth").exists()
    assert "[partial] $" not in text
    assert text.strip().splitlines()[-1] == "[finetune] stopped by a signal; rerun with --from-stage finetune"

    # resume: the stopped stages rerun (afresh, --overwrite, over the stopped runs' folders) and the rows arrive; in
    # the demo's process (parallel 1) to save two more runs' start-up
    cfg.write_text(json.dumps({**_config(world, epochs=1), "parallel": 1}))
    p = forkserver.run([*cmd, "--config", str(cfg)], cwd=ROOT, env=ENV, timeout=120)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]["rows"]) == {"linear probe|random", "partial fine-tune, last MLP|random", "fine-tune|random"}
    assert [stage for stage, _ in res["commands"]] == ["finetune", "linprobe", "partial"]
