"""Packed, sharded image datasets: WebDataset-style tar shards plus an index for random access.

``python -m maecore.packed SRC DST [--max_side N | --short_side N] [--quality Q] [--roi] [--shard_size SIZE]
[--workers N] [--force]`` (``python tools/pack_dataset.py`` is the same command) packs an image folder — with class
sub-folders (ImageNet layout) or without — into ``DST``; a classification root holding ``train/`` and
``val/`` is packed split by split into ``DST/train`` and ``DST/val``.  Every packed folder holds:

* ``shard-000000.tar``, … : for each sample ``{key}.jpg`` (or ``.png``… : the image's own format) and,
  with classes, ``{key}.cls`` (the label as decimal text), consecutive, so ``tar``, ``webdataset`` and any
  tar reader read them;
* ``packed-index.json``: the shards (name, byte size, sample count), the class names, and per sample (in
  columns) its shard, key, the byte offset and size of the image member's data, its extension and its label,
  the CRC-32 of the image bytes (``crc32``), the stored image's width, height, Pillow format and mode (so the fast
  decoder draws its crop without parsing the header), and with ``--roi`` the offset of its restart table; what
  was skipped at pack time and why.  Every column after the label is optional: packs made before one was added
  read as before (without it), and older readers ignore a column they do not know.  The index is written last: a folder without it is an
  interrupted pack, refused by the readers.
* with ``--roi``, ``shard-000000.roi.npy``, … : per shard one int32 array, the restart tables
  (:func:`maecore.jpegroi.restart_table`) of its images one after the other.

Samples are stored in the order :class:`maecore.data.ImageFiles` lists the folder (classes sorted, files
sorted), so a packed copy yields the same samples at the same indices as its folder: with the original
bytes kept, a run on either gives identical losses.

**Re-encoding: off by default.**  By default every image's original bytes are stored unchanged, so
packing never changes what the model sees (and the folder/packed equivalence above holds).  To save
disk and decode time, ``--short_side N`` (or ``--max_side N``) re-encodes images *larger* than the cap as
JPEG at ``--quality`` (default 90), resized with Lanczos; smaller images keep their bytes.  A good cap is
twice the largest training input (``--short_side 448`` for 224-pixel training): RandomResizedCrop then
upsamples only crops under a quarter of the image's area, which it would mostly do anyway.

**ROI packs: ``--roi``** re-encodes *every* image (any format; capped by ``--short_side``/``--max_side`` if
given) as a baseline JPEG at ``--quality`` (default 90, FFCV's default too) with a restart marker after every
MCU (``--roi_restart row``: every MCU row), and stores where each entropy-coded segment starts.  The fast decoder
(``--decode fast``) then decodes only the MCUs its crop box touches (:mod:`maecore.jpegroi`): the pixels are
those of the whole re-encoded image, cropped, bit for bit.  The cost: one more JPEG generation (quality 90
loses little, but the pixels are no longer the originals', so a run on a ROI pack is not the folder's run), the
markers (~7 % larger files for per-MCU markers on 500x375 photos, ~0 % per row) and the tables (~3 KB per
500x375 image per MCU, ~0.1 KB per row).  Grey (``L``) images stay grey; anything else is stored as RGB
(converted as the training loader converts it).  docs/benchmarks.md has the measured gain.

Every image is decoded at pack time through the training loader's protected decoder
(:func:`maecore.data.load_rgb`): what training would skip (empty, not an image, truncated, no known 8-bit
scale) is skipped here, printed and counted in the index.  A record damaged after packing is skipped and
counted at read time like an unreadable file in a folder (``n_skipped``): every read checks the bytes against
their CRC-32 (``zlib.crc32``, ~3.6 GB/s: 1–2 % of the fast pipeline's time, docs/benchmarks.md), so damage that still decodes
(a flipped bit in the entropy-coded data) is caught too, not trained on.  ``python -m maecore.packed --verify DST``
checks a whole pack offline (:mod:`maecore.packverify`): every record's checksum, the shards' sizes and tar
structure, the restart tables; a summary, and for a damaged pack one ``error:`` line and exit status 2.

Reading (:class:`PackedImages`) is random access by index — each process opens each shard once and reads
the recorded byte range — so the sampler's per-epoch permutation, rank shards and exact mid-epoch resume
(:class:`maecore.data.ResumableSampler`, :class:`maecore.data.SeededDataset`) work unchanged.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from PIL import Image

from maecore import jpegroi
from maecore.cli import OneLineParser, run_cli
from maecore.data import UNREADABLE, ImageFiles, check_dir, jpeg_kind, load_rgb
from maecore.errors import UserError

INDEX_NAME = "packed-index.json"
FORMAT = "mae-packed"
VERSION = 1
SHARD_NAME = "shard-{:06d}.tar"
TABLES_SUFFIX = ".roi.npy"  # beside each shard of a --roi pack: its images' restart tables
META_COLUMNS = ("width", "height", "format", "mode")  # optional per-sample columns (absent from older packs)
CRC_COLUMN = "crc32"  # optional: zlib.crc32 of each record's image bytes (absent from packs made before it)
SPLITS = ("train", "val")
DEFAULT_QUALITY = 90
DEFAULT_SHARD_SIZE = 1 << 30  # ~1 GiB: few files for a big dataset, each still quick to copy or checksum
_BLOCK = tarfile.BLOCKSIZE
_PREAD = hasattr(os, "pread")
# Pillow format -> member extension (what webdataset's decoders key on); other formats use their own name
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "PPM": "ppm", "GIF": "gif", "MPO": "jpg"}


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


def read_index(folder: Path) -> dict[str, Any]:
    """The checked index of a packed folder (one-line :class:`UserError` for a damaged or foreign one)."""
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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


# ---- reading -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Record:
    """Where one sample's image bytes lie: shard file, byte offset and size of the member's data; and what the
    index knows of the image (packs made before these columns: zeros, -1): its size, its kind for the fast
    decoder (:func:`maecore.data.jpeg_kind`), where its restart table starts in its shard's table file, the
    CRC-32 of its bytes."""

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

    def __str__(self) -> str:
        return f"{self.shard_path}:{self.key}.{self.ext}"


class ChecksumError(OSError):
    """A record's bytes do not match the CRC-32 the index recorded at pack time: damaged after packing.  An
    ``OSError``, so the readers skip and count it like any unreadable sample."""


class NamedBytes(bytes):
    """Encoded image bytes that carry their record's name (for the warnings of ``maecore.data``)."""

    name: str

    def __new__(cls, data: bytes, name: str) -> NamedBytes:
        obj = super().__new__(cls, data)
        obj.name = name
        return obj


