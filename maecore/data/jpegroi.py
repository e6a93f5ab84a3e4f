"""Crop-box (ROI) decoding of JPEGs that carry restart markers.

A baseline JPEG encoded with a restart marker every ``interval`` MCUs (``restart_marker_blocks`` /
``restart_marker_rows`` of Pillow's encoder) splits its entropy-coded data into segments that decode on
their own: the DC predictors restart at each marker.  The MCUs of a box are then a JPEG of their own: the
original header with the frame size patched, the segments of the rows and columns the box touches, one after
the other (within one MCU row those are one contiguous byte slice of the original), the restart markers
renumbered 0..7 in their new sequence, an end-of-image marker.  libjpeg decodes it to the very pixels the
whole image's decode has there, bit for bit (tests/data/test_jpegroi.py), as long as the box keeps a margin for
the chroma upsampling of a subsampled image (libjpeg's "fancy" upsampling reads one chroma sample beyond
each output pixel's own): :func:`roi_bounds` adds it.

:func:`restart_table` finds the segments once (at pack time: :mod:`maecore.data.packed` stores the table beside
the shards); :func:`roi_jpeg` builds the box's JPEG from the original bytes and that table without scanning
the data, in a handful of numpy operations.
"""

from __future__ import annotations

import io
import re
from typing import NamedTuple

import numpy as np
from PIL import Image

RESTARTS = ("mcu", "row")
"""Where :func:`encode` puts restart markers: after every MCU (boxes cut in both directions) or after every
MCU row (boxes cut in rows only; a smaller table and file)."""

HEAD = 8  # ints before the segment starts in a table: width, height, mcu_w, mcu_h, interval, sof, header_end, segments
_MARKER = re.compile(rb"\xff[^\x00\xff]")  # a marker in entropy-coded data (0xff00 is a stuffed byte, 0xffff fill)
_RST0, _EOI = 0xD0, 0xD9


class RoiError(ValueError):
    """A table that does not fit the bytes it is used with (a damaged record)."""


SUBSAMPLINGS = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
"""The chroma subsamplings a JPEG can be written with (Pillow's ``subsampling`` codes)."""


def encode(img: Image.Image, quality: int, restart: str = "mcu", subsampling: str = "4:2:0") -> bytes:
    """``img`` (RGB or L) as a baseline JPEG at ``quality`` with a restart marker after every MCU (``restart="mcu"``)
    or every MCU row (``"row"``); an RGB image's chroma subsampled as ``subsampling`` says (:data:`SUBSAMPLINGS`; the
    MCU is 16 x 16 pixels at 4:2:0, 16 x 8 at 4:2:2, 8 x 8 at 4:4:4 and for grey images)."""
    if restart not in RESTARTS:
        raise ValueError(f"restart must be one of {RESTARTS}, got {restart!r}")
    if subsampling not in SUBSAMPLINGS:
        raise ValueError(f"subsampling must be one of {tuple(SUBSAMPLINGS)}, got {subsampling!r}")
    buf = io.BytesIO()
    kw = {"restart_marker_blocks": 1} if restart == "mcu" else {"restart_marker_rows": 1}
    if img.mode != "L":
        kw["subsampling"] = SUBSAMPLINGS[subsampling]
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def source_subsampling(im: Image.Image) -> str:
    """The chroma subsampling that keeps what ``im`` (opened, not yet converted) has: a colour JPEG's own when a
    JPEG can be written with it (4:4:4, 4:2:2, 4:2:0), else 4:4:4 (4:4:0, 4:1:1, CMYK, and every other format, which
    store chroma at full resolution: nothing is thrown away)."""
    from PIL import JpegImagePlugin

    own = JpegImagePlugin.get_sampling(im) if im.format in ("JPEG", "MPO") else -1
    return {v: k for k, v in SUBSAMPLINGS.items()}.get(own, "4:4:4")


