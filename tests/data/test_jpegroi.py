"""Crop-box JPEG decoding (maecore.data.jpegroi) and the fast decoder's known-source path (FastRandomResizedCrop.
decode_known, which packed records take): the box's JPEG decodes to the whole image's pixels, bit for bit, for
boxes anywhere (edges, corners, 1 pixel, the whole image), odd sizes, 4:2:0 / 4:2:2 / 4:4:4 chroma and grey
images, restart markers per MCU or per MCU row; what cannot be cut is refused; a table that does not fit its bytes
is an error (a damaged record, skipped by the datasets); and decode_known gives __call__'s crops and RNG state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from maecore.data.crop import _DECODE_JPEG, JPEG_L, JPEG_RGB, FastRandomResizedCrop
from maecore.data.images import UnusableImage
from maecore.data.jpegroi import HEAD, RoiError, encode, restart_table, roi_jpeg


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from skimage import data as skd

    return Image.fromarray(skd.coffee())


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def decode(data: bytes | np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return _DECODE_JPEG(t)


def boxes(w: int, h: int, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width): random boxes, a quarter touching the bottom, a quarter the right edge, some of
    one pixel, plus the whole image, its corners, and its last columns and rows one pixel wide (where the last MCU
    is cut short: libjpeg switches off fancy upsampling for chroma 2 samples wide or less)."""
    rng = np.random.default_rng(seed)
    out = [(0, 0, h, w), (0, 0, 1, 1), (h - 1, w - 1, 1, 1)]
    out += [(0, x, h, 1) for x in range(max(0, w - 6), w)] + [(y, 0, 1, w) for y in range(max(0, h - 6), h)]
    for k in range(n):
        bh, bw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        if k % 4 == 1:
            top = h - bh
        elif k % 4 == 2:
            left = w - bw
        elif k % 8 == 3:
            bh, bw, top, left = 1, 1, int(rng.integers(0, h)), int(rng.integers(0, w))
        out.append((top, left, bh, bw))
    return out


CASES = [  # (size, mode, Pillow save options): restart markers per MCU or per row, every chroma layout Pillow writes
    ((500, 375), "RGB", {"restart_marker_blocks": 1}),
    ((500, 375), "RGB", {"restart_marker_rows": 1}),
    ((333, 211), "RGB", {"restart_marker_blocks": 1}),
    ((333, 211), "RGB", {"restart_marker_blocks": 1, "subsampling": 0}),  # 4:4:4
    ((333, 211), "RGB", {"restart_marker_blocks": 1, "subsampling": 1}),  # 4:2:2
    ((498, 213), "RGB", {"restart_marker_blocks": 1}),  # the last MCU column 2 pixels wide, the last row 5 high
    ((497, 99), "RGB", {"restart_marker_blocks": 1, "subsampling": 1}),
    ((500, 375), "RGB", {"restart_marker_blocks": 2}),  # two MCUs a segment (32 MCUs a row)
    ((333, 211), "L", {"restart_marker_blocks": 1}),
    ((61, 47), "L", {"restart_marker_rows": 1}),
    ((17, 9), "RGB", {"restart_marker_blocks": 1}),
]


