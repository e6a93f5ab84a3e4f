"""Shared fixtures (a tiny synthetic world, made once per worker; one smoke demo run, made once for all xdist workers)
and the order the tests run in (the modules with a ``slow`` test first)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests import ROOT, forkserver

# Tests run on 2 cores next to other work: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")


@pytest.fixture(scope="session", autouse=True)
def _forkserver_env() -> None:
    """The warm fork server's environment is the one the tests begin with (tests/forkserver.py)."""
    forkserver.snapshot_env()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """ImageNet / COCO / ADE20K layouts at 32 px: 8 train and 2 val images per class (7 classes)."""
    from synthetic import make_world

    root = tmp_path_factory.mktemp("world")
    return make_world(root, size=32, n_train=8, n_val=2, seed=0)


@pytest.fixture(scope="session")
def run_module() -> Callable[..., subprocess.CompletedProcess]:
    """``run_module("detection", args, nproc=1)``: ``python -m detection ARGS`` in a fresh process, or with
    ``nproc`` > 1 under ``torchrun --standalone`` (gloo on CPU, free port); one thread per process, so runs
    with different process counts compute each image the same way.  Fails the test on a non-zero exit."""

    def run(module: str, args: Sequence[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        launch = [sys.executable, "-m", module] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", module]
        p = forkserver.run([*launch, *map(str, args)], cwd=ROOT, env=env, timeout=timeout)
        assert p.returncode == 0, f"{module} x{nproc} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p

    return run



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules that hold a ``slow`` test run first, each module's tests together and in their order (so a
    module's fixtures are made once): ``make test``'s two workers then end on short tests, together, instead of one
    of them starting a minute-long test while the other has nothing left to take."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this session that every xdist worker sees (the workers' base temps are folders in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smoke_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """ONE ``python tools/demo.py --preset smoke`` run (the command ``make demo`` runs, at the smallest size) for the
    whole session: the first test to ask runs it under a file lock, a test on another xdist worker waits for it and
    reads it.  Returns the run's folder and its process (each test asserts the exit status); read only: a test that
    goes on with the run works on a copy."""
    shared = shared_dir(tmp_path_factory) / "smoke_demo"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "process.json"
        if not done.exists():
            env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's packages, not whichever copy is installed
            cmd = [sys.executable, str(ROOT / "tools" / "demo.py"), "--preset", "smoke", "--output", str(shared / "run")]
            p = forkserver.run(cmd, cwd=ROOT, env=env)
            done.write_text(json.dumps({"args": p.args, "returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr}))
        return shared / "run", subprocess.CompletedProcess(**json.loads(done.read_text()))
