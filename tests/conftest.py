"""Shared fixtures: a tiny synthetic world, made once per test session."""

from __future__ import annotations

import os
import warnings

import pytest

# Tests run on 2 cores next to other work: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """ImageNet / COCO / ADE20K layouts at 32 px: 8 train and 2 val images per class (7 classes)."""
    from maecore.synthetic import make_world

    root = tmp_path_factory.mktemp("world")
    return make_world(root, size=32, n_train=8, n_val=2, seed=0)
