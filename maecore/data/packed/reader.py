"""Reading a packed dataset: :class:`PackedImages`, random access by index (the sampler's permutation, rank
shards and exact mid-epoch resume work unchanged), and :func:`iter_tar_samples`, a shard read in sequence.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from maecore.data import jpegroi
from maecore.data.crop import jpeg_kind
from maecore.data.images import ImageFiles, check_dir
from maecore.data.packed.index import CRC_COLUMN, INDEX_NAME, ChecksumError, Record, read_index, split_dir
from maecore.errors import UserError

_PREAD = hasattr(os, "pread")


class NamedBytes(bytes):
    """Encoded image bytes that carry their record's name (for the warnings of ``maecore.data.images``)."""

    name: str

    def __new__(cls, data: bytes, name: str) -> NamedBytes:
        obj = super().__new__(cls, data)
        obj.name = name
        return obj


class PackedImages(ImageFiles):
    """A packed folder as an :class:`~maecore.data.images.ImageFiles`: the same ``samples`` (here ``(Record,
    target)``), ``classes``, ``targets``, transforms and skip-and-count of unreadable samples (``load``);
    only :meth:`read` differs (bytes from the shard, decoded by the same protected loader or ``decoder``).

    File handles: a shard is opened on its first read and kept; reads are ``os.pread`` (one system call, no
    file position), so a copy made by fork may share its parent's handles, and a pickled copy opens its own
    (without ``pread``: each process opens its own, never sharing a file position).  A ``--roi`` pack's table
    files are memory-mapped the same way, read-only."""

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        draft_size: tuple[int, int] | None = None,
        decoder: Callable[[bytes], Any] | None = None,
    ) -> None:
        folder = split_dir(root)
        if folder is None:
            raise UserError(f"{check_dir(root)} is not a packed dataset (no {INDEX_NAME})")
        self.root = folder
        self.transform = transform
        self.draft_size = draft_size
        self.decoder = decoder
        index = read_index(folder)
        self.shard_paths: list[Path] = []
        for s in index["shards"]:
            path = folder / s["name"]
            if not path.is_file():
                raise UserError(f"{path}: shard listed in {INDEX_NAME} is missing")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise UserError(f"{path}: {size} bytes, the index records {s['bytes']}: a truncated or replaced shard (pack it again)")
            self.shard_paths.append(path)
        self.table_paths: list[Path | None] = []
        for s in index["shards"]:
            t = s.get("tables")
            self.table_paths.append(None if t is None else folder / t["name"])
            if t is not None:
                tpath = folder / t["name"]
                try:
                    shape = np.load(tpath, mmap_mode="r").shape
                except (OSError, ValueError) as e:
                    raise UserError(f"{tpath}: restart tables listed in {INDEX_NAME} unreadable ({e}): pack it again") from None
                if shape != (t["ints"],):
                    raise UserError(f"{tpath}: restart tables of shape {shape}, the index records {t['ints']} ints (pack it again)")
        names = [str(p) for p in self.shard_paths]
        cols = index["samples"]
        n = len(cols["key"])
        meta = zip(cols["width"], cols["height"], (jpeg_kind(f, m) for f, m in zip(cols["format"], cols["mode"])),
                   cols.get("roi", [-1] * n)) if "width" in cols else [(0, 0, 0, -1)] * n
        self.samples = [
            (Record(sh, off, size, key, ext, names[sh], *m, crc), label)
            for sh, key, off, size, ext, label, m, crc in zip(cols["shard"], cols["key"], cols["offset"], cols["size"], cols["ext"],
                                                              cols["label"], meta, cols.get(CRC_COLUMN, [-1] * n))
        ]
        self.classes = list(index["classes"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in self.samples]
        self.skipped_at_pack = int(index.get("skipped", {}).get("count", 0))
        self._pid: int | None = None
        self._handles: dict[int, BinaryIO] = {}
        self._tables: dict[int, np.ndarray] = {}

    def read_bytes(self, record: Record) -> bytes:
        """The image member's bytes; a short read (a shard cut after the check) or bytes that do not match their
        CRC-32 (:class:`ChecksumError`) are an ``OSError``, i.e. an unreadable sample, skipped and counted like any
        other."""
        if _PREAD:  # one system call, no file position: a handle inherited by a forked copy is safe to share
            f = self._handles.get(record.shard)
            if f is None:
                f = self._handles[record.shard] = open(self.shard_paths[record.shard], "rb", buffering=0)  # noqa: SIM115 (kept open)
                self._pid = os.getpid()
            data = os.pread(f.fileno(), record.size, record.offset)
        else:  # pragma: no cover - platforms without pread
            if self._pid != os.getpid():  # a forked or unpickled copy: never share an inherited file position
                self._handles, self._pid = {}, os.getpid()
            f = self._handles.get(record.shard)
            if f is None:
                f = self._handles[record.shard] = open(self.shard_paths[record.shard], "rb")  # noqa: SIM115 (kept open)
            f.seek(record.offset)
            data = f.read(record.size)
        if len(data) != record.size:
            raise OSError(f"read {len(data)} of {record.size} bytes: the shard is shorter than its index says")
        if record.crc >= 0 and (crc := zlib.crc32(data)) != record.crc:
            raise ChecksumError(f"CRC-32 {crc:08x}, the index records {record.crc:08x}: damaged after packing")
        return data

    def restart_table(self, record: Record) -> np.ndarray:
        """The record's restart table (a view of its shard's memory-mapped table file, opened once per process)."""
        tables = self._tables.get(record.shard)
        if tables is None:
            path = self.table_paths[record.shard]
            if path is None:
                raise OSError(f"{record}: a restart table in a shard without a table file")
            tables = self._tables[record.shard] = np.load(path, mmap_mode="r").view(np.ndarray)
        head = tables[record.table:record.table + jpegroi.HEAD]
        n = int(head[-1]) if len(head) == jpegroi.HEAD else -1
        if n < 1 or record.table + jpegroi.HEAD + n + 1 > len(tables):
            raise OSError(f"{record}: its restart table does not fit in {self.table_paths[record.shard]}")
        return tables[record.table:record.table + jpegroi.HEAD + n + 1]

    def read(self, source: Record) -> Any:
        data = self.read_bytes(source)
        known = getattr(self.decoder, "decode_known", None) if source.kind else None
        if known is None:  # no decoder that uses what the index knows, or an older pack: decoded from the bytes alone
            return self.decode(data)
        return known(data, source.width, source.height, source.kind, self.restart_table(source) if source.table >= 0 else None)

    def image_bytes(self, index: int) -> NamedBytes:
        """Sample ``index``'s encoded image, named by its record (figures read these with ``try_load_rgb``)."""
        record = self.samples[index][0]
        return NamedBytes(self.read_bytes(record), str(record))

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._handles.values():
                f.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"], state["_tables"], state["_pid"] = {}, {}, None  # files do not pickle; the copy opens its own
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to tidy
            pass



def iter_tar_samples(shard: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a shard, read in sequence the way webdataset groups members
    (consecutive members sharing a key: the name up to the first dot of its base name)."""
    with tarfile.open(shard) as tar:
        key: str | None = None
        group: dict[str, bytes] = {}
        for m in tar:
            f = tar.extractfile(m) if m.isfile() else None
            if f is None:
                continue
            head, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            k = f"{head}/{stem}" if head else stem
            if k != key and key is not None:
                yield key, group
                group = {}
            key = k
            group[ext] = f.read()
        if key is not None:
            yield key, group
