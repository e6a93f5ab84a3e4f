"""A packed dataset's index (``packed-index.json``): finding a packed folder, reading its checked index, and
what a record is (format: :mod:`maecore.data.packed`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maecore.errors import UserError

INDEX_NAME = "packed-index.json"
FORMAT = "mae-packed"
VERSION = 1
SHARD_NAME = "shard-{:06d}.tar"
TABLES_SUFFIX = ".roi.npy"  # beside each shard of a --roi pack: its images' restart tables
META_COLUMNS = ("width", "height", "format", "mode")  # optional per-sample columns (absent from older packs)
CRC_COLUMN = "crc32"  # optional: zlib.crc32 of each record's image bytes (absent from packs made before it)
SPLITS = ("train", "val")


# ---- finding a packed dataset --------------------------------------------------------------------------
def split_dir(path: str | Path) -> Path | None:
    """The packed folder that ``path`` names (the folder holding the index, or the index file itself), or
    ``None`` when ``path`` is not a packed folder.  A folder holding shards but no index (an interrupted or
    partly copied pack) is a :class:`UserError`, not mistaken for an empty image folder."""
    p = Path(path)
    if p.is_file() and p.name == INDEX_NAME:
        return p.parent
    if not p.is_dir():
        return None
    if (p / INDEX_NAME).is_file():
        return p
    if any(p.glob("shard-*.tar")):
        raise UserError(f"{p} holds tar shards but no {INDEX_NAME}: an interrupted or incomplete packed dataset (pack it again)")
    return None


def is_packed(path: str | Path) -> bool:
    """``path`` is a packed folder, or a root whose ``train/`` or ``val/`` is one."""
    p = Path(path)
    return split_dir(p) is not None or any(split_dir(p / s) is not None for s in SPLITS if (p / s).is_dir())


def is_url(location: str | Path) -> bool:
    """``location`` names a remote packed dataset (``http://``, ``https://``, ``s3://``, ``gs://``…), not a path."""
    return isinstance(location, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


def read_index(folder: Path) -> dict[str, Any]:
    """The checked index of a packed folder (one-line :class:`UserError` for a damaged or foreign one)."""
    path = folder / INDEX_NAME
    try:
        text = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: not a readable packed-dataset index ({e})") from None
    return parse_index(text, str(path))


def parse_index(text: bytes, path: str) -> dict[str, Any]:
    """The checked index from its bytes (read from ``path``, a file or a URL, which the messages name)."""
    try:
        index = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable packed-dataset index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{path}: not a packed-dataset index (no \"format\": \"{FORMAT}\")")
    if index.get("version") != VERSION:
        raise UserError(f"{path}: packed-dataset version {index.get('version')!r}, this toolkit reads version {VERSION}")
    try:
        cols = index["samples"]
        n = len(cols["key"])
        if any(len(cols[c]) != n for c in ("shard", "offset", "size", "ext", "label")) or n == 0:
            raise ValueError("sample columns of unequal length, or no samples")
        shards, classes = index["shards"], index["classes"]
        if any(not 0 <= s < len(shards) for s in cols["shard"]) or any(not -1 <= t < len(classes) for t in cols["label"]):
            raise ValueError("a sample names a shard or class the index does not list")
        if (classes and -1 in cols["label"]) or (not classes and set(cols["label"]) != {-1}):
            raise ValueError("labels do not match the class list")
        if any(c in cols for c in META_COLUMNS) and any(len(cols.get(c, ())) != n for c in META_COLUMNS):
            raise ValueError(f"the columns {', '.join(META_COLUMNS)} come together, one value per sample")
        crcs = cols.get(CRC_COLUMN)
        if crcs is not None and (len(crcs) != n or any(type(c) is not int or not 0 <= c < 1 << 32 for c in crcs)):
            raise ValueError(f"the {CRC_COLUMN} column needs one unsigned 32-bit integer per sample")
        for s in shards:
            t = s.get("tables")
            if t is not None and not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("ints"), int)):
                raise ValueError("a shard's restart-table entry lacks its file name or size")
        if "roi" in cols:
            if len(cols["roi"]) != n or "width" not in cols:
                raise ValueError("the roi column needs one value per sample and the size columns")
            if any(t >= 0 and "tables" not in shards[s] for s, t in zip(cols["shard"], cols["roi"])):
                raise ValueError("a sample has a restart table in a shard without a table file")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: inconsistent packed-dataset index ({e})") from None
    return index


# ---- a record ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Record:
    """Where one sample's image bytes lie: shard file, byte offset and size of the member's data; and what the
    index knows of the image (packs made before these columns: zeros, -1): its size, its kind for the fast
    decoder (:func:`maecore.data.crop.jpeg_kind`), where its restart table starts in its shard's table file, the
    CRC-32 of its bytes, the restart table's length."""

    shard: int
    offset: int
    size: int
    key: str
    ext: str
    shard_path: str  # one shared string per shard: names the record in warnings
    width: int = 0
    height: int = 0
    kind: int = 0
    table: int = -1
    crc: int = -1
    table_ints: int = 0  # the length of its restart table (up to the next one in its shard's table file)

    def __str__(self) -> str:
        return f"{self.shard_path}:{self.key}.{self.ext}"


class ChecksumError(OSError):
    """A record's bytes do not match the CRC-32 the index recorded at pack time: damaged after packing.  An
    ``OSError``, so the readers skip and count it like any unreadable sample."""
