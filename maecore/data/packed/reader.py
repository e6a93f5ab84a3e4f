"""Reading a packed dataset: :class:`PackedImages`, random access by index (the sampler's permutation, rank
shards and exact mid-epoch resume work unchanged), from a local folder or a remote one (a
:class:`~maecore.data.packed.store.Store`), and :func:`iter_tar_samples`, a shard read in sequence.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maecore.data import jpegroi
from maecore.data.crop import jpeg_kind
from maecore.data.images import ImageFiles, check_dir
from maecore.data.packed.index import CRC_COLUMN, INDEX_NAME, ChecksumError, Record, is_url
from maecore.data.packed.remote import RemoteOptions, open_split
from maecore.data.packed.store import LocalStore, Range, Store
from maecore.errors import UserError


class NamedBytes(bytes):
    """Encoded image bytes that carry their record's name (for the warnings of ``maecore.data.images``)."""

    name: str

    def __new__(cls, data: bytes, name: str) -> NamedBytes:
        obj = super().__new__(cls, data)
        obj.name = name
        return obj


def _table_lengths(index: dict[str, Any]) -> list[int]:
    """Each sample's restart-table length (0: none): a shard's tables lie one after the other in its samples' order,
    so one ends where the next begins, the last at the table file's end."""
    cols, shards = index["samples"], index["shards"]
    ats = cols.get("roi")
    if ats is None:
        return [0] * len(cols["key"])
    lengths = [0] * len(ats)
    last: dict[int, int] = {}  # shard -> the sample whose table comes last so far
    for i, (sh, at) in enumerate(zip(cols["shard"], ats)):
        if at >= 0:
            if sh in last:
                lengths[last[sh]] = at - ats[last[sh]]
            last[sh] = i
    for sh, i in last.items():
        lengths[i] = shards[sh]["tables"]["ints"] - ats[i]
    return lengths


