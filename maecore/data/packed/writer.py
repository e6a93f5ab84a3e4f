"""Packing an image folder (format and options: :mod:`maecore.data.packed`): every image decoded through the
training loader's protected decoder, kept or re-encoded, written to tar shards, the index last.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from maecore.data import jpegroi
from maecore.data.images import UNREADABLE, ImageFiles, check_dir, load_rgb
from maecore.data.packed.index import CRC_COLUMN, FORMAT, INDEX_NAME, META_COLUMNS, SHARD_NAME, SPLITS, TABLES_SUFFIX, VERSION, is_packed
from maecore.errors import UserError

DEFAULT_QUALITY = 90
DEFAULT_SHARD_SIZE = 1 << 30  # ~1 GiB: few files for a big dataset, each still quick to copy or checksum
_BLOCK = tarfile.BLOCKSIZE
# Pillow format -> member extension (what webdataset's decoders key on); other formats use their own name
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "PPM": "ppm", "GIF": "gif", "MPO": "jpg"}


def capped_size(size: tuple[int, int], max_side: int | None, short_side: int | None) -> tuple[int, int]:
    """(w, h) scaled down so the long side is at most ``max_side`` or the short side at most
    ``short_side``; unchanged when already within the cap."""
    w, h = size
    if max_side is not None and max(w, h) > max_side:
        s = max_side / max(w, h)
    elif short_side is not None and min(w, h) > short_side:
        s = short_side / min(w, h)
    else:
        return size
    return max(1, round(w * s)), max(1, round(h * s))


Job = tuple[str, int | None, int | None, int, str | None, str]  # path, max_side, short_side, quality, restart markers, subsampling
SUBSAMPLING_CHOICES = ("keep", *jpegroi.SUBSAMPLINGS)  # keep: the source's own (jpegroi.source_subsampling)


class Prepared(NamedTuple):
    """One image as it is stored: bytes, extension, re-encoded?, (width, height, Pillow format, mode), restart table."""

    data: bytes
    ext: str
    reencoded: bool
    meta: tuple[int, int, str, str]
    table: np.ndarray | None


def prepare(job: Job) -> Prepared | str:
    """One source file -> what to store (:class:`Prepared`), or the reason it is skipped.  Runs in the packing
    workers; decodes the whole image through the training loader's protected decoder.  With ``restart`` (``"mcu"``
    or ``"row"``: ``--roi``) every image is re-encoded as a JPEG with restart markers and its table computed.  A
    re-encoded colour image is subsampled as ``subsampling`` says (``"keep"``: as its source, see
    :func:`maecore.data.jpegroi.source_subsampling`)."""
    path, max_side, short_side, quality, restart, subsampling = job
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format or "", im.mode
            if subsampling == "keep":
                subsampling = jpegroi.source_subsampling(im)
        img = load_rgb(data)
    except UNREADABLE as e:
        return f"{type(e).__name__}: {e}".replace("\n", " ")
    target = capped_size(img.size, max_side, short_side)
    if restart is None and target == img.size:
        return Prepared(data, _EXT.get(fmt, fmt.lower() or Path(path).suffix.lstrip(".").lower()), False, (*img.size, fmt, mode), None)
    if restart is not None and mode == "L":
        img = img.convert("L")  # a grey image stays grey: exact, load_rgb only replicated it
    if target != img.size:
        img = img.resize(target, Image.Resampling.LANCZOS)
    if restart is None:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, subsampling=jpegroi.SUBSAMPLINGS[subsampling])
        return Prepared(buf.getvalue(), "jpg", True, (*img.size, "JPEG", img.mode), None)
    out = jpegroi.encode(img, quality, restart, subsampling)
    return Prepared(out, "jpg", True, (*img.size, "JPEG", img.mode), jpegroi.restart_table(out))


def _key(rel: Path, used: set[str]) -> str:
    """A tar key from a relative path: the suffix dropped and dots in the file name replaced (webdataset
    splits a member name at the first dot of its base name); made unique with ``_N``."""
    stem = re.sub(r"\.", "_", rel.with_suffix("").name) or "_"
    key = (rel.parent / stem).as_posix() if rel.parent != Path(".") else stem
    base, n = key, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


class ShardWriter:
    """Appends samples to ``shard-NNNNNN.tar`` files of about ``shard_size`` bytes, recording where each
    image member's data starts, and their restart tables to ``shard-NNNNNN.roi.npy`` (written when the shard
    closes).  Members are written deterministically (mtime 0, root owner, mode 644): packing the same folder
    twice gives the same bytes."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.shards: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None
        self.tables: list[np.ndarray] = []
        self.table_ints = 0

    def _member(self, name: str, data: bytes) -> int:
        assert self.tar is not None
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))
        # the data ends the member, padded to whole blocks: its start is the offset now minus those blocks
        return self.tar.offset - -(-len(data) // _BLOCK) * _BLOCK

    def add(self, key: str, ext: str, data: bytes, label: int, table: np.ndarray | None = None) -> tuple[int, int, int]:
        """Write one sample; returns (shard number, byte offset of the image data, offset of its restart table in
        the shard's table file or -1)."""
        if self.tar is not None and self.tar.offset > 0 and self.tar.offset + len(data) + 3 * _BLOCK > self.shard_size:
            self._close()
        if self.tar is None:
            name = SHARD_NAME.format(len(self.shards))
            self.tar = tarfile.open(self.folder / name, "w", format=tarfile.PAX_FORMAT)
            self.shards.append({"name": name, "bytes": 0, "samples": 0})
        offset = self._member(f"{key}.{ext}", data)
        if label >= 0:
            self._member(f"{key}.cls", str(label).encode())
        self.shards[-1]["samples"] += 1
        at = -1
        if table is not None:
            at = self.table_ints
            self.tables.append(table.astype(np.int32, copy=False))
            self.table_ints += len(table)
        return len(self.shards) - 1, offset, at

    def _close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.shards[-1]["bytes"] = (self.folder / self.shards[-1]["name"]).stat().st_size
            self.tar = None
            if self.tables:
                name = self.shards[-1]["name"].removesuffix(".tar") + TABLES_SUFFIX
                np.save(self.folder / name, np.concatenate(self.tables))
                self.shards[-1]["tables"] = {"name": name, "ints": self.table_ints}
            self.tables, self.table_ints = [], 0

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def _results(jobs: list[Job], workers: int) -> Iterator[Prepared | str]:
    """:func:`prepare` over ``jobs``, in order, in ``workers`` processes (0: in this one)."""
    if workers <= 0:
        yield from map(prepare, jobs)
        return
    import multiprocessing

    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(prepare, jobs, chunksize=16)


def pack_split(src: Path, dst: Path, *, max_side: int | None = None, short_side: int | None = None,
               quality: int = DEFAULT_QUALITY, shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 0,
               roi: str | None = None, subsampling: str = "keep", say: Callable[[str], None] = print,
               shown: Path | None = None) -> dict[str, Any]:
    """Pack one image folder (with or without class sub-folders) into ``dst`` (created); returns its index.
    ``roi``: ``"mcu"`` or ``"row"`` re-encodes every image with restart markers there (``--roi``); ``subsampling``:
    the chroma subsampling of re-encoded images (:data:`SUBSAMPLING_CHOICES`, ``"keep"``: each source's own).
    Messages name ``shown`` (where ``dst`` will be moved), else ``dst``."""
    if roi is not None and roi not in jpegroi.RESTARTS:
        raise ValueError(f"roi must be one of {jpegroi.RESTARTS} or None, got {roi!r}")
    if subsampling not in SUBSAMPLING_CHOICES:
        raise ValueError(f"subsampling must be one of {SUBSAMPLING_CHOICES}, got {subsampling!r}")
    shown = shown or dst
    folder = ImageFiles(src)  # the folder's own listing: same classes, same order, same 'no images' error
    dst.mkdir(parents=True)
    writer = ShardWriter(dst, shard_size)
    names = ("shard", "key", "offset", "size", "ext", "label", CRC_COLUMN, *META_COLUMNS, *(("roi",) if roi else ()))
    cols: dict[str, list[Any]] = {c: [] for c in names}
    skipped: list[dict[str, str]] = []
    used: set[str] = set()
    n_reencoded = n_tables = 0
    jobs: list[Job] = [(str(p), max_side, short_side, quality, roi, subsampling) for p, _ in folder.samples]
    t_last = time.monotonic()
    try:
        for i, ((path, label), res) in enumerate(zip(folder.samples, _results(jobs, workers))):
            rel = path.relative_to(folder.root)
            if isinstance(res, str):
                skipped.append({"path": rel.as_posix(), "reason": res})
                if len(skipped) <= 20:
                    say(f"  skipped unreadable {path}: {res}")
                continue
            n_reencoded += res.reencoded
            n_tables += res.table is not None
            key = _key(rel, used)
            shard, offset, at = writer.add(key, res.ext, res.data, label, res.table)
            for c, v in zip(names, (shard, key, offset, len(res.data), res.ext, label, zlib.crc32(res.data), *res.meta, at)):
                cols[c].append(v)
            if time.monotonic() - t_last > 10:
                t_last = time.monotonic()
                say(f"  {i + 1}/{len(jobs)} images, {len(writer.shards)} shards")
    finally:
        shards = writer.close()
    if len(skipped) > 20:
        say(f"  … and {len(skipped) - 20} more unreadable files (all listed in {shown / INDEX_NAME})")
    if not cols["key"]:
        raise UserError(f"none of the {len(jobs)} images under {src} could be read: nothing to pack")
    index = {
        "format": FORMAT, "version": VERSION, "source": str(src.resolve()),
        "reencode": {"max_side": max_side, "short_side": short_side, "quality": quality if (max_side or short_side or roi) else None,
                     "subsampling": subsampling if (max_side or short_side or roi) else None, "count": n_reencoded},
        "roi": {"restart": roi, "count": n_tables} if roi else None,
        "classes": folder.classes, "shards": shards, "samples": cols,
        "skipped": {"count": len(skipped), "files": skipped},
    }
    tmp = dst / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, separators=(",", ":")))
    tmp.replace(dst / INDEX_NAME)  # last: a folder without the index is an unfinished pack
    total = sum(s["bytes"] for s in shards)
    say(f"{shown}: {len(cols['key'])} images" + (f" in {len(folder.classes)} classes" if folder.classes else " (no classes)")
        + f", {len(shards)} shard{'s' * (len(shards) != 1)}, {total / 2**20:.1f} MiB; {len(skipped)} unreadable skipped"
        + (f"; {n_reencoded} re-encoded" if max_side or short_side or roi else "")
        + (f", {n_tables} with restart tables" if roi else ""))
    return index


