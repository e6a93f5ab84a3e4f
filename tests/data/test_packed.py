"""Packed datasets (maecore.data.packed): pack -> read round trip, skip-and-count of bad images at pack and read
time, rank shards and exact resume on packed data, the same losses as the folder, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from maecore.data.images import ImageFiles
from maecore.data.packed.index import INDEX_NAME
from maecore.data.packed.reader import PackedImages, iter_tar_samples
from maecore.data.packed.writer import pack
from maecore.data.sampler import ResumableSampler, SeededDataset
from maecore.engine import read_log
from maecore.errors import UserError
from pretrain.data import build_pretrain_dataset, fixed_images, pretrain_transform
from tests import ROOT, forkserver

TINY = ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--input_size", "32", "--decoder_depth", "1",
        "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--no_progress",
        "--vis_every", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "1"]
RUN = ["--epochs", "3", "--num_workers", "1", "--save_every_steps", "2"]  # 56 images / 8 = 7 steps x 3 epochs


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def packed(tiny_world, tmp_path_factory) -> Path:
    """The tiny ImageNet world packed as it is (train/ and val/), in several small shards."""
    dst = tmp_path_factory.mktemp("packed") / "imagenet"
    pack(tiny_world["imagenet"], dst, shard_size=8 * 1024, say=quiet)
    return dst


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def pretrain(args, check=True) -> subprocess.CompletedProcess:
    p = forkserver.run([sys.executable, "-m", "pretrain", *map(str, args)], cwd=ROOT, env=env(), timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out, "train")}


def record_bytes(ds: PackedImages, i: int) -> bytes:
    return ds.read_bytes(ds.samples[i][0])


# ---- round trip ----------------------------------------------------------------------------------------
def test_round_trip_same_samples_labels_and_bytes_as_the_folder(tiny_world, packed):
    for split, n in (("train", 56), ("val", 14)):
        folder = ImageFiles(tiny_world["imagenet"] / split)
        ds = PackedImages(packed / split)
        assert len(ds) == n and ds.classes == folder.classes and len(ds.classes) == 7
        assert ds.targets == folder.targets  # same order as the folder's sorted listing, labels kept
        assert all(record_bytes(ds, i) == p.read_bytes() for i, (p, _) in enumerate(folder.samples))  # originals kept
        assert ds.skipped_at_pack == 0
    index = json.loads((packed / "train" / INDEX_NAME).read_text())
    assert len(index["shards"]) > 2 and sum(s["samples"] for s in index["shards"]) == 56
    # a plain tar reader sees {key}.jpg + {key}.cls per sample, the label as text, the keys of the index
    seen = [(k, sorted(g), int(g["cls"])) for s in index["shards"] for k, g in iter_tar_samples(packed / "train" / s["name"])]
    assert [k for k, _, _ in seen] == index["samples"]["key"]
    assert all(exts == ["cls", "jpg"] for _, exts, _ in seen)
    assert [t for _, _, t in seen] == index["samples"]["label"] == ImageFiles(tiny_world["imagenet"] / "train").targets
    with tarfile.open(packed / "train" / index["shards"][0]["name"]) as tar:  # the recorded offset is the member's data
        m = tar.getmember(index["samples"]["key"][0] + ".jpg")
        assert m.offset_data == index["samples"]["offset"][0] and m.size == index["samples"]["size"][0]


def ranks_and_resume(ds) -> tuple[list, list]:
    """The 56-image split ``ds`` under 2 ranks: each epoch's shards disjoint and together every index once; rank 1's
    epoch-1 samples, and the same after a restart part-way through its shard.  Returns its keys and samples."""
    assert len(ds) == 56
    for epoch in (0, 1):
        shards = []
        for rank in range(2):
            s = ResumableSampler(len(ds), True, seed=5, rank=rank, world_size=2)
            s.set_epoch(epoch)
            shards.append([i for i, _ in s])
        assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(56))
    s = ResumableSampler(len(ds), True, seed=5, rank=1, world_size=2)
    s.set_epoch(1)
    keys = list(s)
    full = [ds[k] for k in keys]
    s.set_epoch(1, start=11)  # a restart part-way through rank 1's shard
    resumed = [ds[k] for k in s]
    assert len(resumed) == len(full) - 11
    assert all(torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(full[11:], resumed))
    return keys, full


def test_every_image_once_per_epoch_across_ranks_and_exact_resume(tiny_world, packed):
    ds = SeededDataset(build_pretrain_dataset(packed, 32))
    folder = SeededDataset(build_pretrain_dataset(tiny_world["imagenet"], 32))
    assert isinstance(ds.base, PackedImages)
    keys, full = ranks_and_resume(ds)
    assert all(torch.equal(a[0], folder[k][0]) for a, k in zip(full[:6], keys))  # the folder's crops, bit for bit
    # DataLoader workers each open their own shard handles: the same batches as in-process reading
    loader = lambda nw: [b for b in DataLoader(ds, batch_size=8, sampler=keys, num_workers=nw)]
    for a, b in zip(loader(0), loader(2)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_figures_read_packed_images(packed):
    imgs = fixed_images(packed, 3)
    assert len(imgs) == 3 and all(str(packed / "val") in b.name for b in imgs)
    from pretrain.evaluate import load_images

    assert load_images(imgs, 32).shape == (3, 3, 32, 32)


# ---- bad images ----------------------------------------------------------------------------------------
def test_corrupt_sources_skipped_and_counted_at_pack_time(tiny_world, tmp_path, capsys):
    from maecore.data.packed.cli import main

    src = tmp_path / "src"
    shutil.copytree(tiny_world["imagenet"] / "train", src)
    (src / "circle" / "zero.jpg").write_bytes(b"")
    (src / "cross" / "text.jpg").write_text("this is not an image\n")
    good = sorted((src / "star").glob("*.jpg"))[0].read_bytes()
    (src / "star" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    assert main([str(src), str(tmp_path / "dst"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped unreadable") == 3 and "3 unreadable skipped" in out
    index = json.loads((tmp_path / "dst" / INDEX_NAME).read_text())
    assert index["skipped"]["count"] == 3
    assert sorted(f["path"] for f in index["skipped"]["files"]) == ["circle/zero.jpg", "cross/text.jpg", "star/truncated.jpg"]
    ds = PackedImages(tmp_path / "dst")
    assert len(ds) == 56 and ds.skipped_at_pack == 3 and ds.targets == ImageFiles(tiny_world["imagenet"] / "train").targets


def test_record_corrupted_after_packing_is_skipped_and_counted_at_read_time(packed, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(packed / "train", copy)
    ds = PackedImages(copy)
    rec = ds.samples[9][0]
    with open(ds.shard_paths[rec.shard], "r+b") as f:  # same size, garbage content: the index still matches
        f.seek(rec.offset)
        f.write(b"\0" * rec.size)
    ds = PackedImages(copy, pretrain_transform(32))
    img, target, skipped = ds[9]
    assert skipped == 1 and target == ds.targets[10]
    assert f"{rec.key}.jpg" in caplog.text and "skipping unreadable image" in caplog.text
    s = ResumableSampler(len(ds), True, seed=0)
    assert sum(SeededDataset(ds)[k][2] for k in s) == 1  # counted once per epoch, as n_skipped for a folder


# ---- runs: DDP, resume, folder == packed -----------------------------------------------------------------
def test_torchrun_two_processes_on_packed_data(packed, tmp_path, run_module):
    out = tmp_path / "ddp"
    p = run_module("pretrain", [*TINY, "--data_path", packed, "--output_dir", out, "--epochs", "1", "--num_workers", "0",
                                "--batch_size", "4", "--max_steps", "2"], nproc=2)
    assert "56 images" in p.stdout and "4 x 1 x 2" in p.stdout
    assert [r["step"] for r in read_log(out, "train")] == [1, 2]


@pytest.fixture(scope="module")
def packed_ref(packed, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("ref") / "packed"
    pretrain([*TINY, *RUN, "--data_path", packed, "--output_dir", out])
    got = losses(out)
    assert len(got) == 21
    return got


@pytest.mark.slow
def test_folder_and_packed_copy_give_identical_losses(tiny_world, packed_ref, tmp_path):
    out = tmp_path / "folder"
    pretrain([*TINY, *RUN, "--data_path", tiny_world["imagenet"], "--output_dir", out])
    assert losses(out) == packed_ref  # same samples, same order, same bytes: bit-identical


@pytest.mark.slow
def test_sigkill_then_resume_on_packed_data_gives_identical_losses(packed, packed_ref, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pretrain", *TINY, *RUN, "--data_path", str(packed), "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if max(losses(out), default=0) >= 10:  # mid-epoch 2 (steps 8-14)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    pretrain([*TINY, *RUN, "--data_path", packed, "--output_dir", out, "--resume", "auto"])
    assert losses(out) == packed_ref  # bit-identical, every step


# ---- classification -----------------------------------------------------------------------------------
def test_classification_reads_a_packed_root(tiny_world, packed):
    from classification.data import build_datasets

    train, val, classes = build_datasets(packed, None, None)
    ref_train, ref_val, ref_classes = build_datasets(tiny_world["imagenet"], None, None)
    assert isinstance(train, PackedImages) and isinstance(val, PackedImages)
    assert classes == ref_classes and train.targets == ref_train.targets and val.targets == ref_val.targets
    _, val2, _ = build_datasets(packed, None, None, need_train=False, classes=list(reversed(classes)))  # re-indexed
    assert val2.targets == [6 - t for t in ref_val.targets] and val2[0][1] == val2.targets[0]


# ---- one-line errors ----------------------------------------------------------------------------------
def _error(cli, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_pack_tool_errors(tiny_world, packed, tmp_path, capsys):
    from maecore.data.packed.cli import cli

    (tmp_path / "empty").mkdir()
    assert "no images found" in _error(cli, [tmp_path / "empty", tmp_path / "d1", "--workers", "0"], capsys)
    assert not (tmp_path / "d1").exists() and not list(tmp_path.glob(".d1*"))  # nothing left behind
    assert "not found" in _error(cli, [tmp_path / "nope", tmp_path / "d2"], capsys)
    assert "already exists" in _error(cli, [tiny_world["imagenet"], packed], capsys)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert "not a packed dataset" in _error(cli, [tiny_world["imagenet"], tmp_path / "precious", "--force"], capsys)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    assert "--shard_size" in _error(cli, [tiny_world["imagenet"], tmp_path / "d3", "--shard_size", "lots"], capsys)
    assert "--short_side" in _error(cli, [tiny_world["imagenet"], tmp_path / "d3", "--short_side", "64", "--max_side", "64"], capsys)
    # --force replaces a packed dataset; a capped re-encode shrinks the images to the cap
    again = tmp_path / "again"
    pack(tiny_world["imagenet"] / "val", again, say=quiet)
    cli([str(tiny_world["imagenet"] / "val"), str(again), "--force", "--max_side", "16", "--workers", "0"])
    ds = PackedImages(again)
    assert len(ds) == 14 and ds.load(0)[0].size == (16, 16) and all(r.ext == "jpg" for r, _ in ds.samples)
    assert json.loads((again / INDEX_NAME).read_text())["reencode"]["count"] == 14


def test_training_errors_on_bad_packed_data(tiny_world, packed, tmp_path, capsys):
    from classification.train import cli as cls_cli
    from pretrain.train import cli as pre_cli

    args = [*TINY, "--output_dir", tmp_path / "o", "--epochs", "1", "--num_workers", "0"]
    cut = tmp_path / "cut"
    shutil.copytree(packed, cut)
    shard = cut / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    assert "truncated" in _error(pre_cli, [*args, "--data_path", cut], capsys)
    (cut / "train" / INDEX_NAME).unlink()
    assert "no packed-index.json" in _error(pre_cli, [*args, "--data_path", cut], capsys)
    # classification needs classes: a packed folder is refused as a root, and a split packed without classes too
    cls_args = ["--model", "vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32",
                "--output_dir", tmp_path / "c", "--num_workers", "0", "--epochs", "1"]
    assert "train/ and val/" in _error(cls_cli, [*cls_args, "--data_path", packed / "train"], capsys)
    flat = tmp_path / "flat"
    for split in ("train", "val"):
        (flat / split).mkdir(parents=True)
        for p in sorted((tiny_world["imagenet"] / split / "star").glob("*.jpg")):
            shutil.copy(p, flat / split / p.name)
    pack(flat, tmp_path / "flat_packed", say=quiet)
    assert "without class labels" in _error(cls_cli, [*cls_args, "--data_path", tmp_path / "flat_packed"], capsys)
    with pytest.raises(UserError, match="not a packed dataset"):
        PackedImages(flat / "train")


# ---- --roi packs (crop-box decoding), and packs made before the size columns --------------------------------
@pytest.fixture(scope="module")
def packed_roi(tiny_world, tmp_path_factory) -> Path:
    """The tiny world packed with --roi: every image re-encoded at quality 90 with a restart marker per MCU."""
    dst = tmp_path_factory.mktemp("packed_roi") / "imagenet"
    pack(tiny_world["imagenet"], dst, shard_size=8 * 1024, roi="mcu", say=quiet)
    return dst


def test_roi_pack_round_trip(tiny_world, packed_roi, tmp_path, capsys):
    from maecore.data.crop import JPEG_RGB
    from maecore.data.images import load_rgb
    from maecore.data.jpegroi import restart_table
    from maecore.data.packed.cli import main

    for split, n in (("train", 56), ("val", 14)):
        folder = ImageFiles(tiny_world["imagenet"] / split)
        ds = PackedImages(packed_roi / split)
        assert len(ds) == n and ds.classes == folder.classes and ds.targets == folder.targets
        index = json.loads((packed_roi / split / INDEX_NAME).read_text())
        assert index["roi"] == {"restart": "mcu", "count": n} and index["reencode"]["count"] == n and index["reencode"]["quality"] == 90
        assert len(index["shards"]) > 1 and all((packed_roi / split / s["tables"]["name"]).is_file() for s in index["shards"])
        for i, (rec, _) in enumerate(ds.samples):
            data = record_bytes(ds, i)
            assert rec.kind == JPEG_RGB and rec.ext == "jpg" and (rec.width, rec.height) == (32, 32) and rec.table >= 0
            assert np.array_equal(ds.restart_table(rec), restart_table(data))  # the stored table is the bytes' own
            # the original pixels after one more JPEG generation at quality 90 (32-px shapes with sharp colour edges:
            # most of the loss is 4:2:0 chroma)
            assert np.abs(np.asarray(load_rgb(data), float) - np.asarray(load_rgb(folder.samples[i][0]), float)).mean() < 10
        seen = [(k, sorted(g)) for s in index["shards"] for k, g in iter_tar_samples(packed_roi / split / s["name"])]
        assert [k for k, _ in seen] == index["samples"]["key"] and all(exts == ["cls", "jpg"] for _, exts in seen)
    # the command line: per-row markers; a grey image stays grey
    src = tmp_path / "src"
    shutil.copytree(tiny_world["imagenet"] / "val", src)
    grey = sorted((src / "star").glob("*.jpg"))[0]
    Image.open(grey).convert("L").save(grey)
    assert main([str(src), str(tmp_path / "rows"), "--roi", "--roi_restart", "row", "--quality", "80", "--workers", "0"]) == 0
    assert "14 re-encoded, 14 with restart tables" in capsys.readouterr().out
    ds = PackedImages(tmp_path / "rows")
    index = json.loads((tmp_path / "rows" / INDEX_NAME).read_text())
    assert index["roi"]["restart"] == "row" and index["reencode"]["quality"] == 80
    modes = dict(zip(index["samples"]["key"], index["samples"]["mode"]))
    assert modes.pop(f"star/{grey.stem}") == "L" and set(modes.values()) == {"RGB"}
    tables = [ds.restart_table(r) for r, _ in ds.samples]
    assert all(t[4] == 32 // t[2] for t in tables)  # a restart interval of one MCU row (2 MCUs of 16 px, 4 grey ones of 8)


def test_roi_pack_crops_are_the_whole_decodes_and_resume_exactly(packed_roi):
    from maecore.data.crop import FastRandomResizedCrop

    ds = SeededDataset(build_pretrain_dataset(packed_roi, 32))
    fast = ds.base.decoder
    assert isinstance(ds.base, PackedImages) and isinstance(fast, FastRandomResizedCrop)
    fast.roi_min_saving = 0  # 32-px images: decoded whole by default (the box's JPEG would spare too little)
    # a decoder without the known-source path: header parsed, whole image decoded, then cropped
    whole = SeededDataset(PackedImages(packed_roi / "train", decoder=lambda data: fast(data)))
    keys, full = ranks_and_resume(ds)
    assert all(torch.equal(a[0], whole[k][0]) and a[1:] == whole[k][1:] for a, k in zip(full, keys))
    loader = lambda nw: [b for b in DataLoader(ds, batch_size=8, sampler=keys, num_workers=nw)]  # noqa: E731
    for a, b in zip(loader(0), loader(2)):  # workers map the table files themselves
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_roi_record_damaged_after_packing_is_skipped_and_counted(packed_roi, tmp_path, caplog):
    from maecore.data.crop import FastRandomResizedCrop
    from maecore.data.jpegroi import HEAD

    copy = tmp_path / "copy"
    shutil.copytree(packed_roi / "train", copy)
    ds = PackedImages(copy)
    # record 9: its restart table points past its bytes; record 20: its entropy-coded data zeroed (same size)
    rec = ds.samples[9][0]
    path = ds.table_paths[rec.shard]
    tables = np.load(path)
    tables[rec.table + HEAD:rec.table + HEAD + int(tables[rec.table + HEAD - 1]) + 1] += rec.size
    np.save(path, tables)
    rec = ds.samples[20][0]
    header_end = int(ds.restart_table(rec)[6])
    with open(ds.shard_paths[rec.shard], "r+b") as f:
        f.seek(rec.offset + header_end)
        f.write(b"\0" * (rec.size - header_end))
    fast = FastRandomResizedCrop(32)
    fast.roi_min_saving = 0  # always the box's JPEG, as on big images
    ds = PackedImages(copy, decoder=fast)
    for i in (9, 20):
        img, target, skipped = ds[i]
        assert skipped == 1 and target == ds.targets[i + 1] and img.shape == (3, 32, 32)
        assert f"{ds.samples[i][0].key}.jpg" in caplog.text
    assert "restart" in caplog.text
    s = ResumableSampler(len(ds), True, seed=0)
    assert sum(SeededDataset(ds)[k][2] for k in s) == 2  # counted once each per epoch, as n_skipped
    # a table file cut short or gone: the dataset is refused with one line at open
    np.save(path, tables[:-3])
    with pytest.raises(UserError, match="restart tables"):
        PackedImages(copy)
    path.unlink()
    with pytest.raises(UserError, match="restart tables"):
        PackedImages(copy)


def test_a_pack_made_before_the_size_columns_reads_as_before(packed, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(packed / "train", old)
    index = json.loads((old / INDEX_NAME).read_text())
    for c in ("width", "height", "format", "mode"):
        del index["samples"][c]
    (old / INDEX_NAME).write_text(json.dumps(index))
    ds = SeededDataset(build_pretrain_dataset(old, 32))
    assert all(r.kind == 0 and r.width == 0 and r.table == -1 for r, _ in ds.base.samples)
    new = SeededDataset(build_pretrain_dataset(packed / "train", 32))
    assert all(r.kind and (r.width, r.height) == (32, 32) for r, _ in new.base.samples)
    ks = [(i, 7919 * i + 1) for i in range(56)]
    assert all(torch.equal(ds[k][0], new[k][0]) and ds[k][1:] == new[k][1:] for k in ks)  # the header path, the same crops
    index["samples"]["width"] = index["samples"]["height"] = [32] * 56  # half the size columns: refused
    (old / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(UserError, match="inconsistent"):
        PackedImages(old)


# ---- CRC-32 per record (#24) -----------------------------------------------------------------------------
def flip_still_decodable(ds: PackedImages, i: int) -> bytes:
    """Damage record ``i`` in place the way a bad sector or a bit rot would, and so that it still decodes: one
    byte of its entropy-coded data (past the header, neither 0xFF nor next to one, so no marker appears or
    goes) XOR 0x10.  Returns the damaged bytes."""
    from maecore.data.images import load_rgb

    rec = ds.samples[i][0]
    data = bytearray(record_bytes(ds, i))
    sos = data.index(b"\xff\xda")  # start of scan: the entropy-coded data follows its header
    at = next(j for j in range(sos + 20, len(data) - 4) if 0xFF not in data[j - 1:j + 2] and data[j] ^ 0x10 != 0xFF)
    data[at] ^= 0x10
    with open(ds.shard_paths[rec.shard], "r+b") as f:
        f.seek(rec.offset + at)
        f.write(data[at:at + 1])
    assert np.asarray(load_rgb(bytes(data))).shape == (32, 32, 3)  # it decodes: only the checksum can tell
    return bytes(data)


def test_a_damaged_record_that_still_decodes_is_skipped_and_counted(packed, tmp_path, caplog):
    from maecore.data.images import load_rgb
    from maecore.data.packed.index import ChecksumError

    copy = tmp_path / "copy"
    shutil.copytree(packed / "train", copy)
    index = json.loads((copy / INDEX_NAME).read_text())
    crcs = index["samples"]["crc32"]
    assert len(crcs) == 56 and all(isinstance(c, int) and 0 <= c < 2**32 for c in crcs)
    ds = PackedImages(copy)
    assert [r.crc for r, _ in ds.samples] == crcs and all(zlib.crc32(record_bytes(ds, i)) == c for i, c in enumerate(crcs))
    clean = np.asarray(load_rgb(record_bytes(ds, 9)))
    damaged = flip_still_decodable(ds, 9)
    assert not np.array_equal(np.asarray(load_rgb(damaged)), clean)  # garbage pixels, silently, without the check
    with pytest.raises(ChecksumError, match="CRC-32"):
        record_bytes(PackedImages(copy), 9)
    for ds in (PackedImages(copy, pretrain_transform(32)), build_pretrain_dataset(copy, 32)):  # official and fast decoders
        caplog.clear()
        img, target, skipped = ds[9]
        assert skipped == 1 and target == ds.targets[10]
        assert f"{ds.samples[9][0].key}.jpg" in caplog.text and "CRC-32" in caplog.text and "skipping unreadable image" in caplog.text
        s = ResumableSampler(len(ds), True, seed=0)
        assert sum(SeededDataset(ds)[k][2] for k in s) == 1  # counted once per epoch, as n_skipped
    # the same pack without the column (made before it): the damaged record is read, as it always was
    del index["samples"]["crc32"]
    (copy / INDEX_NAME).write_text(json.dumps(index))
    ds = PackedImages(copy, pretrain_transform(32))
    assert ds[9][2] == 0 and record_bytes(ds, 9) == damaged


def test_a_pack_made_before_the_crc_column_reads_as_before(packed, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(packed / "train", old)
    index = json.loads((old / INDEX_NAME).read_text())
    del index["samples"]["crc32"]
    (old / INDEX_NAME).write_text(json.dumps(index))
    ds, new = SeededDataset(build_pretrain_dataset(old, 32)), SeededDataset(build_pretrain_dataset(packed / "train", 32))
    assert all(r.crc == -1 for r, _ in ds.base.samples) and all(r.crc >= 0 for r, _ in new.base.samples)
    ks = [(i, 7919 * i + 1) for i in range(56)]
    assert all(torch.equal(ds[k][0], new[k][0]) and ds[k][1:] == new[k][1:] for k in ks)
    for bad in ([1] * 55, [-1] * 56, ["0"] * 56, [2**32] * 56):  # a damaged column: refused with one line
        index["samples"]["crc32"] = bad
        (old / INDEX_NAME).write_text(json.dumps(index))
        with pytest.raises(UserError, match="crc32"):
            PackedImages(old)


def test_verify_a_clean_and_a_damaged_pack(packed, packed_roi, tmp_path, capsys):
    from maecore.data.jpegroi import HEAD
    from maecore.data.packed.cli import cli, main

    for clean in (packed, packed_roi):
        assert main(["--verify", str(clean)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert [x.split(":")[0] for x in out] == [str(clean / "train"), str(clean / "val")] and all("all as indexed" in x for x in out)
        assert "56 records in" in out[0] and "every record's CRC-32" in out[0] and ("restart tables" in out[0]) == (clean == packed_roi)
    bad = tmp_path / "bad"
    shutil.copytree(packed_roi, bad)
    ds = PackedImages(bad / "train")
    flip_still_decodable(ds, 9)
    rec = ds.samples[30][0]  # a restart table shifted by one byte: a record that decodes, cut at the wrong places
    path = ds.table_paths[rec.shard]
    tables = np.load(path)
    tables[rec.table + HEAD:rec.table + HEAD + int(tables[rec.table + HEAD - 1]) + 1] += 1
    np.save(path, tables)
    val = PackedImages(bad / "val")
    last = val.shard_paths[-1]
    last.write_bytes(last.read_bytes()[:-1024])  # the last tar's end-of-archive blocks cut: a size mismatch
    p = forkserver.run([sys.executable, "-m", "maecore.data.packed", "--verify", str(bad)], cwd=ROOT, env=env(),
                       timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"error: {bad}: 3 problems in the packed dataset: ") and "CRC-32" in p.stderr, p.stderr
    out = p.stdout
    assert f"{ds.samples[9][0]}: CRC-32" in out and f"{rec}: its restart table" in out and f"{last}: " in out and "bytes" in out
    assert "train: 56 records in" in out and ": 2 problems" in out and "val: 14 records in" in out and ": 1 problem" in out
    # a pack made before the checksums: every record decoded instead, and a note says so
    old = tmp_path / "old"
    shutil.copytree(packed / "val", old)
    index = json.loads((old / INDEX_NAME).read_text())
    del index["samples"]["crc32"]
    (old / INDEX_NAME).write_text(json.dumps(index))
    assert main(["--verify", str(old)]) == 0
    out = capsys.readouterr().out
    assert "that every record decodes" in out and "all as indexed" in out and "no per-record checksums" in out
    assert "--verify DST" in _error(cli, ["--verify", old, tmp_path / "x"], capsys)
    assert "not a packed dataset" in _error(cli, ["--verify", tmp_path], capsys)


def test_both_packing_commands_pack_and_verify(tmp_path):
    """``python -m maecore.data.packed`` and its thin entry point ``tools/pack_dataset.py`` are one command: the same
    help, and a folder packed through the script verifies through the module."""
    helps = [forkserver.run(cmd, cwd=ROOT, env=env(), timeout=120)
             for cmd in ([sys.executable, "-m", "maecore.data.packed", "--help"], [sys.executable, "tools/pack_dataset.py", "--help"])]
    assert all(p.returncode == 0 and "--verify" in p.stdout and "--roi" in p.stdout for p in helps), [p.stderr for p in helps]
    assert helps[0].stdout == helps[1].stdout
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (60 * i, 90, 120)).save(src / f"{i}.jpg")
    p = forkserver.run([sys.executable, "tools/pack_dataset.py", str(src), str(tmp_path / "dst"), "--workers", "0"], cwd=ROOT,
                       env=env(), timeout=120)
    assert p.returncode == 0 and "3 images (no classes)" in p.stdout, p.stderr
    p = forkserver.run([sys.executable, "-m", "maecore.data.packed", "--verify", str(tmp_path / "dst")], cwd=ROOT, env=env(),
                       timeout=120)
    assert p.returncode == 0 and "3 records in 1 shard" in p.stdout and "all as indexed" in p.stdout, p.stderr
