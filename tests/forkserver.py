"""Start the suite's command-line runs from a warm interpreter.

Why: the suite starts some 300 Python processes, and each spent 3-5 s of CPU importing torch, torchvision and timm
before the first line of our code: most of the suite's CPU on 2 cores.  A server per pytest worker imports those once
(third-party packages only, none of ours: each run imports the toolkit afresh, as a new process does) and each run
is a ``fork`` of it that becomes the command (:func:`_become`): its own process and session, its stdin/stdout/stderr
(passed over the socket), argv, working directory and environment, the module or script run by ``runpy`` as
``python -m MODULE`` / ``python SCRIPT`` run it, and the interpreter's exit sequence (:func:`_exit`).

- :func:`run` is ``subprocess.run(cmd, capture_output=True, text=True)`` for ``python -m MODULE ...`` and
  ``python SCRIPT.py ...``.  It also sets ``PYTHON_EXEC`` (torchrun's setting for the interpreter of its workers,
  which the demo honours for its side-by-side runs) to a stand-in, :func:`worker`, that asks the server for the
  run and then behaves as that run to whoever started it: signals passed on, the run's exit status or signal taken
  as its own, and if the stand-in is killed, so is the run.  :func:`worker_env` gives the same to a ``Popen``.
- A command goes to a fresh process instead when it is anything else, or when its environment differs from the
  server's in a variable read at import time (any not in ``RUNTIME_VARS``), e.g. ``OMP_NUM_THREADS``, which OpenMP
  reads once when torch loads, or ``PYTHONPATH``.  Tests that signal their process, or read its output while it runs,
  keep ``subprocess.Popen``.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
# variables only a run reads (ours, torchrun's for its workers, wandb's), so a run may differ from the server in them
RUNTIME_VARS = ("MAE_", "WANDB_", "PYTEST_", "PYTHONUNBUFFERED", "PYTHON_EXEC", "TORCHELASTIC_", "TORCH_NCCL_ASYNC_",
                "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# the environment as the tests begin (:func:`snapshot_env`, after collection, whose imports may set variables): a
# server started while a test has changed os.environ (monkeypatch) must not keep that change, which would send every
# later run to a fresh process
_BASE_ENV: dict[str, str] | None = None
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _send(sock: socket.socket, req: dict, fds: Sequence[int]) -> None:
    data = json.dumps(req).encode()
    socket.send_fds(sock, [struct.pack("!I", len(data)) + data], list(fds))


def _recv(sock: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
    (n,) = struct.unpack("!I", data[:4])
    data = data[4:]
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("request cut short")
        data += chunk
    return json.loads(data), fds


# ---------------------------------------------------------------- the server: python -m tests.forkserver SOCKET

def _warm() -> None:
    """What every toolkit command imports first: torch, torchvision, timm (with wandb hidden, as maecore.models._timm
    imports it), and their image and checkpoint libraries."""
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401  # the default logger
    import torchvision  # noqa: F401

    sys.modules["wandb"] = None  # type: ignore[assignment]
    try:
        import timm  # noqa: F401
    finally:
        del sys.modules["wandb"]


def _become(req: dict, fds: list[int], conn: socket.socket) -> NoReturn:
    """In the forked child: turn into ``python -m MODULE ARGS`` / ``python SCRIPT ARGS``; never returns to the loop."""
    import random
    import runpy
    import threading

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter (the server ignores ^C)
    os.setsid()  # its own session: a timeout kills the run and whatever it started, as a group
    for n, fd in enumerate(fds):
        os.dup2(fd, n)
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    if req["unbuffered"]:  # python -u / PYTHONUNBUFFERED
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
        sys.stderr.reconfigure(line_buffering=True, write_through=True)
    tempfile.tempdir = None  # TMPDIR is read again
    random.seed()  # fresh-process randomness (the server's state would repeat in every run)
    sys.modules["numpy"].random.seed()
    sys.modules["torch"].seed()  # a fresh process's torch seed is random too
    assert threading.active_count() == 1

    def orphaned() -> None:  # the client went (killed, or its test ended): so does the run
        try:
            conn.recv(1)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=orphaned, daemon=True).start()
    target, args = req["target"], req["args"]
    try:
        if req["module"]:
            sys.path[0] = req["cwd"]  # python -m puts the working directory first
            sys.argv = ["-m", *args]  # runpy replaces argv[0] with the module's file, as python -m does
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = str(Path(req["cwd"], target).resolve().parent)  # python SCRIPT: the script's folder first
            sys.argv = [target, *args]
            runpy.run_path(target, run_name="__main__")
        code = 0
    except SystemExit as e:  # what the interpreter makes of sys.exit(x)
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - printed as the interpreter prints an uncaught exception
        traceback.print_exc()
        code = 1
    _exit(code)


def _exit(code: int) -> NoReturn:
    """The interpreter's exit up to its module teardown: non-daemon threads joined, atexit handlers (weakref.finalize
    included) run, streams flushed; then ``os._exit``.  The teardown itself (freeing every module of the warm server,
    ~0.6 s a run) is skipped: it frees memory and runs ``__del__`` of what modules still hold, which only a run that
    leaks an open file would notice (and then lose data here, failing its test, not passing it)."""
    import threading

    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    _end_as(code)


def _end_as(code: int) -> NoReturn:
    """End this process as ``code`` says: an exit status, or (negative, as Popen writes it) killed by that signal."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def serve(path: str) -> None:
    import gc
    import select

    _warm()
    # the warm modules' objects live as long as every run: the collector need not walk them in each run
    gc.freeze()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    parent = os.getppid()
    runs: dict[int, socket.socket] = {}  # pid -> its client's connection
    print("ready", flush=True)
    while True:
        if select.select([srv], [], [], 0.02)[0]:
            conn, _ = srv.accept()
            req, fds = _recv(conn)
            if req.get("quit"):
                return
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                srv.close()
                for c in runs.values():
                    c.close()
                _become(req, fds, conn)
            for fd in fds:
                os.close(fd)
            runs[pid] = conn
            try:
                conn.sendall(f"{pid}\n".encode())
            except OSError:
                pass
        while runs:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = runs.pop(pid, None)
            if conn is not None:
                try:  # a client that timed out has closed its end
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()
        if os.getppid() != parent:  # the pytest worker is gone: so is the server (its runs follow: orphaned())
            return