def pack(src: str | Path, dst: str | Path, *, force: bool = False, say: Callable[[str], None] = print, **kw: Any) -> list[Path]:
    """Pack ``src`` into ``dst``: each of ``train/`` and ``val/`` when ``src`` has them, else ``src`` itself.
    Written beside ``dst`` and moved into place at the end; an existing ``dst`` is refused, or with
    ``force`` replaced, but only when it is a packed dataset or empty.  Returns the packed folders."""
    src, dst = check_dir(src, "source"), Path(dst)
    if dst.exists() or dst.is_symlink():
        if not force:
            raise UserError(f"{dst} already exists (use --force to replace it)")
        if not dst.is_dir() or (any(dst.iterdir()) and not is_packed(dst)):
            raise UserError(f"{dst} exists and is not a packed dataset: not replacing it, even with --force")
    if dst.resolve().is_relative_to(src.resolve()):
        raise UserError(f"{dst} is inside the source folder {src}")
    splits = [s for s in SPLITS if (src / s).is_dir()]
    if splits:
        others = sorted(d.name for d in src.iterdir() if d.is_dir() and d.name not in SPLITS and not d.name.startswith("."))
        if others:
            say(f"note: packing {' and '.join(splits)}/ only; not packed: {', '.join(others)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".{dst.name}.packing-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        if splits:
            work.mkdir()
            for s in splits:
                pack_split(src / s, work / s, say=say, shown=dst / s, **kw)
        else:
            pack_split(src, work, say=say, shown=dst, **kw)
        if dst.exists():
            old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
            dst.rename(old)
            work.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [dst / s for s in splits] or [dst]
