"""Cheap decoding (``--decode fast``): RandomResizedCrop + flip with the official pipeline's crop boxes, decoding
JPEGs at the DCT scale the crop allows and resizing only the box, handing uint8 tensors to the main process, which
normalises them on the device (:class:`maecore.data.pixels.UInt8Normalize`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from maecore.data.images import ImageSource, UnusableImage, to_rgb
from maecore.data.jpegroi import MIN_SAVING, RoiError, roi_bounds, roi_jpeg, roi_saving

DCT_SCALES = (8, 4, 2)  # what libjpeg decodes at directly (1/8, 1/4, 1/2), largest first
DRAFTABLE = ("JPEG", "MPO")  # Pillow formats whose decoder takes a DCT scale (MPO: a camera's multi-picture JPEG)
RESIZES = ("torch", "pil")


def _tv_decode_jpeg() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's CPU JPEG decoder (libjpeg-turbo; RGB out), or None where this torchvision has none.  On the
    same bytes it gives Pillow's pixels bit for bit (tests/data/test_fastdata.py) at about half Pillow's time on a
    500x375 photo: Pillow feeds its decoder in chunks through Python, torchvision decodes the buffer in one call.
    The operator is called directly where torchvision registers it (what ``decode_jpeg`` calls after its usage
    logging and deprecation warning, ~20 us a call that buy nothing here); libjpeg's own warnings about damaged
    data go to stderr either way."""
    import warnings

    try:
        with warnings.catch_warnings():  # torchvision 0.29 announces torchcodec as the future home of decoding
            warnings.simplefilter("ignore")
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover - every torchvision this project supports has it
        return None
    rgb = ImageReadMode.RGB
    try:
        op = torch.ops.image.decode_jpeg
    except (AttributeError, RuntimeError):  # pragma: no cover - a torchvision that registers it elsewhere
        op = None
    if op is not None:
        mode = int(rgb.value)
        return lambda data: op(data, mode, False)

    def decode(data: torch.Tensor) -> torch.Tensor:  # pragma: no cover - see above
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode_jpeg(data, mode=rgb)

    return decode


_DECODE_JPEG = _tv_decode_jpeg()


def _resize_aa() -> Callable[..., torch.Tensor]:
    """``F.interpolate(x, size, mode="bicubic", antialias=True)`` of a 4-D tensor: the operator it calls (the
    same overload and arguments, so the same pixels), without its ~15 us of argument checks a call."""
    op = getattr(torch._C._nn, "_upsample_bicubic2d_aa", None)
    if op is None:  # pragma: no cover - every torch this project supports has it
        return lambda x, size, align_corners, scales: F.interpolate(x, size=size, mode="bicubic", antialias=True)
    return op


_RESIZE_AA = _resize_aa()


def dct_scale(crop_wh: tuple[int, int], out_wh: tuple[int, int]) -> int:
    """The largest JPEG DCT scale (8, 4, 2, else 1) at which a crop of ``crop_wh`` source pixels still has at
    least ``out_wh`` pixels: decoding there never goes below the output resolution of the crop."""
    for s in DCT_SCALES:
        if crop_wh[0] >= s * out_wh[0] and crop_wh[1] >= s * out_wh[1]:
            return s
    return 1


JPEG_RGB, JPEG_L = 1, 2  # what a caller may know of a source without opening it (FastRandomResizedCrop.decode_known)


def jpeg_kind(fmt: str | None, mode: str | None) -> int:
    """:data:`JPEG_RGB` for what Pillow opens as an RGB JPEG, :data:`JPEG_L` for a grey one, else 0."""
    return {"RGB": JPEG_RGB, "L": JPEG_L}.get(mode or "", 0) if fmt == "JPEG" else 0


