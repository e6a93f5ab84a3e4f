"""Packed datasets over HTTP (maecore.data.packed.remote) against a real nginx on a loopback port: the same bytes,
batches and losses as the pack on disk (pretraining and classification, resume included), a server restarted
mid-epoch, slow answers, a server down for good (one error line, exit 2), checksum failures refetched then skipped,
the bounded cache.  Skipped, saying why, where nginx is missing or cannot start."""

from __future__ import annotations

import shutil
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from maecore.data.packed.reader import PackedImages
from maecore.data.packed.remote import RemoteOptions, spans
from maecore.data.packed.serve import LocalNginx, NginxUnavailable
from maecore.data.packed.writer import pack
from maecore.data.sampler import ResumableSampler, SeededDataset
from maecore.engine import read_log
from maecore.errors import UserError
from pretrain.data import build_pretrain_dataset

TINY = ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--input_size", "32", "--decoder_depth", "1",
        "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--no_progress",
        "--vis_every", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "1"]
FAST = RemoteOptions(retries=8, backoff=0.05, timeout=5.0)  # quick retries: a test's outage lasts a fraction of a second


def server(root: Path, scratch: Path, extra: str = "") -> LocalNginx:
    try:
        return LocalNginx(root, scratch, extra).start()
    except NginxUnavailable as e:
        pytest.skip(f"no local HTTP server for these tests: {e}")


@pytest.fixture(scope="module")
def pack_root(tiny_world, tmp_path_factory) -> Path:
    """A folder holding ``imagenet/`` (train/ and val/), the tiny world packed in several small shards."""
    root = tmp_path_factory.mktemp("served")
    pack(tiny_world["imagenet"], root / "imagenet", shard_size=8 * 1024, say=lambda _m: None)
    return root


@pytest.fixture(scope="module")
def nginx(pack_root, tmp_path_factory):
    srv = server(pack_root, tmp_path_factory.mktemp("nginx"))
    yield srv
    srv.stop()


def batches(ds, workers: int, batch_size: int = 8, start: int = 0) -> list:
    sampler = ResumableSampler(len(ds), True, seed=3)
    sampler.set_epoch(1, start=start)
    loader = DataLoader(SeededDataset(ds), batch_size=batch_size, sampler=sampler, num_workers=workers)
    return list(loader)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


def test_coalescing_merges_near_ranges_of_one_file():
    got = list(spans([("a", 0, 10), ("b", 5, 5), ("a", 20, 10), ("a", 1000, 10)], gap=10, max_span=100))
    assert got == [("a", 0, 30, [("a", 0, 10), ("a", 20, 10)]), ("a", 1000, 1010, [("a", 1000, 10)]), ("b", 5, 10, [("b", 5, 5)])]
    assert len(list(spans([("a", 0, 60), ("a", 60, 60)], gap=10, max_span=100))) == 2  # no request over max_span


def test_http_records_batches_and_resume_are_the_local_packs(pack_root, nginx):
    local, remote = PackedImages(pack_root / "imagenet/train"), PackedImages(f"{nginx.url}/imagenet/train")
    assert remote.classes == local.classes and remote.targets == local.targets and len(remote) == len(local) == 56
    assert all(remote.read_bytes(r) == local.read_bytes(q) for (r, _), (q, _) in zip(remote.samples, local.samples))
    assert str(remote.samples[0][0]).startswith(f"{nginx.url}/imagenet/train/shard-000000.tar:")
    # the fast decoder, batches from worker processes, and a resume mid-epoch: as from disk
    local, remote = (build_pretrain_dataset(p, 32) for p in (pack_root / "imagenet", f"{nginx.url}/imagenet"))
    ref = batches(local, 0)
    assert same(batches(remote, 2), ref) and same(batches(remote, 0, start=24), ref[3:])
    before = len(nginx.access_log())
    keys = [(i, 7 * i) for i in range(14)]  # in order: neighbouring records coalesced
    got, want = SeededDataset(remote).__getitems__(keys), [SeededDataset(local)[k] for k in keys]
    assert all(torch.equal(g[0], w[0]) and g[1:] == w[1:] for g, w in zip(got, want))
    assert len(nginx.access_log()) - before < 14


def test_http_roi_pack_reads_its_restart_tables_by_range(tiny_world, tmp_path):
    from maecore.data.crop import FastRandomResizedCrop

    pack(tiny_world["imagenet"] / "val", tmp_path / "www/roi", shard_size=8 * 1024, roi="mcu", say=lambda _m: None)
    srv = server(tmp_path / "www", tmp_path / "nginx")
    try:
        fast = FastRandomResizedCrop(32)
        fast.roi_min_saving = 0  # always the box's JPEG, as on big images
        local, remote = PackedImages(tmp_path / "www/roi", decoder=fast), PackedImages(f"{srv.url}/roi", decoder=fast)
        assert all(r.table >= 0 for r, _ in remote.samples)
        assert all((remote.restart_table(r) == local.restart_table(q)).all() for (r, _), (q, _) in zip(remote.samples, local.samples))
        keys = [(i, 11 * i) for i in range(14)][::-1]
        got, want = SeededDataset(remote).__getitems__(keys), [SeededDataset(local)[k] for k in keys]
        assert all(torch.equal(g[0], w[0]) and g[1:] == w[1:] for g, w in zip(got, want))
    finally:
        srv.stop()