class PackedImages(ImageFiles):
    """A packed folder as an :class:`~maecore.data.ImageFiles`: the same ``samples`` (here ``(Record,
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


# ---- packing -----------------------------------------------------------------------------------------
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


Job = tuple[str, int | None, int | None, int, str | None]  # path, max_side, short_side, quality, restart markers


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
    or ``"row"``: ``--roi``) every image is re-encoded as a JPEG with restart markers and its table computed."""
    path, max_side, short_side, quality, restart = job
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format or "", im.mode
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
        img.save(buf, "JPEG", quality=quality)
        return Prepared(buf.getvalue(), "jpg", True, (*img.size, "JPEG", img.mode), None)
    out = jpegroi.encode(img, quality, restart)
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
               roi: str | None = None, say: Callable[[str], None] = print, shown: Path | None = None) -> dict[str, Any]:
    """Pack one image folder (with or without class sub-folders) into ``dst`` (created); returns its index.
    ``roi``: ``"mcu"`` or ``"row"`` re-encodes every image with restart markers there (``--roi``).  Messages name
    ``shown`` (where ``dst`` will be moved), else ``dst``."""
    if roi is not None and roi not in jpegroi.RESTARTS:
        raise ValueError(f"roi must be one of {jpegroi.RESTARTS} or None, got {roi!r}")
    shown = shown or dst
    folder = ImageFiles(src)  # the folder's own listing: same classes, same order, same 'no images' error
    dst.mkdir(parents=True)
    writer = ShardWriter(dst, shard_size)
    names = ("shard", "key", "offset", "size", "ext", "label", CRC_COLUMN, *META_COLUMNS, *(("roi",) if roi else ()))
    cols: dict[str, list[Any]] = {c: [] for c in names}
    skipped: list[dict[str, str]] = []
    used: set[str] = set()
    n_reencoded = n_tables = 0
    jobs: list[Job] = [(str(p), max_side, short_side, quality, roi) for p, _ in folder.samples]
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
                     "count": n_reencoded},
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