class PackedImages(ImageFiles):
    """A packed folder as an :class:`~maecore.data.images.ImageFiles`: the same ``samples`` (here ``(Record,
    target)``), ``classes``, ``targets``, transforms and skip-and-count of unreadable samples (``load``);
    only :meth:`read` differs (bytes from the shard, decoded by the same protected loader or ``decoder``).

    ``root``: a packed folder (or its index file), a URL of one (:mod:`maecore.data.packed.remote`, read as
    ``remote`` says), or a :class:`~maecore.data.packed.store.Store`.  The store opens its files or connections in
    each process on first use (a forked or pickled copy opens its own).  A batch's records are handed to the store
    before they are read (:meth:`__getitems__`), so a remote store fetches them ahead, in the sampler's order."""

    def __init__(
        self,
        root: str | Path | Store,
        transform: Callable[[Image.Image], Any] | None = None,
        draft_size: tuple[int, int] | None = None,
        decoder: Callable[[bytes], Any] | None = None,
        remote: RemoteOptions | None = None,
    ) -> None:
        store = root if isinstance(root, Store) else open_split(root, remote)
        if store is None:
            if is_url(root):
                raise UserError(f"{root} is not a packed dataset (no {INDEX_NAME} there)")
            raise UserError(f"{check_dir(root)} is not a packed dataset (no {INDEX_NAME})")
        self.store = store
        self.root = store.folder if isinstance(store, LocalStore) else store.where
        self.transform = transform
        self.draft_size = draft_size
        self.decoder = decoder
        index = store.index()
        self.shard_files: list[str] = []
        self.table_files: list[str | None] = []
        for s in index["shards"]:
            store.check_shard(s["name"], s["bytes"])
            self.shard_files.append(s["name"])
            t = s.get("tables")
            self.table_files.append(None if t is None else t["name"])
            if t is not None:
                store.check_tables(t["name"], t["ints"])
        # local paths (tests and tools open them), or the URLs of a remote pack's files
        self.shard_paths: list[Any] = [store.path(f) for f in self.shard_files]
        self.table_paths: list[Any] = [None if f is None else store.path(f) for f in self.table_files]
        names = [str(p) for p in self.shard_paths]
        cols = index["samples"]
        n = len(cols["key"])
        meta = zip(cols["width"], cols["height"], (jpeg_kind(f, m) for f, m in zip(cols["format"], cols["mode"])),
                   cols.get("roi", [-1] * n)) if "width" in cols else [(0, 0, 0, -1)] * n
        crcs, lengths = cols.get(CRC_COLUMN, [-1] * n), _table_lengths(index)
        self.samples = [
            (Record(sh, off, size, key, ext, names[sh], *m, crc, tl), label)
            for sh, key, off, size, ext, label, m, crc, tl in zip(cols["shard"], cols["key"], cols["offset"], cols["size"], cols["ext"],
                                                                  cols["label"], meta, crcs, lengths)
        ]
        self.classes = list(index["classes"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in self.samples]
        self.skipped_at_pack = int(index.get("skipped", {}).get("count", 0))
        self.n_refetched = 0  # records read again after a failed checksum (this process)
        self._npy: dict[int, int] = {}  # shard -> where its table file's data starts (read once per process)

    def _range(self, record: Record) -> Range:
        return self.shard_files[record.shard], record.offset, record.size

    def read_bytes(self, record: Record) -> bytes:
        """The image member's bytes; a short read (a shard cut after the check) or bytes that do not match their
        CRC-32 (:class:`ChecksumError`), also when read a second time, are an ``OSError``, i.e. an unreadable sample,
        skipped and counted like any other."""
        file, offset, size = self._range(record)
        data = self.store.read(file, offset, size)
        if record.crc >= 0 and len(data) == size and zlib.crc32(data) != record.crc:
            self.n_refetched += 1  # damaged on its way or in a cache: fetched once more, from the source
            data = self.store.read(file, offset, size, fresh=True)
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes: the shard is shorter than its index says")
        if record.crc >= 0:
            if (crc := zlib.crc32(data)) != record.crc:
                raise ChecksumError(f"CRC-32 {crc:08x}, the index records {record.crc:08x}: damaged after packing")
            self.store.keep(file, offset, data)
        return data

    def _table_range(self, record: Record) -> Range:
        file = self.table_files[record.shard]
        if file is None:
            raise OSError(f"{record}: a restart table in a shard without a table file")
        at = self._npy.get(record.shard)
        if at is None:
            at = self._npy[record.shard] = self.store.npy_offset(file)
        return file, at + 4 * record.table, 4 * record.table_ints

    def restart_table(self, record: Record) -> np.ndarray:
        """The record's restart table (a byte range of its shard's table file)."""
        file, offset, size = self._table_range(record)
        tables = np.frombuffer(self.store.read(file, offset, size), dtype="<i4")
        n = int(tables[jpegroi.HEAD - 1]) if len(tables) >= jpegroi.HEAD else -1
        if n < 1 or jpegroi.HEAD + n + 1 != len(tables) or len(tables) * 4 != size:
            raise OSError(f"{record}: its restart table does not fit in {self.store.name(file)}")
        return tables

    def _uses_tables(self, record: Record) -> bool:
        return bool(record.kind) and record.table >= 0 and getattr(self.decoder, "decode_known", None) is not None

    def read(self, source: Record) -> Any:
        data = self.read_bytes(source)
        known = getattr(self.decoder, "decode_known", None) if source.kind else None
        if known is None:  # no decoder that uses what the index knows, or an older pack: decoded from the bytes alone
            return self.decode(data)
        return known(data, source.width, source.height, source.kind, self.restart_table(source) if source.table >= 0 else None)

    def prefetch(self, indices: Sequence[int]) -> None:
        """Hand the store the byte ranges of these samples (and their restart tables), in the order they are read next."""
        ranges: list[Range] = []
        for i in indices:
            record = self.samples[i % len(self.samples)][0]
            ranges.append(self._range(record))
            if self._uses_tables(record):
                try:
                    ranges.append(self._table_range(record))
                except OSError:
                    pass  # the read says so, for this record alone
        self.store.prefetch(ranges)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch (what a DataLoader worker asks for at once): its records fetched ahead, then read in order."""
        self.prefetch(indices)
        return [self[i] for i in indices]

    def image_bytes(self, index: int) -> NamedBytes:
        """Sample ``index``'s encoded image, named by its record (figures read these with ``try_load_rgb``)."""
        record = self.samples[index][0]
        return NamedBytes(self.read_bytes(record), str(record))

    def close(self) -> None:
        self.store.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_npy": {}}


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