def restart_table(data: bytes) -> np.ndarray | None:
    """The int32 table :func:`roi_jpeg` needs for ``data``: ``[width, height, mcu_w, mcu_h, interval, sof,
    header_end, n]`` and the ``n + 1`` byte offsets where each entropy-coded segment starts (the last: two past the
    end-of-image marker's start, so segment k ends two bytes, its marker, before entry k + 1).  ``None`` for a JPEG
    this cannot cut: not baseline/extended Huffman, several scans, no restart interval, an interval that does not
    divide the MCU rows, or markers out of sequence."""
    if data[:2] != b"\xff\xd8":
        return None
    n, i = len(data), 2
    sof = interval = header_end = 0
    size = factors = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if m in (0xC0, 0xC1):
            sof = i
            height, width, nc = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9]
            size = (width, height)
            factors = [(data[i + 11 + 3 * k] >> 4, data[i + 11 + 3 * k] & 15) for k in range(nc)]
        elif 0xC2 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):  # progressive, lossless, arithmetic
            return None
        elif m == 0xDD:
            interval = int.from_bytes(data[i + 4:i + 6], "big")
        elif m == 0xDA:
            if size is None or factors is None or data[i + 4] != len(factors):
                return None  # no frame yet, or a scan without every component (a multi-scan file)
            header_end = i + 2 + length
            break
        i += 2 + length
    if not header_end or not interval or size is None or factors is None or 0 in size:
        return None
    width, height = size
    if len(factors) == 1:  # a non-interleaved scan: one block is one MCU whatever the factors say
        mw = mh = 8
    else:
        mw, mh = 8 * max(f[0] for f in factors), 8 * max(f[1] for f in factors)
    cols, rows = -(-width // mw), -(-height // mh)
    if cols % interval:
        return None
    starts = [header_end]
    eoi = -1
    for k, mk in enumerate(_MARKER.finditer(data, header_end)):
        code = data[mk.start() + 1]
        if code == _EOI:
            eoi = mk.start()
            break
        if code != _RST0 + k % 8:
            return None
        starts.append(mk.end())
    if eoi < 0 or len(starts) != cols * rows // interval:
        return None
    starts.append(eoi + 2)
    head = [width, height, mw, mh, interval, sof, header_end, len(starts) - 1]
    return np.array(head + starts, dtype=np.int32)


class Roi(NamedTuple):
    """A box's JPEG, where it lies in the whole image and its size (pixels)."""

    data: np.ndarray  # uint8, the JPEG's bytes
    top: int
    left: int
    height: int
    width: int


def _margins(mw: int, mh: int) -> tuple[int, int]:
    """Source pixels kept beyond the box, across and down: one where the chroma is subsampled, none at full chroma
    resolution.  libjpeg's fancy upsampling blends each output pixel's chroma sample with its neighbour on the side
    the pixel lies (x = 2i takes sample i - 1, x = 2i + 1 sample i + 1); the box's JPEG starts and ends on MCU
    edges, i.e. on even pixels, so a pixel one past the box inside the JPEG keeps that neighbour in it (10,800 random
    boxes over 4:2:0, 4:2:2 and row-restart files: bitwise)."""
    return (1 if mw > 8 else 0), (1 if mh > 8 else 0)


def roi_bounds(table: np.ndarray, top: int, left: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(first MCU row, end row, first segment column, end segment column) of the segments covering the box and its
    upsampling margin (:func:`_margins`)."""
    w, h, mw, mh, interval = table[:5].tolist()
    mx, my = _margins(mw, mh)
    sw = mw * interval  # pixels per segment, across
    r0, r1 = max(0, (top - my) // mh), min(-(-h // mh), -(-(top + height + my) // mh))
    c0, c1 = max(0, (left - mx) // sw), min(-(-w // mw) // interval, -(-(left + width + mx) // sw))
    if mx and c0 and min(w, c1 * sw) - c0 * sw <= 2 * (mw // 8):
        c0 -= 1  # libjpeg upsamples chroma 2 samples wide or less without "fancy": never cut the JPEG that narrow
    return r0, r1, c0, c1


MIN_SAVING = 8192  # pixels: below this, decoding the whole image costs less than building the box's JPEG (~20 us)


def roi_saving(table: np.ndarray, bounds: tuple[int, int, int, int]) -> int:
    """How many pixels (whole MCUs) of the whole image the box's JPEG (:func:`roi_bounds`: ``bounds``) does not decode."""
    w, h, mw, mh, interval = table[:5].tolist()
    r0, r1, c0, c1 = bounds
    rows, seg_cols = -(-h // mh), -(-w // mw) // interval
    return (rows * seg_cols - (r1 - r0) * (c1 - c0)) * mw * mh * interval


_SEQUENCE = (_RST0 + np.arange(1 << 16) % 8).astype(np.uint8)  # RST0..RST7 repeated: the markers' new numbers


def roi_jpeg(data: bytes | memoryview, table: np.ndarray, top: int, left: int, height: int, width: int,
             bounds: tuple[int, int, int, int] | None = None) -> Roi:
    """The JPEG of the segments covering the box ``(top, left, height, width)`` (torchvision's crop order; ``bounds``:
    its :func:`roi_bounds`, if the caller has them), its position and size; decoded, ``[top - roi.top :, left -
    roi.left :]`` of it is the box, bit for bit as in the whole image's decode.  Raises :class:`RoiError` when
    ``table`` does not fit ``data`` (offsets past the end, no marker where the table says)."""
    w, h, mw, mh, interval, sof, header_end, n = table[:HEAD].tolist()
    r0, r1, c0, c1 = bounds or roi_bounds(table, top, left, height, width)
    spr = -(-w // mw) // interval  # segments per MCU row
    nc = c1 - c0
    first = HEAD + r0 * spr + c0
    if (len(table) != HEAD + n + 1 or r1 <= r0 or nc < 1 or first + (r1 - r0 - 1) * spr + nc >= len(table)
            or int(table[-1]) > len(data) or not 0 < sof < header_end - 9):
        raise RoiError("the restart table does not fit the JPEG's data")
    # per covered row: the starts of its nc segments and of the one after (= past the last one's marker), a view
    step = table.strides[0]
    seg = np.ndarray((r1 - r0, nc + 1), table.dtype, table, first * step, (spr * step, step))
    view = memoryview(data)
    parts, shift, at = [view[:header_end]], [], header_end
    for a, b in zip(seg[:, 0].tolist(), seg[:, -1].tolist()):
        parts.append(view[a:b])
        shift.append(at - a - 1)  # the row's position in the output minus its position in the source, minus one
        at += b - a
    out = bytearray().join(parts)
    # every segment but the first follows a marker (a row's last one: the marker that ended it in the source):
    # check it is one, renumber it in the new sequence (pos: the marker's second byte); the last row's becomes
    # the end of image
    pos = (seg[:, :-1] + np.array(shift, dtype=np.int64)[:, None]).ravel()[1:]
    buf = np.frombuffer(out, dtype=np.uint8)
    try:
        if (len(pos) and buf[pos - 1].min() != 0xFF) or buf[-2] != 0xFF:
            raise RoiError("no restart marker where the restart table says: the table does not belong to these bytes")
        buf[pos] = _SEQUENCE[:len(pos)]
    except IndexError:  # an offset past the bytes read
        raise RoiError("the restart table does not fit the JPEG's data") from None
    buf[-1] = _EOI
    y0, x0 = r0 * mh, c0 * mw * interval
    rh, rw = min(h, r1 * mh) - y0, min(w, c1 * mw * interval) - x0
    out[sof + 5:sof + 9] = rh.to_bytes(2, "big") + rw.to_bytes(2, "big")
    return Roi(buf, y0, x0, rh, rw)
