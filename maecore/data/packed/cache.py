"""A bounded local cache of a remote packed dataset's records (``--cache_dir DIR``, ``--cache_size SIZE``).

One file a record, ``DIR/<pack>/<shard>/<offset>-<size>``, where ``<pack>`` is a hash of the pack's URL: written once
its bytes passed their CRC-32 (:meth:`RecordCache.put`), read back on the next epoch's visit.  The cache fills up to
its size and then stops taking records, and keeps what it holds: every record of a shuffled epoch is equally likely
to come back next epoch, so evicting one to keep another gains nothing (an LRU cache smaller than the dataset would
even lose: it evicts the records of the epoch's start, which the next epoch asks for as soon as any).  The processes
sharing a cache (DataLoader workers, ranks of one node) count its bytes in one file under a lock (``DIR/.bytes``), so
the bound holds for all of them together.  A damaged cached record fails its checksum and is fetched again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from maecore.errors import UserError

TALLY = ".bytes"


class RecordCache:
    """Records of one remote pack, kept under ``root`` up to ``limit`` bytes (all packs in ``root`` together)."""

    def __init__(self, root: str | Path, url: str, limit: int) -> None:
        self.root, self.limit = Path(root), limit
        self.folder = self.root / hashlib.sha1(url.encode()).hexdigest()[:16]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "url").write_text(url + "\n")
        except OSError as e:
            raise UserError(f"cache folder {self.root}: not writable ({e})") from None
        self.full = False

    def _path(self, file: str, offset: int, size: int) -> Path:
        return self.folder / file / f"{offset}-{size}"

    def has(self, file: str, offset: int, size: int) -> bool:
        return self._path(file, offset, size).is_file()

    def get(self, file: str, offset: int, size: int) -> bytes | None:
        try:
            data = self._path(file, offset, size).read_bytes()
        except OSError:
            return None
        return data if len(data) == size else None

    def drop(self, file: str, offset: int, size: int) -> None:
        """Forget a record that failed its checksum (its bytes stay counted: the bound only errs on the safe side)."""
        self._path(file, offset, size).unlink(missing_ok=True)

    def _reserve(self, n: int) -> bool:
        """Count ``n`` more bytes in the shared tally, unless that would pass the limit."""
        with open(self.root / TALLY, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            text = f.read().strip()
            total = int(text) if text.isdigit() else 0
            if total + n > self.limit:
                return False
            f.seek(0)
            f.truncate()
            f.write(str(total + n))
            return True

    def put(self, file: str, offset: int, data: bytes) -> None:
        """Keep a record (checked) unless the cache is full or already holds it; never fails a read."""
        if self.full:
            return
        path = self._path(file, offset, len(data))
        if path.exists():
            return
        try:
            if not self._reserve(len(data)):
                self.full = True
                return
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(path)  # whole or absent: a reader never sees half a record
        except OSError:
            self.full = True  # a full or read-only disk: go on without the cache
