"""Shared fixtures: a tiny synthetic world, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests run on 2 cores next to other work: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")


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
        p = subprocess.run([*launch, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{module} x{nproc} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p

    return run
