"""Shared data pieces: image folders with or without classes, and the resumable sharded sampler."""

from __future__ import annotations

import shutil

import pytest

from maecore.data.images import ImageFiles
from maecore.data.sampler import ResumableSampler
from maecore.errors import UserError


def test_image_folder_with_and_without_class_folders(tiny_world, tmp_path):
    with_classes = ImageFiles(tiny_world["imagenet"] / "train")
    assert len(with_classes.classes) == 7 and len(with_classes) == 56 and min(with_classes.targets) == 0
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((tiny_world["imagenet"] / "train").rglob("*.jpg"))[:5]:
        shutil.copy(p, flat / f"{p.parent.name}_{p.name}")
    loose = ImageFiles(flat)
    assert len(loose) == 5 and set(loose.targets) == {-1} and loose.classes == []
    img, target, skipped = loose[0]
    assert img.size == (32, 32) and target == -1 and skipped == 0


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ImageFiles(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        ImageFiles(tmp_path / "empty")


def test_sampler_shards_resumes_and_seeds_per_sample():
    full = [list(ResumableSampler(10, True, seed=3, rank=r, world_size=2)) for r in range(2)]
    idx = [i for shard in full for i, _ in shard]
    assert sorted(idx) == list(range(10))  # disjoint shards covering everything (10 = 2 x 5, no padding)
    s = ResumableSampler(10, True, seed=3, rank=0, world_size=2)
    s.set_epoch(0, start=2)
    assert list(s) == full[0][2:]  # mid-epoch restart continues the same order with the same seeds
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in full[0]]  # a new epoch reshuffles
    odd = [list(ResumableSampler(7, False, rank=r, world_size=2)) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 4  # padded to equal shards, as DistributedSampler does
