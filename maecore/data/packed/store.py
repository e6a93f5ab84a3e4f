"""Where a packed dataset's files lie: the storage seam of the reader (:mod:`maecore.data.packed.reader`).

A :class:`Store` is one packed folder's files read by name: the index whole, a shard's or a table file's byte range
by (name, offset, size).  :class:`LocalStore` reads a folder on a POSIX filesystem (one ``pread`` a range); the remote
stores (:mod:`maecore.data.packed.remote`: HTTP range requests, or fsspec's object stores) read the same files over the
network, with the ranges the reader will want next fetched ahead (:meth:`Store.prefetch`).  The reader never asks
which one it has: the same samples, the same order, the same bytes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from maecore.data.packed.index import INDEX_NAME, parse_index, split_dir
from maecore.errors import UserError

Range = tuple[str, int, int]  # (file name in the packed folder, byte offset, size)
_PREAD = hasattr(os, "pread")
_NPY_HEAD = 4096  # bytes read to find where a .npy file's data starts (np.save writes a 128-byte header for 1-D arrays)


class Store:
    """The files of one packed folder.  Subclasses implement :meth:`read_file` and :meth:`read`; the others have
    defaults that do nothing (a local folder needs no read-ahead and no cache)."""

    where: str  # the folder's path or URL (what messages name)

    def name(self, file: str) -> str:
        """A file of this folder as messages name it (a path, or its URL)."""
        return f"{self.where.rstrip('/')}/{file}"

    def path(self, file: str) -> Any:
        """A file of this folder as the caller may open it itself: a local ``Path``, else its URL."""
        return self.name(file)

    def read_file(self, file: str) -> bytes | None:
        """The whole file (the index), or ``None`` when the folder has no such file."""
        raise NotImplementedError

    def read(self, file: str, offset: int, size: int, fresh: bool = False) -> bytes:
        """``size`` bytes of ``file`` from ``offset`` (fewer only where the file ends sooner).  ``fresh``: not from a
        read-ahead or a cache (a record that failed its checksum is fetched once more)."""
        raise NotImplementedError

    def index(self) -> dict[str, Any]:
        """The checked index (one-line :class:`UserError` where it is missing or damaged)."""
        text = self.read_file(INDEX_NAME)
        if text is None:
            raise UserError(f"{self.name(INDEX_NAME)}: no packed-dataset index there")
        return parse_index(text, self.name(INDEX_NAME))

    def check_shard(self, file: str, nbytes: int) -> None:
        """Refuse (:class:`UserError`) a shard that is missing or not the size its index records; a remote store checks
        each response's total length instead (no request up front)."""

    def check_tables(self, file: str, ints: int) -> None:
        """Refuse (:class:`UserError`) a restart-table file that is missing or not of the length the index records (a
        remote store: at read time, per table, instead)."""

    def npy_offset(self, file: str) -> int:
        """Where the int32 data of a ``.npy`` file (a ``--roi`` pack's restart tables) starts."""
        head = self.read(file, 0, _NPY_HEAD)
        try:
            f = io.BytesIO(head)
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        except (ValueError, EOFError) as e:
            raise OSError(f"{self.name(file)}: not a .npy file ({e})") from None
        if dtype != np.dtype("<i4") or len(shape) != 1:
            raise OSError(f"{self.name(file)}: {dtype} array of shape {shape}, not the int32 restart tables")
        return f.tell()

    def prefetch(self, ranges: Sequence[Range]) -> None:
        """Hint: these ranges are read next, in this order (a remote store starts fetching them)."""

    def keep(self, file: str, offset: int, data: bytes) -> None:
        """Hint: these bytes passed their checksum (a remote store with a cache may keep them)."""

    def close(self) -> None:
        """Let go of open files and connections (a later read opens them again)."""

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to tidy
            pass


class LocalStore(Store):
    """A packed folder on a POSIX filesystem.  A file is opened on its first read and kept; reads are ``os.pread``
    (one system call, no file position), so a copy made by fork may share its parent's handles, and a pickled copy
    opens its own (without ``pread``: each process opens its own, never sharing a file position)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where = str(folder)
        self._pid: int | None = None
        self._handles: dict[str, BinaryIO] = {}

    def name(self, file: str) -> str:
        return str(self.folder / file)

    def path(self, file: str) -> Path:
        return self.folder / file

    def read_file(self, file: str) -> bytes | None:
        path = self.folder / file
        if not path.is_file():
            return None
        try:
            return path.read_bytes()
        except OSError as e:
            raise UserError(f"{path}: unreadable ({e})") from None

    def check_shard(self, file: str, nbytes: int) -> None:
        path = self.folder / file
        if not path.is_file():
            raise UserError(f"{path}: shard listed in {INDEX_NAME} is missing")
        size = path.stat().st_size
        if size != nbytes:
            raise UserError(f"{path}: {size} bytes, the index records {nbytes}: a truncated or replaced shard (pack it again)")

    def check_tables(self, file: str, ints: int) -> None:
        path = self.folder / file
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: restart tables listed in {INDEX_NAME} unreadable ({e}): pack it again") from None
        if shape != (ints,):
            raise UserError(f"{path}: restart tables of shape {shape}, the index records {ints} ints (pack it again)")

    def read(self, file: str, offset: int, size: int, fresh: bool = False) -> bytes:
        if _PREAD:  # one system call, no file position: a handle inherited by a forked copy is safe to share
            f = self._handles.get(file)
            if f is None:
                f = self._handles[file] = open(self.folder / file, "rb", buffering=0)  # noqa: SIM115 (kept open)
                self._pid = os.getpid()
            return os.pread(f.fileno(), size, offset)
        if self._pid != os.getpid():  # pragma: no cover - platforms without pread: never share an inherited position
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(file)  # pragma: no cover
        if f is None:  # pragma: no cover
            f = self._handles[file] = open(self.folder / file, "rb")  # noqa: SIM115 (kept open)
        f.seek(offset)  # pragma: no cover
        return f.read(size)  # pragma: no cover

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._handles.values():
                f.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}, "_pid": None}  # files do not pickle; the copy opens its own


def local_split(path: str | Path) -> LocalStore | None:
    """The packed folder that ``path`` names (the folder or its index file), else ``None``
    (:func:`~maecore.data.packed.index.split_dir`)."""
    folder = split_dir(path)
    return None if folder is None else LocalStore(folder)