@pytest.mark.parametrize("size, mode, options", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_box_jpeg_decodes_to_the_whole_images_pixels_bit_for_bit(photo, size, mode, options):
    img = photo.resize(size, Image.Resampling.LANCZOS).convert(mode)
    data = jpeg(img, **options)
    table = restart_table(data)
    assert table is not None and table.dtype == np.int32 and table[:2].tolist() == list(size)
    full = decode(data)
    assert full.shape == (3, size[1], size[0])
    decoded = 0
    for top, left, h, w in boxes(*size, n=120, seed=sum(size)):
        roi = roi_jpeg(data, table, top, left, h, w)
        out = decode(roi.data)
        assert out.shape == (3, roi.height, roi.width)
        y, x = top - roi.top, left - roi.left
        assert torch.equal(out[:, y:y + h, x:x + w], full[:, top:top + h, left:left + w])
        decoded += roi.height * roi.width
    if size == (500, 375) and options == {"restart_marker_blocks": 1}:
        assert decoded < 0.8 * 125 * size[0] * size[1]  # the point: far fewer pixels decoded than whole images


def test_encode_puts_restart_markers_where_asked(photo):
    img = photo.resize((500, 375))
    per_mcu, per_row = restart_table(encode(img, 90, "mcu")), restart_table(encode(img, 90, "row"))
    assert per_mcu[:5].tolist() == [500, 375, 16, 16, 1] and per_mcu[7] == 32 * 24  # 4:2:0: 16-px MCUs, one a segment
    assert per_row[:5].tolist() == [500, 375, 16, 16, 32] and per_row[7] == 24
    assert restart_table(encode(img.convert("L"), 90, "mcu"))[2:4].tolist() == [8, 8]
    with pytest.raises(ValueError):
        encode(img, 90, "block")


def test_what_cannot_be_cut_has_no_table(photo):
    img = photo.resize((333, 211))
    assert restart_table(jpeg(img)) is None  # no restart interval
    assert restart_table(jpeg(img, progressive=True, restart_marker_blocks=1)) is None  # several scans
    assert restart_table(jpeg(img, restart_marker_blocks=2)) is None  # 21 MCUs a row: segments would straddle rows
    png = io.BytesIO()
    img.save(png, "PNG")
    assert restart_table(png.getvalue()) is None
    assert restart_table(b"") is None and restart_table(b"\xff\xd8\xff") is None
    data = jpeg(img, restart_marker_blocks=1)
    assert restart_table(data[: len(data) // 2]) is None  # truncated: segments missing, no end of image


def test_a_table_that_does_not_fit_its_bytes_is_refused(photo):
    a, b = (jpeg(photo.resize((333, 211)).rotate(r), restart_marker_blocks=1) for r in (0, 90))
    ta, tb = restart_table(a), restart_table(b)
    box = (40, 50, 120, 150)
    assert ta is not None and tb is not None
    with pytest.raises(RoiError):
        roi_jpeg(b, ta, *box)  # another image's table: no marker where it says
    with pytest.raises(RoiError):
        roi_jpeg(a[: len(a) - 2000], ta, *box)  # truncated bytes: offsets past the end
    shifted = ta.copy()
    shifted[HEAD + 100:] += 7
    with pytest.raises(RoiError):
        roi_jpeg(a, shifted, *box)
    far = ta.copy()
    far[HEAD + 40:-1] += 10**6
    with pytest.raises(RoiError):
        roi_jpeg(a, far, *box)
    with pytest.raises(RoiError):
        roi_jpeg(a, ta[:-5], *box)  # a short table


def same_rng_run(fn, seed: int):
    torch.default_generator.manual_seed(seed)
    out = fn()
    return out, torch.rand(1)


@pytest.mark.parametrize("mode, size", [("RGB", (500, 375)), ("L", (333, 211)), ("RGB", (1600, 1200))])
def test_known_sources_give_the_same_crops_and_rng_as_the_header_path(photo, mode, size):
    """decode_known (size and kind from a packed index, with or without a restart table) vs __call__ on the same
    bytes (header parsed by Pillow, whole image decoded): the same uint8 crop and the same RNG state after, for RGB
    and grey JPEGs, and for 1600x1200, where large boxes go through Pillow's DCT-scaled decode."""
    img = photo.resize(size, Image.Resampling.LANCZOS).convert(mode)
    with_markers, plain = encode(img, 90, "mcu"), jpeg(img)
    table = restart_table(with_markers)
    kind = JPEG_RGB if mode == "RGB" else JPEG_L
    fast = FastRandomResizedCrop(224)
    for seed in range(12):
        ref, after = same_rng_run(lambda: fast(with_markers), seed)
        got, after2 = same_rng_run(lambda: fast.decode_known(with_markers, *size, kind, table), seed)
        assert got.dtype == torch.uint8 and torch.equal(got, ref) and torch.equal(after, after2)
        if mode == "RGB":  # an RGB JPEG without a table: whole-image decode, no header parse
            ref, after = same_rng_run(lambda: fast(plain), seed)
            got, after2 = same_rng_run(lambda: fast.decode_known(plain, *size, kind), seed)
            assert torch.equal(got, ref) and torch.equal(after, after2)


def test_known_source_that_does_not_match_its_record_is_unusable_and_draws_nothing(photo):
    img = photo.resize((333, 211))
    data = encode(img, 90, "mcu")
    table = restart_table(data)
    other = restart_table(encode(img.rotate(90), 90, "mcu"))
    fast = FastRandomResizedCrop(64)
    for args in ((data, 333, 211, JPEG_RGB, other), (data[:3000], 333, 211, JPEG_RGB, None), (data, 300, 211, JPEG_RGB, None),
                 (data[:-3000], 333, 211, JPEG_RGB, table)):
        torch.default_generator.manual_seed(3)
        with pytest.raises(UnusableImage):
            fast.decode_known(*args)
        assert torch.equal(torch.rand(1), same_rng_run(lambda: None, 3)[1])  # the RNG as it was found


def test_reencoding_keeps_the_sources_chroma_subsampling(photo, tmp_path):
    """``--roi`` and the capped re-encode keep a JPEG's chroma subsampling by default (a 4:4:4 source is not cut to
    4:2:0: docs/benchmarks.md has the PSNR); other formats, with full chroma, become 4:4:4; grey stays grey;
    ``--subsampling`` picks one for all; the 4:4:4 and 4:2:2 re-encodes still cut into boxes."""
    from maecore.data.jpegroi import SUBSAMPLINGS, source_subsampling
    from maecore.data.packed.writer import prepare

    img = photo.resize((96, 64))

    def kept(data: bytes) -> str:
        with Image.open(io.BytesIO(data)) as im:
            return "L" if im.mode == "L" else source_subsampling(im)

    sources = {ss: jpeg(img, subsampling=code) for ss, code in SUBSAMPLINGS.items()}
    sources["png"] = b""
    for name in sources:
        path = tmp_path / f"{name.replace(':', '')}.{'png' if name == 'png' else 'jpg'}"
        img.save(path) if name == "png" else path.write_bytes(sources[name])
        for mode, want in (("keep", "4:4:4" if name == "png" else name), ("4:2:0", "4:2:0")):
            roi = prepare((str(path), None, None, 90, "mcu", mode))
            capped = prepare((str(path), 48, None, 90, None, mode))
            assert kept(roi.data) == kept(capped.data) == want, (name, mode)
            assert roi.table is not None and int(roi.table[2]) == (8 if want == "4:4:4" else 16)  # the MCU width
    grey = tmp_path / "grey.jpg"
    img.convert("L").save(grey, quality=90)
    assert kept(prepare((str(grey), None, None, 90, "mcu", "keep")).data) == "L"
