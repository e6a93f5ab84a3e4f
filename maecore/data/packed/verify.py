"""``python -m maecore.data.packed --verify DST``: check a whole packed dataset offline (:mod:`maecore.data.packed`).

Per packed folder (``DST``, or its ``train/`` and ``val/``): the index; every shard present, of its recorded size,
a readable tar whose members lie where the index says (image member at the recorded offset and size, the label
member holding the label, the recorded number of samples); every record's bytes against their CRC-32 (packs
made before the ``crc32`` column: every record decoded by the training loader instead, which cannot see damage
that still decodes); with ``--roi``, every restart-table file of its recorded size and every record's table equal
to the one computed from its bytes.  All problems are listed, not only the first; a damaged pack ends with one
``error:`` line (exit status 2, the toolkit's status for bad input), a clean one with status 0.
"""

from __future__ import annotations

import os
import tarfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from maecore.data import jpegroi
from maecore.data.images import UNREADABLE, check_dir, load_rgb
from maecore.data.packed.index import CRC_COLUMN, INDEX_NAME, SPLITS, read_index, split_dir
from maecore.errors import UserError

MAX_LISTED = 50  # problems printed one a line; the rest counted


def verify(dst: str | Path, say: Callable[[str], None] = print) -> int:
    """Check the packed dataset ``dst`` (a packed folder or a root of packed ``train/``/``val/``); returns the
    number of records checked, or raises a one-line :class:`UserError` naming the first problems."""
    folder = split_dir(dst)
    folders = [folder] if folder is not None else [f for s in SPLITS if (f := split_dir(Path(dst) / s)) is not None]
    if not folders:
        raise UserError(f"{check_dir(dst)} is not a packed dataset (no {INDEX_NAME}, nor train/ or val/ holding one)")
    problems: list[str] = []
    checked = 0
    for f in folders:
        n, found = verify_split(f, say)
        checked += n
        problems += found
    if problems:
        first = "; ".join(problems[:3]) + ("; …" if len(problems) > 3 else "")
        raise UserError(f"{dst}: {len(problems)} problem{'s' * (len(problems) != 1)} in the packed dataset: {first}")
    return checked


def verify_split(folder: Path, say: Callable[[str], None] = print) -> tuple[int, list[str]]:
    """(records checked, problems) for one packed folder; prints its problems and a summary line."""
    index = read_index(folder)  # a damaged or foreign index: one line, nothing else can be checked
    cols, shards = index["samples"], index["shards"]
    n = len(cols["key"])
    crcs: list[int] | None = cols.get(CRC_COLUMN)
    tables: list[int] = cols.get("roi", [-1] * n)
    problems: list[str] = []

    def problem(msg: str) -> None:
        problems.append(msg)
        if len(problems) <= MAX_LISTED:
            say(f"  {msg}")

    by_shard: dict[int, list[int]] = {}
    for i, s in enumerate(cols["shard"]):
        by_shard.setdefault(s, []).append(i)
    t_last, done = time.monotonic(), 0
    for s, entry in enumerate(shards):
        path = folder / entry["name"]
        rows = by_shard.get(s, [])
        if len(rows) != entry["samples"]:
            problem(f"{path}: the index lists {len(rows)} records in it, its shard entry {entry['samples']}")
        if not path.is_file():
            problem(f"{path}: missing")
            continue
        if (size := path.stat().st_size) != entry["bytes"]:
            problem(f"{path}: {size} bytes, the index records {entry['bytes']} (truncated or replaced)")
        members = tar_members(path, problem)
        table = load_tables(folder, entry, problem)
        with open(path, "rb", buffering=0) as f:
            for i in rows:
                check_record(f.fileno(), path, i, cols, crcs, tables[i], members, table, problem)
                done += 1
                if time.monotonic() - t_last > 10:
                    t_last = time.monotonic()
                    say(f"  {done}/{n} records checked")
    what = "every record's CRC-32" if crcs is not None else "that every record decodes (no checksums stored)"
    n_tables = sum(t >= 0 for t in tables)
    say(f"{folder}: {n} records in {len(shards)} shard{'s' * (len(shards) != 1)}; checked {what}, the shards' sizes and tar members"
        + (f", {n_tables} restart tables" if n_tables else "")
        + (f": {len(problems)} problem{'s' * (len(problems) != 1)}" if problems else ": all as indexed"))
    if len(problems) > MAX_LISTED:
        say(f"  … {len(problems) - MAX_LISTED} more problems not listed")
    if crcs is None:
        say(f"note: {folder} has no per-record checksums; pack it again to store them")
    return n, problems


def tar_members(path: Path, problem: Callable[[str], None]) -> dict[str, tuple[int, int]] | None:
    """{member name: (data offset, size)} of a shard read as a tar, or ``None`` (a problem) when it is not one."""
    try:
        with tarfile.open(path) as tar:
            return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    except (OSError, tarfile.TarError) as e:
        problem(f"{path}: not a readable tar ({type(e).__name__}: {e})")
        return None


def load_tables(folder: Path, entry: dict[str, Any], problem: Callable[[str], None]) -> np.ndarray | None:
    """A ``--roi`` shard's restart-table file (memory-mapped), or ``None`` (a problem when it should exist)."""
    t = entry.get("tables")
    if t is None:
        return None
    path = folder / t["name"]
    try:
        tables = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        problem(f"{path}: restart tables unreadable ({type(e).__name__}: {e})")
        return None
    if tables.shape != (t["ints"],):
        problem(f"{path}: restart tables of shape {tables.shape}, the index records {t['ints']} ints")
        return None
    return tables


def check_record(fd: int, path: Path, i: int, cols: dict[str, list], crcs: list[int] | None, at: int,
                 members: dict[str, tuple[int, int]] | None, tables: np.ndarray | None, problem: Callable[[str], None]) -> None:
    key, ext, offset, size, label = cols["key"][i], cols["ext"][i], cols["offset"][i], cols["size"][i], cols["label"][i]
    name = f"{path}:{key}.{ext}"
    if members is not None:
        if members.get(f"{key}.{ext}") != (offset, size):
            problem(f"{name}: no tar member {key}.{ext} of {size} bytes at offset {offset}")
        if label >= 0:
            where = members.get(f"{key}.cls")
            text = os.pread(fd, where[1], where[0]) if where else b""
            if text != str(label).encode():
                problem(f"{name}: its label member {key}.cls holds {text[:16]!r}, the index records {label}")
    data = os.pread(fd, size, offset)
    if len(data) != size:
        problem(f"{name}: {len(data)} of its {size} bytes in the shard")
        return
    if crcs is not None:
        if (crc := zlib.crc32(data)) != crcs[i]:
            problem(f"{name}: CRC-32 {crc:08x}, the index records {crcs[i]:08x} (damaged after packing)")
            return
    else:
        try:
            load_rgb(data)
        except UNREADABLE as e:
            problem(f"{name}: does not decode ({type(e).__name__}: {e})".replace("\n", " "))
            return
    if at >= 0:
        if tables is None:
            return  # its table file is already a problem
        head = tables[at:at + jpegroi.HEAD]
        stored = np.asarray(tables[at:at + jpegroi.HEAD + int(head[-1]) + 1]) if len(head) == jpegroi.HEAD and head[-1] > 0 else None
        own = jpegroi.restart_table(data)
        if stored is None or own is None or not np.array_equal(stored, own):
            problem(f"{name}: its restart table (at {at} in the table file) is not the one its bytes have")