# ---------------------------------------------------------------- the clients

class _Server:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mae-fork-"))
        self.path = str(self.dir / "s")
        self.env = {**(_BASE_ENV or os.environ), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.served = 0  # runs it took (tests/test_forkserver.py checks that they went through it)
        self.log = open(self.dir / "server.log", "w")  # noqa: SIM115  # lives as long as the server
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver", self.path], cwd=ROOT, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the fork server did not start: {(self.dir / 'server.log').read_text()[-2000:]}")
        # torchrun's workers: PYTHON_EXEC=<this stand-in> -u -m MODULE ARGS (python -S: it starts in milliseconds)
        self.worker = self.dir / "worker"
        self.worker.write_text(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                               f"from tests.forkserver import worker\nworker({self.path!r}, {sys.executable!r})\n")
        self.worker.chmod(0o755)
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.path)
                    _send(s, {"quit": True}, [])
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()

    def takes(self, env: Mapping[str, str]) -> bool:
        return _compatible(env, self.env)

    def run(self, cmd: list[str], target: str, args: list[str], module: bool, cwd: str, env: dict[str, str],
            timeout: float | None) -> subprocess.CompletedProcess:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
                open(os.devnull) as null, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.path)
            _send(s, {"target": target, "args": args, "module": module, "cwd": cwd, "env": env,
                      "unbuffered": bool(env.get("PYTHONUNBUFFERED"))}, [null.fileno(), out.fileno(), err.fileno()])
            f = s.makefile("r")
            pid = int(f.readline())
            self.served += 1
            s.settimeout(timeout)
            try:
                code = int(f.readline())
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)  # the run we started, and what it started
                out.seek(0)
                err.seek(0)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read(), err.read()) from None
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(cmd, code, out.read(), err.read())


