"""The warm fork server (tests/forkserver.py) runs a command as a fresh interpreter would: same exit status, output,
argv, working directory, sys.path, environment and exit sequence; it kills a run that times out with what it started,
and leaves to a fresh process what it cannot take."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import ROOT, forkserver

# MAE_TEST_FORKSERVER=0 (README) turns the server off: every run is a fresh process and there is no server to test
pytestmark = pytest.mark.skipif(os.environ.get("MAE_TEST_FORKSERVER") == "0", reason="the fork server is off")

SCRIPT = textwrap.dedent("""
    import atexit, json, os, sys, threading, time
    atexit.register(lambda: print("atexit", flush=True))
    def late():
        time.sleep(0.3)
        print("thread done", flush=True)
    threading.Thread(target=late).start()  # not a daemon: the exit waits for it, then runs atexit
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "x": os.environ.get("MAE_X"),
                      "torch_loaded_by_us": "maecore" in sys.modules}))
    how = sys.argv[1]
    if how == "exit2":
        sys.exit(2)
    if how == "message":
        sys.exit("error: a message")
    if how == "raise":
        raise ValueError("boom")
""")


def served_now() -> int:
    return forkserver._server.served if forkserver._server is not None else 0


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.parametrize("how", ["ok", "exit2", "message", "raise"])
def test_a_run_from_the_server_is_the_fresh_process_run(tmp_path: Path, how: str) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, str(script), how]
    fresh = subprocess.run(cmd, cwd=tmp_path, env=env(MAE_X="1"), capture_output=True, text=True, timeout=60)
    served = served_now()
    warm = forkserver.run(cmd, cwd=tmp_path, env=env(MAE_X="1"), timeout=60)
    assert served_now() == served + 1  # it went through the server
    assert (warm.returncode, warm.stdout) == (fresh.returncode, fresh.stdout)
    assert warm.stdout.splitlines()[-2:] == ["thread done", "atexit"]
    if how == "raise":  # the same traceback, after the server's own frames
        assert warm.stderr.startswith("Traceback (most recent call last):")
        assert warm.stderr.splitlines()[-3:] == fresh.stderr.splitlines()[-3:], (warm.stderr, fresh.stderr)
    else:
        assert warm.stderr == fresh.stderr


def test_python_m_runs_the_package_main_with_the_working_directory_first(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pretrain", "--batch_size", "0", "--data_path", str(tmp_path)]
    fresh = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    served = served_now()
    warm = forkserver.run(cmd, cwd=ROOT, env=env(), timeout=120)
    assert served_now() == served + 1
    assert (warm.returncode, warm.stdout, warm.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert warm.returncode == 2 and warm.stderr.startswith("error: argument --batch_size")


def test_a_run_past_its_timeout_is_killed_with_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "hang.py"
    script.write_text("import subprocess, sys, time\n"
                      "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                      f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
                      "time.sleep(120)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run([sys.executable, str(script)], cwd=tmp_path, env=env(), timeout=5)
    child = int(pidfile.read_text())
    for _ in range(100):  # the grandchild is gone too (killed with its session)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        __import__("time").sleep(0.05)
    else:
        pytest.fail("the run's child outlived its timeout")
    (tmp_path / "job.py").write_text(SCRIPT)  # the server takes the next run
    assert forkserver.run([sys.executable, str(tmp_path / "job.py"), "exit2"], cwd=tmp_path, env=env()).returncode == 2


def test_an_import_time_variable_or_another_command_goes_to_a_fresh_process(tmp_path: Path) -> None:
    server = forkserver._get_server()
    assert server is not None
    assert server.takes(env(MAE_ANYTHING="1", PYTHONUNBUFFERED="1"))
    assert not server.takes(env(OMP_NUM_THREADS="2")) and not server.takes(env(PYTHONPATH=""))
    # a fresh process: its own OMP_NUM_THREADS, which the server could not give it
    code = "import os, sys; print(os.environ['OMP_NUM_THREADS'], len(sys.modules) < 200)"
    p = forkserver.run([sys.executable, "-c", code], env=env(OMP_NUM_THREADS="2"))
    assert p.stdout.split() == ["2", "True"]


def test_the_worker_stand_in_passes_signals_on_takes_the_exit_status_and_takes_the_run_with_it(tmp_path: Path) -> None:
    """torchrun and the demo start ``PYTHON_EXEC -u -m MODULE``: the stand-in is that run to them."""
    import signal
    import time

    script = tmp_path / "job.py"
    script.write_text("import os, signal, sys, time\n"
                      "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))\n"
                      f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
                      "print(os.environ['RANK'], len(sys.modules) > 1000, flush=True)\n"
                      "time.sleep(120)\n")
    stand_in = forkserver.worker_env()["PYTHON_EXEC"]

    def start() -> tuple[subprocess.Popen, int]:
        (tmp_path / "pid").unlink(missing_ok=True)
        proc = subprocess.Popen([stand_in, "-u", str(script)], cwd=tmp_path, env=env(RANK="1"), stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().split() == ["1", "True"]  # its RANK, and torch was there before it started
        return proc, int((tmp_path / "pid").read_text())

    proc, run = start()
    assert run != proc.pid
    proc.send_signal(signal.SIGUSR1)  # passed on: the run's handler exits 75, and so does the stand-in
    assert proc.wait(timeout=30) == 75
    proc, run = start()
    proc.kill()  # SIGKILL cannot be passed on: the run goes with its stand-in
    proc.wait(timeout=30)
    for _ in range(200):
        try:
            os.kill(run, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the run outlived its killed stand-in")
    # a command the server cannot take runs in the stand-in's place: the real interpreter, its own environment
    p = subprocess.run([stand_in, "-c", "import os, sys; print(len(sys.modules) < 200)"], env=env(OMP_NUM_THREADS="3"),
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["True"], p.stderr