class CropPlan(NamedTuple):
    """One sample's augmentation: the crop box in source pixels (torchvision's ``(i, j, h, w)``) and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class FastRandomResizedCrop:
    """``RandomResizedCrop(size, scale, ratio, bicubic)`` + ``RandomHorizontalFlip`` as a decoder: an image
    source (path, bytes, binary file) in, a **uint8** CHW tensor out; it is normalised later, in the main process
    or on the device (:class:`UInt8Normalize`).

    *Same distribution, by construction.*  The box is drawn as torchvision's ``RandomResizedCrop.get_params`` draws
    it (the same torch RNG calls, the same arithmetic: :meth:`plan_size`) on the size read from the header
    (``Image.open`` is lazy) or known beforehand (:meth:`decode_known`), then one ``torch.rand(1)`` decides the flip:
    the torch RNG calls of ``Compose([RandomResizedCrop, RandomHorizontalFlip])`` in the same order, so under the
    same RNG state (the sampler seeds each sample) box and flip are the official ones.  *Cheaper*: a JPEG is decoded
    at the largest DCT scale 1/2, 1/4, 1/8 at which the box still covers the output size (:func:`dct_scale`), the box
    is mapped into the reduced image (coordinates / scale); only the box is resized (no full-image convert, no float
    crop, no normalise in the worker); the result stays uint8 (a quarter of the bytes through the worker queue and
    the host-to-device copy).

    *Pixels* (measured in tests/data/test_fastdata.py).  ``resize="pil"`` at DCT scale 1 (no reduction: every crop
    narrower or lower than twice the output, e.g. all 224-px crops of 500x375 photos) crops then resizes with
    Pillow's bicubic, as torchvision does on PIL images: the uint8 pixels are **bitwise identical** to the official
    pipeline's, hence so is the normalised batch.  (Pillow's ``resize(box=…)`` on the whole image differs at the
    box's border, by up to ~4 of 255 on ~0.5 % of the pixels: it reads source pixels outside the box.)
    ``resize="torch"`` (default) resizes with torch's uint8 antialiased bicubic (Pillow's kernel, 3-4x faster):
    ~1.4 % of the pixels differ from Pillow's, mostly by 1 of 255; crops close to 1x scale differ on up to ~20 % of
    their pixels, by up to ~10 (the two round between their horizontal and vertical passes differently); the mean
    of a crop moves by under 0.05 of 255.  At a reduced DCT scale the pixels differ
    from the official ones (libjpeg's DCT downscale replaces part of the bicubic antialias; with ``"torch"`` the
    box is also rounded to whole reduced pixels, under 0.5 % of its side); the per-channel statistics match within
    the tolerances the tests state.

    An unreadable source raises one of :data:`UNREADABLE` (:class:`ImageFiles` skips and counts it as on the
    official path) and leaves the torch RNG as it found it, so the substitute gets the official crop too.

    *Known sources* (:meth:`decode_known`; a packed dataset's records, whose size and kind the index holds): no
    header parse; a JPEG with a restart-marker table (``maecore.data.packed --roi``) is decoded only over the MCUs the
    box touches (:func:`maecore.data.jpegroi.roi_jpeg`: the same pixels, bit for bit).
    """

    rngs = ("torch",)  # the only global RNG it draws from: SeededDataset seeds (and restores) just that one
    roi_min_saving = MIN_SAVING  # decode_known decodes the box's MCUs only when that spares at least this many pixels

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), flip: bool = True, resize: str = "torch") -> None:
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))  # (h, w), as torchvision
        self.scale, self.ratio, self.flip, self.resize = scale, ratio, flip, resize
        # torchvision computes these float32 logs each call and uniform_ reads them as doubles: the same values
        self._log_ratio = tuple(float(v) for v in torch.log(torch.tensor(ratio)))
        self._draws = (torch.empty(1), torch.empty(1, dtype=torch.int64))  # plan_size's scratch: not two tensors a sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip}, resize={self.resize!r})"

    def plan(self, im: Image.Image) -> CropPlan:
        """Draw this sample's box and flip from the torch RNG, exactly as the official transforms draw them."""
        return self.plan_size(im.width, im.height)

    def plan_size(self, width: int, height: int) -> CropPlan:
        """:meth:`plan` for an image of ``width`` x ``height``: torchvision's ``RandomResizedCrop.get_params``
        (the same RNG calls in the same order on the same dtypes, the same float arithmetic, the same central-crop
        fallback after 10 tries) without its per-call overhead (~4x: a tensor for the log-ratios each call, the
        PIL size query), then the flip's ``torch.rand(1)``; tests/data/test_fastdata.py checks box, flip and the RNG
        state left behind against torchvision's."""
        area = height * width
        s0, s1 = self.scale
        r0, r1 = self._log_ratio
        f, i = self._draws  # one float32 and one int64 draw at a time, as torchvision
        for _ in range(10):
            target_area = area * f.uniform_(s0, s1).item()
            aspect_ratio = f.uniform_(r0, r1).exp_().item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(i.random_(0, height - h + 1).item())  # = torch.randint(0, height - h + 1, (1,))
                left = int(i.random_(0, width - w + 1).item())
                break
        else:  # central crop, as torchvision falls back
            in_ratio = float(width) / float(height)
            if in_ratio < min(self.ratio):
                w, h = width, int(round(width / min(self.ratio)))
            elif in_ratio > max(self.ratio):
                w, h = int(round(height * max(self.ratio))), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        return CropPlan(top, left, h, w, self.flip and f.uniform_().item() < 0.5)  # = torch.rand(1) < 0.5

    def render(self, im: Image.Image, plan: CropPlan, data: bytes | None = None) -> torch.Tensor:
        """Decode ``im`` (opened, not yet loaded) at the DCT scale ``plan`` allows; the box resized and flipped,
        uint8 CHW.  ``data``: the file's bytes, when the caller has them (a full-scale baseline RGB JPEG is then
        decoded by libjpeg-turbo in one call, see :func:`_tv_decode_jpeg`)."""
        out_h, out_w = self.size
        k = dct_scale((plan.width, plan.height), (out_w, out_h))
        if (data is not None and _DECODE_JPEG is not None and self.resize == "torch" and im.format == "JPEG"
                and im.mode == "RGB" and k == 1):
            try:
                full = _DECODE_JPEG(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            except RuntimeError as e:  # corrupt / truncated: skipped and counted, as Pillow's OSError is
                raise UnusableImage(f"cannot decode JPEG: {str(e).strip().splitlines()[-1]}") from None
            if tuple(full.shape[-2:]) != (im.height, im.width):
                raise UnusableImage(f"JPEG decoded to {tuple(full.shape[-2:])}, header says {(im.height, im.width)}")
            return self._resize_box(full, (plan.left, plan.top, plan.left + plan.width, plan.top + plan.height), plan.flip)
        s = 1
        if im.format in DRAFTABLE and k > 1:
            full_w = im.width
            got = im.draft("RGB", (im.width // k, im.height // k))  # asks for exactly scale k (see dct_scale)
            if got is not None:
                s = round(full_w / got[1][2])
        im.load()
        img = im if im.mode == "RGB" else to_rgb(im)  # as load_rgb; an RGB decode needs no copy
        box = (plan.left / s, plan.top / s, (plan.left + plan.width) / s, (plan.top + plan.height) / s)
        if self.resize == "pil":
            if s == 1:  # crop, then resize the crop: torchvision's resized_crop on PIL, pixel for pixel
                out = img.crop((plan.left, plan.top, plan.left + plan.width, plan.top + plan.height))
                out = out.resize((out_w, out_h), Image.Resampling.BICUBIC)
            else:  # a sub-pixel box in the reduced image
                out = img.resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)
            if plan.flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return torch.from_numpy(np.array(out)).permute(2, 0, 1)
        left, top = min(round(box[0]), img.width - 1), min(round(box[1]), img.height - 1)
        right, bottom = max(min(round(box[2]), img.width), left + 1), max(min(round(box[3]), img.height), top + 1)
        x = torch.from_numpy(np.array(img.crop((left, top, right, bottom)))).permute(2, 0, 1)
        return self._resize_box(x, (0, 0, x.shape[-1], x.shape[-2]), plan.flip)

    def _resize_box(self, img: torch.Tensor, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        """uint8 CHW ``img``: the integer ``box`` (left, top, right, bottom) resized to the output (torch's
        antialiased bicubic), flipped if asked."""
        out_h, out_w = self.size
        x = img[:, box[1]:box[3], box[0]:box[2]].unsqueeze(0)
        if x.shape[-2:] != (out_h, out_w):
            # HWC memory (the decoders'), made contiguous first: the uint8 antialiased kernel reads a crop of a bigger
            # image ~1.4x slower than a channels-last copy of it (a channels-first contiguous() costs 3x); same pixels.
            # (Flipping the box in that copy instead of the output gives the same pixels too, but costs more: the box
            # is mostly larger than the output.)
            x = _RESIZE_AA(x.contiguous(memory_format=torch.channels_last), (out_h, out_w), False, None)
        x = x[0]
        return x.flip(-1) if flip else x

    def decode_known(self, data: bytes, width: int, height: int, kind: int, table: np.ndarray | None = None) -> torch.Tensor:
        """:meth:`__call__` for the bytes of an image whose size (``width`` x ``height``) and ``kind`` (:func:`jpeg_kind`)
        the caller knows: the box is drawn without parsing the header, and a full-scale crop of an RGB JPEG is
        decoded by libjpeg-turbo straight away; with ``table`` (:func:`maecore.data.jpegroi.restart_table`, RGB or grey
        JPEG) only the MCUs the box touches are decoded (unless that spares fewer than :attr:`roi_min_saving` pixels:
        small images are decoded whole); the table's last offset must be the record's size.  The pixels are
        :meth:`__call__`'s, bit for bit.  Anything
        else (a reduced DCT scale, Pillow resizing, another kind) takes :meth:`__call__`'s path with the same box.
        Bytes that do not decode to the stated size, or do not fit ``table``, raise :class:`UnusableImage` (skipped
        and counted), the RNG left as it was found."""
        if _DECODE_JPEG is None or self.resize != "torch" or not (kind == JPEG_RGB or (kind == JPEG_L and table is not None)):
            return self(data)
        rng = torch.get_rng_state()
        try:
            plan = self.plan_size(width, height)
            if dct_scale((plan.width, plan.height), (self.size[1], self.size[0])) > 1:  # Pillow's draft decodes it
                with Image.open(io.BytesIO(data)) as im:
                    if im.size != (width, height):
                        raise UnusableImage(f"image is {im.size[0]}x{im.size[1]}, its record says {width}x{height}")
                    return self.render(im, plan, data)
            box = (plan.left, plan.top, plan.left + plan.width, plan.top + plan.height)
            if table is not None and int(table[-1]) != len(data):
                raise UnusableImage(f"its restart table ends at byte {int(table[-1])}, the JPEG has {len(data)}: the record is damaged")
            bounds = None if table is None else roi_bounds(table, plan.top, plan.left, plan.height, plan.width)
            if bounds is None or roi_saving(table, bounds) < self.roi_min_saving:
                src, top, left, shape = torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, 0, (height, width)
            else:
                try:
                    roi = roi_jpeg(data, table, plan.top, plan.left, plan.height, plan.width, bounds)
                except RoiError as e:
                    raise UnusableImage(str(e)) from None
                src, top, left, shape = torch.from_numpy(roi.data), roi.top, roi.left, (roi.height, roi.width)
            try:
                img = _DECODE_JPEG(src)
            except RuntimeError as e:  # corrupt / truncated: skipped and counted, as Pillow's OSError is
                raise UnusableImage(f"cannot decode JPEG: {str(e).strip().splitlines()[-1]}") from None
            if tuple(img.shape[-2:]) != shape:
                raise UnusableImage(f"JPEG decoded to {tuple(img.shape[-2:])}, its record says {shape}")
            return self._resize_box(img, (box[0] - left, box[1] - top, box[2] - left, box[3] - top), plan.flip)
        except BaseException as e:
            torch.set_rng_state(rng)
            if isinstance(e, Image.DecompressionBombError):
                raise UnusableImage(str(e)) from None
            raise

    def __call__(self, source: ImageSource) -> torch.Tensor:
        data = None
        if isinstance(source, str | Path):  # one read: the header for the plan, the bytes for the decoder
            with open(source, "rb") as f:
                data = f.read()
        elif isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
        if data is not None:
            source = io.BytesIO(data)
        rng = torch.get_rng_state()
        try:
            with Image.open(source) as im:
                return self.render(im, self.plan(im), data)
        except BaseException as e:
            torch.set_rng_state(rng)  # an unreadable source draws nothing, as on the official path
            if isinstance(e, Image.DecompressionBombError):
                raise UnusableImage(str(e)) from None
            raise