def _compatible(env: Mapping[str, str], server_env: Mapping[str, str]) -> bool:
    """Would the server's imports have read ``env`` as they read ``server_env``?  Equal but for ``RUNTIME_VARS``; a
    ``PYTHONPATH`` naming the same folders in the same order (once or twice: the same ``sys.path``); an
    ``MKL_NUM_THREADS`` equal to ``OMP_NUM_THREADS`` (torch gives both libraries that one count at start)."""

    def norm(e: Mapping[str, str]) -> dict[str, str]:
        e = {k: v for k, v in e.items() if not k.startswith(RUNTIME_VARS)}
        if "PYTHONPATH" in e:
            e["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(e["PYTHONPATH"].split(os.pathsep)))
        if e.get("MKL_NUM_THREADS") == e.get("OMP_NUM_THREADS"):
            e.pop("MKL_NUM_THREADS", None)
        return e

    return norm(env) == norm(server_env)


_server: _Server | None = None


def _parse(cmd: Sequence[str], cwd: str | os.PathLike) -> tuple[str, list[str], bool] | None:
    """``(target, args, is_module)`` for ``python -m MODULE ARGS`` or ``python SCRIPT.py ARGS``, else None."""
    if len(cmd) < 2 or cmd[0] != sys.executable:
        return None
    if cmd[1] == "-m" and len(cmd) > 2:
        return cmd[2], list(cmd[3:]), True
    if cmd[1].endswith(".py") and Path(cwd, cmd[1]).is_file():  # else python's own message for a missing one
        return cmd[1], list(cmd[2:]), False
    return None


def run(cmd: Sequence[str | os.PathLike], *, cwd: str | os.PathLike = ROOT, env: Mapping[str, str] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``, from the warm
    server where it can take the command (module docstring)."""
    cmd = [str(c) for c in cmd]
    env = dict(os.environ if env is None else env)
    parsed = _parse(cmd, cwd)
    server = _get_server() if parsed is not None else None
    if server is not None and server.takes(env):
        env.setdefault("PYTHON_EXEC", str(server.worker))  # what it starts, under torchrun or the demo, comes from here too
        return server.run(cmd, *parsed, str(Path(cwd).resolve()), env, timeout)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def worker_env() -> dict[str, str]:
    """``{"PYTHON_EXEC": stand-in}`` for the environment of a torchrun or a demo that a test starts itself: their
    runs then come from the warm server (:func:`worker`).  Empty with ``MAE_TEST_FORKSERVER=0``."""
    server = _get_server()
    return {"PYTHON_EXEC": str(server.worker)} if server is not None else {}


def snapshot_env() -> None:
    """Keep the environment the tests begin with as the servers' (tests/conftest.py calls this before the first test)."""
    global _BASE_ENV
    if _BASE_ENV is None:
        _BASE_ENV = dict(os.environ)


def _get_server() -> _Server | None:
    global _server
    if os.environ.get("MAE_TEST_FORKSERVER", "1") == "0":  # every run a fresh process, as before the server
        return None
    if _server is None:
        _server = _Server()
    return _server


def worker(path: str, python: str) -> NoReturn:
    """torchrun's worker, ``PYTHON_EXEC -u -m MODULE ARGS``: the server's fork of that command, with this process
    standing in for it (signals passed on; its exit status or signal taken as this process's own).  A command or
    environment the server cannot take is exec'd by the real interpreter in this process's place."""
    argv = sys.argv[1:]
    args = argv[1:] if argv[:1] == ["-u"] else argv
    env = dict(os.environ)
    try:
        server_env = json.loads(Path(path).with_name("env.json").read_text())
    except OSError:
        server_env = None
    parsed = _parse([python, *args], os.getcwd())
    if parsed is None or server_env is None or not _compatible(env, server_env):
        os.execv(python, [python, *argv])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    _send(s, {"target": parsed[0], "args": parsed[1], "module": parsed[2], "cwd": os.getcwd(), "env": env,
              "unbuffered": argv[:1] == ["-u"] or bool(env.get("PYTHONUNBUFFERED"))}, [0, 1, 2])
    f = s.makefile("r")
    pid = int(f.readline())
    for sig in RELAYED:
        signal.signal(sig, lambda n, _frame: os.kill(pid, n))
    _end_as(int(f.readline()))  # a relayed signal's handler runs and the read goes on (PEP 475)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C to pytest reaches the server's group: pytest stops it
    Path(sys.argv[1]).with_name("env.json").write_text(json.dumps(dict(os.environ)))
    serve(sys.argv[1])