def test_fsspec_store_reads_the_same_records(pack_root):
    """s3:// gs:// … go through fsspec's filesystems: its in-memory one (always there) stands in for them."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for p in (pack_root / "imagenet/val").iterdir():
        fs.pipe_file(f"memory://mae-test-pack/val/{p.name}", p.read_bytes())
    with pytest.raises(UserError, match="no packed dataset at memory://mae-test-pack: neither .*/packed-index.json nor .*/train/"):
        build_pretrain_dataset("memory://mae-test-pack", 32)  # pretraining reads the pack itself or a root's train/
    local, remote = (build_pretrain_dataset(p, 32) for p in (pack_root / "imagenet/val", "memory://mae-test-pack/val"))
    assert type(remote.store).__name__ == "FsspecStore" and remote.targets == local.targets
    assert same(batches(remote, 1, batch_size=7), batches(local, 0, batch_size=7))
    fs.rm("memory://mae-test-pack", recursive=True)


def test_monitor_reads_a_remote_root(pack_root, nginx):
    from maecore.monitor.subset import MonitorSubset

    local, remote = (MonitorSubset(p, 32, 14, 7) for p in (pack_root / "imagenet", f"{nginx.url}/imagenet"))
    for m in (local, remote):
        m.load()
    assert remote.classes == local.classes and remote.bank.indices == local.bank.indices
    assert torch.equal(remote.bank.images, local.bank.images) and torch.equal(remote.queries.images, local.queries.images)


def test_http_server_restarted_mid_epoch(pack_root, tmp_path):
    srv = server(pack_root, tmp_path / "nginx")
    try:
        local = build_pretrain_dataset(pack_root / "imagenet", 32)
        remote = build_pretrain_dataset(f"{srv.url}/imagenet", 32, remote=FAST)
        sampler = ResumableSampler(len(local), True, seed=3)
        ref = list(DataLoader(SeededDataset(local), batch_size=4, sampler=sampler))
        it = iter(DataLoader(SeededDataset(remote), batch_size=4, sampler=sampler, num_workers=2, prefetch_factor=1))
        got = [next(it), next(it)]
        srv.stop()  # down while the workers have batches left to fetch
        restart = threading.Timer(0.6, srv.start)
        restart.start()
        got += list(it)  # refused connections retried with backoff until it is back
        restart.join()
        assert same(got, ref)
    finally:
        srv.stop()


def test_http_slow_answers_are_fetched_ahead(pack_root, tmp_path):
    # past its first 1 kB nginx sends a ~1.4 kB record at 1 kB/s: about a second each, whatever the machine's load
    srv = server(pack_root, tmp_path / "nginx", "location ~ \\.tar$ { limit_rate 1k; }")
    try:
        local = PackedImages(pack_root / "imagenet/val")
        remote = PackedImages(f"{srv.url}/imagenet/val", remote=RemoteOptions(threads=16, gap=0))  # gap 0: no coalescing
        t0 = time.monotonic()
        assert remote.read_bytes(remote.samples[0][0]) == local.read_bytes(local.samples[0][0])
        one = time.monotonic() - t0
        order = list(range(len(local)))[::-1]
        t0 = time.monotonic()
        assert remote.__getitems__(order) == [local[i] for i in order]  # slow, not failed: no timeout, no retry
        assert one > 0.5 and time.monotonic() - t0 < 4 * one  # 14 records in flight at once, not one after another
        impatient = PackedImages(f"{srv.url}/imagenet/val", remote=RemoteOptions(timeout=0.2, retries=1, backoff=0.05))
        with pytest.raises(UserError, match=r"shard-000000.tar: no answer after 2 tries in .*TimeoutError"):
            impatient.read_bytes(impatient.samples[0][0])  # timed out, tried again, then one line naming the URL
    finally:
        srv.stop()


def test_http_server_down_for_good_is_one_error_line(pack_root, tmp_path, capsys, monkeypatch):
    from pretrain.train import cli

    monkeypatch.setenv("MAE_REMOTE_RETRIES", "2")
    monkeypatch.setenv("MAE_REMOTE_BACKOFF", "0.05")

    def run(url: str, *extra: str) -> str:
        with pytest.raises(SystemExit) as e:
            cli([*TINY, "--data_path", url, "--output_dir", str(tmp_path / "out"), "--epochs", "1", "--overwrite", *extra])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "Traceback" not in err, err
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err

    srv = server(pack_root, tmp_path / "nginx", "location ~ \\.tar$ { return 503; }")  # the index answers, the shards never
    try:
        err = run(f"{srv.url}/imagenet", "--num_workers", "1")  # raised in a DataLoader worker
        assert f"{srv.url}/imagenet/train/shard-" in err and "no answer after 3 tries" in err and "503" in err, err
    finally:
        srv.stop()
    err = run(f"{srv.url}/imagenet", "--num_workers", "0")  # nothing listens there any more
    assert f"{srv.url}/imagenet/packed-index.json: no answer after 3 tries" in err and "ConnectionRefusedError" in err, err
    if not _has("s3fs"):  # an object store whose fsspec backend is not installed
        err = run("s3://bucket/pack")
        assert err.startswith("error: s3://bucket/pack: reading s3:// needs fsspec and its s3 backend"), err


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_http_checksum_failure_fetched_again_then_skipped_and_counted(pack_root, tmp_path, caplog):
    shutil.copytree(pack_root / "imagenet/val", tmp_path / "www/val")
    local = PackedImages(tmp_path / "www/val")
    rec = local.samples[3][0]
    with open(local.shard_paths[rec.shard], "r+b") as f:  # damaged on the server, same size
        f.seek(rec.offset + rec.size // 2)
        f.write(b"\xa5" * 8)
    srv = server(tmp_path / "www", tmp_path / "nginx")
    try:
        remote = build_pretrain_dataset(f"{srv.url}/val", 32)
        img, target, skipped = remote[3]
        assert skipped == 1 and target == remote.targets[4] and remote.n_refetched == 1
        assert "CRC-32" in caplog.text and f"{srv.url}/val/{local.shard_files[rec.shard]}:{rec.key}.jpg" in caplog.text
        want = f"bytes={rec.offset}-{rec.offset + rec.size - 1}"
        assert sum(line.endswith(want) for line in srv.access_log()) == 2  # fetched once more, then skipped
        s = ResumableSampler(len(remote), True, seed=0)
        assert sum(SeededDataset(remote)[k][2] for k in s) == 1  # counted once per epoch, as n_skipped
    finally:
        srv.stop()


def test_http_cache_serves_later_epochs_and_stays_bounded(pack_root, nginx, tmp_path):
    url, cache = f"{nginx.url}/imagenet/val", tmp_path / "cache"
    local = PackedImages(pack_root / "imagenet/val")
    sizes = [r.size for r, _ in local.samples]
    remote = PackedImages(url, remote=RemoteOptions(cache_dir=str(cache), cache_size=sum(sizes[:5])))
    assert remote.__getitems__(list(range(14))) == [local[i] for i in range(14)]
    kept = sorted(p for p in cache.rglob("*-*") if p.is_file())
    assert len(kept) == 5 and sum(p.stat().st_size for p in kept) <= sum(sizes[:5])  # full: no more taken
    remote = PackedImages(url, remote=RemoteOptions(cache_dir=str(cache), cache_size=1 << 30))
    remote.__getitems__(list(range(14)))  # the rest is cached now
    before = len(nginx.access_log())
    assert remote.__getitems__(list(range(14))) == [local[i] for i in range(14)]
    assert len(nginx.access_log()) == before  # every record from the cache
    kept = sorted(p for p in cache.rglob("*-*") if p.is_file())
    kept[0].write_bytes(b"\0" * kept[0].stat().st_size)  # a damaged cache entry: fetched again, not skipped
    fresh = PackedImages(url, remote=RemoteOptions(cache_dir=str(cache), cache_size=1 << 30))
    assert [fresh[i][2] for i in range(14)] == [0] * 14 and fresh.n_refetched == 1
    assert all(zlib.crc32(p.read_bytes()) in {r.crc for r, _ in local.samples} for p in kept)


@pytest.mark.slow
def test_pretraining_and_classification_over_http_log_the_losses_of_the_disk_pack(pack_root, nginx, tmp_path):
    from classification.train import main as classification_main
    from pretrain.train import main as pretrain_main

    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_log(out, "train")}

    # a sample's crop is seeded by (seed, epoch, index): the same with or without workers (and workers cost ~2 s a run)
    run = [*TINY, "--epochs", "1", "--save_every_steps", "2", "--seed", "0", "--max_steps", "4"]
    pretrain_main([*run, "--data_path", str(pack_root / "imagenet"), "--output_dir", str(tmp_path / "disk"), "--num_workers", "0"])
    url, http = f"{nginx.url}/imagenet", ["--output_dir", str(tmp_path / "http"), "--cache_dir", str(tmp_path / "cache")]
    pretrain_main([*run[:-1], "2", "--data_path", url, *http, "--num_workers", "1"])
    pretrain_main([*run, "--data_path", url, *http, "--num_workers", "0", "--resume", "auto"])  # resumed mid-epoch
    assert len(losses(tmp_path / "disk")) == 4 and losses(tmp_path / "http") == losses(tmp_path / "disk")
    cls = ["--model", "vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32", "--batch_size", "8",
           "--no_progress", "--log_every", "1", "--seed", "0", "--epochs", "1"]
    a = classification_main([*cls, "--data_path", str(pack_root / "imagenet"), "--output_dir", str(tmp_path / "cdisk"),
                             "--num_workers", "0"])
    b = classification_main([*cls, "--data_path", url, "--output_dir", str(tmp_path / "chttp"), "--num_workers", "1"])
    assert len(losses(tmp_path / "cdisk")) == 7 and losses(tmp_path / "chttp") == losses(tmp_path / "cdisk")
    assert a["acc1"] == b["acc1"]