# ---- command line ------------------------------------------------------------------------------------
def byte_size(text: str) -> int:
    """``1G``, ``500M``, ``64K`` or a number of bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ") if m else 0
    if value < 1024:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1K such as 64K, 500M or 1G, got {text!r}")
    return int(value)


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="pack_dataset.py", description="Pack an image folder into tar shards with an index (see maecore/packed.py); "
                                                          "or check a packed one (--verify DST).")
    p.add_argument("src", type=Path, nargs="?", help="image folder: class sub-folders or loose images, or a root with train/ and val/")
    p.add_argument("dst", type=Path, nargs="?", help="output folder (must not exist, unless --force)")
    p.add_argument("--verify", type=Path, metavar="DST", default=None,
                   help="only check the packed dataset DST (every record's CRC-32, shard sizes and tar structure, restart "
                        "tables): a summary, exit 0 when clean, else one error line and exit 2")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--max_side", type=_int_in(16, 1 << 16), default=None,
                     help="re-encode images whose long side exceeds N as JPEG with that long side (default: keep originals)")
    cap.add_argument("--short_side", type=_int_in(16, 1 << 16), default=None,
                     help="re-encode images whose short side exceeds N as JPEG with that short side, e.g. 448 for 224-px "
                          "training (default: keep originals)")
    p.add_argument("--quality", type=_int_in(1, 100), default=DEFAULT_QUALITY,
                   help=f"JPEG quality of re-encoded images (default {DEFAULT_QUALITY})")
    p.add_argument("--roi", action="store_true",
                   help="re-encode every image as JPEG at --quality with restart markers, so that the fast decoder decodes only "
                        "the crop box (lossy: one more JPEG generation; see maecore/packed.py)")
    p.add_argument("--roi_restart", choices=jpegroi.RESTARTS, default="mcu",
                   help="with --roi: a restart marker after every MCU (default; boxes cut both ways) or every MCU row")
    p.add_argument("--shard_size", type=byte_size, default=DEFAULT_SHARD_SIZE, help="bytes per shard, e.g. 500M (default 1G)")
    p.add_argument("--workers", type=_int_in(0, 256), default=min(8, os.cpu_count() or 1),
                   help="decoding processes (default min(8, CPUs); 0 = in this process)")
    p.add_argument("--force", action="store_true", help="replace DST when it is a packed dataset")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.src is not None:
            parser.error("--verify DST checks a packed dataset: give no SRC/DST to pack")
        from maecore.packverify import verify  # only needed here

        verify(args.verify)
        return 0
    if args.dst is None:
        parser.error("give SRC and DST to pack (or --verify DST to check a packed dataset)")
    t0 = time.perf_counter()
    out = pack(args.src, args.dst, force=args.force, max_side=args.max_side, short_side=args.short_side,
               quality=args.quality, shard_size=args.shard_size, workers=args.workers, roi=args.roi_restart if args.roi else None)
    print(f"packed {args.src} -> {', '.join(map(str, out))} in {time.perf_counter() - t0:.1f}s")
    return 0


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


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


if __name__ == "__main__":
    cli()
