"""Image datasets that survive bad files, and a sampler that makes runs resumable mid-epoch.

Determinism: every sample's augmentation is seeded from (seed, epoch, index), handed over by the
sampler, so the same sample gets the same crop whatever the number of workers, the rank layout or
where a resumed run restarts.

Cheap decoding (:class:`FastRandomResizedCrop`, ``--decode fast``): RandomResizedCrop + flip with the official
pipeline's crop boxes, decoding JPEGs at the DCT scale the crop allows and resizing only the box, handing uint8
tensors to the main process, which normalises them on the device (:class:`UInt8Normalize`).  :class:`GpuJpegCrop`
and :class:`GpuDecode` (``--decode gpu``) move the JPEG decode itself onto a CUDA device.
"""

from __future__ import annotations

import atexit
import io
import logging
import math
import multiprocessing
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info

from maecore.errors import UserError
from maecore.jpegroi import MIN_SAVING, RoiError, roi_bounds, roi_jpeg, roi_saving

log = logging.getLogger(__name__)

ALL_RNGS = ("random", "numpy", "torch")  # the global RNGs SeededDataset seeds per sample (python's, numpy's, torch's CPU one)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MAX_SUBSTITUTES = 20


def check_dir(path: str | Path, what: str = "dataset") -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} directory not found: {p}")
    if not p.is_dir():
        raise UserError(f"{what} path is not a directory: {p}")
    return p


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


class UnusableImage(OSError, ValueError):
    """A file that decodes but cannot be made an 8-bit RGB image without guessing (the message says why).
    An ``OSError`` and a ``ValueError``, so every place that skips unreadable files skips it too."""


# what load_rgb raises for a file it cannot use: unreadable, truncated, not an image, refused, a bomb
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as an image viewer shows them


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode, with the right scaling (never by clipping to 0-255):

    * 16-bit grey (``I;16*``, and ``I`` within 0-65535, which is how PNG/TIFF 16-bit decode) is divided by
      257, the exact inverse of the 8->16-bit widening (v * 257): full scale maps to full scale and the
      same scene at either depth gives the same pixels.  Not stretched to the image's own range: that would
      brighten a dark image and change contrast image by image, a hidden augmentation;
    * 32-bit float (``F``) in [0, 1] is multiplied by 255;
    * alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) is composited over white;
    * ``I`` outside 0-65535, ``F`` outside [0, 1] or with NaN, and modes Pillow cannot convert are refused
      with :class:`UnusableImage` (any fixed scale would be a guess).
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise UnusableImage(f"{mode} image with values {lo}..{hi}, outside the 16-bit range: no known scale to 8 bits")
        a8 = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(a8).convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            raise UnusableImage(f"32-bit float image with values {lo:g}..{hi:g} (or NaN/inf), not in [0, 1]: no known scale to 8 bits")
        return Image.fromarray(np.rint(a * 255.0).astype(np.uint8)).convert("RGB")
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            canvas = Image.new("RGB", im.size, ALPHA_BACKGROUND)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return im.convert("RGB")
    except ValueError as e:  # Pillow has no conversion for this mode
        raise UnusableImage(f"{mode} image: {e}") from None


ImageSource = str | Path | bytes | BinaryIO
"""What :func:`load_rgb` decodes: a file path, the encoded bytes (a record of a packed dataset), or an open
binary file positioned at the image."""


def load_rgb(source: ImageSource, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image as 8-bit RGB (see :func:`to_rgb` for other depths and alpha).  With ``draft_size`` a
    JPEG is decoded at the smallest 1/2, 1/4, 1/8 scale that is still at least that size (libjpeg's DCT
    scaling) — much cheaper for big photos.  Raises one of :data:`UNREADABLE` for a source it cannot use."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as im:
            if draft_size is not None and im.format == "JPEG":
                im.draft("RGB", draft_size)
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise UnusableImage(str(e)) from None


def describe(source: ImageSource) -> str:
    """A source as warnings name it: the path, a named record's name, else its kind and size (never the bytes)."""
    if isinstance(source, str | Path):
        return str(source)
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    return f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray | memoryview) else f"<{type(source).__name__}>"


def try_load_rgb(source: ImageSource, draft_size: tuple[int, int] | None = None) -> Image.Image | None:
    """:func:`load_rgb`, or ``None`` and one warning line for a source it cannot use (figures, tools)."""
    try:
        return load_rgb(source, draft_size)
    except UNREADABLE as e:
        log.warning("skipping unreadable image %s: %s", describe(source), e)
        return None


def worker_error_line(e: BaseException) -> str:
    """The one line of an exception re-raised by a DataLoader worker (whose message carries the worker's
    whole traceback): the original exception's own message."""
    msg = str(e)
    if "Original Traceback" not in msg:
        return msg
    lines = [line for line in msg.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else msg
    for prefix in (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def _kill_daemonic_children() -> None:
    """Exit hook: end the DataLoader workers still alive (a persistent loader a script let go of without shutting
    it down).  multiprocessing's own hook would SIGTERM them and wait, forever, since ``ignore_stop_signals``
    makes them ignore SIGTERM; SIGKILL is what a daemonic child gets at its parent's exit anyway."""
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(5)


# registered after multiprocessing's own hook (imported with torch), so it runs first (atexit is LIFO)
atexit.register(_kill_daemonic_children)


def shutdown_workers(loader: Any) -> None:
    """Stop a DataLoader's persistent workers now (the loader stays usable: a next ``iter`` starts new ones).
    Without this they live as long as the loader object, which a reference cycle can keep until exit."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        loader._iterator = None


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT/SIGTERM/SIGUSR1, which the training process
    handles (it finishes the step and checkpoints): a worker killed by a Ctrl-C sent to the process group, or
    by SLURM signalling every process, would make the main process fail with 'worker exited unexpectedly'.
    Workers still end with their parent: the trainer shuts them down when ``fit`` ends (``shutdown_workers``),
    and an exit hook kills any left (``_kill_daemonic_children``)."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if s is not None:
            signal.signal(s, signal.SIG_IGN)


class ImageFiles(Dataset):
    """Images under ``root``, with class sub-folders (``root/<class>/…``, ImageNet layout) or without.

    Without class folders every target is -1.  A file that cannot be decoded is reported once,
    counted, and replaced by the next readable one, so a long run never dies on one bad file and
    batches keep their size (which DDP and static-shape compilation need).

    ``decoder`` (e.g. :class:`FastRandomResizedCrop`) replaces decoding + ``transform``: it takes the source
    (path or bytes) itself, so it can read the header before it decodes, and raises one of :data:`UNREADABLE`
    for a source it cannot use, which is skipped and counted the same way.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        draft_size: tuple[int, int] | None = None,
        decoder: Callable[[ImageSource], Any] | None = None,
    ) -> None:
        self.root = check_dir(root)
        self.transform = transform
        self.draft_size = draft_size
        self.decoder = decoder
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        samples: list[tuple[Path, int]] = []
        self.classes: list[str] = []
        for d in class_dirs:
            files = list_images(d)
            if files:
                samples += [(f, len(self.classes)) for f in files]
                self.classes.append(d.name)
        loose = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if loose and self.classes:
            log.warning("%s: %d images beside class folders are ignored", self.root, len(loose))
        elif loose:
            samples = [(f, -1) for f in loose]
        if not samples:
            raise UserError(f"no images found under {self.root} (looked for {', '.join(IMG_EXTENSIONS)})")
        self.samples = samples
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def rngs(self) -> tuple[str, ...]:
        """The global RNGs a sample's decoding and transforms may draw from (what :class:`SeededDataset` seeds): the
        ``decoder``'s own list when it declares one and no ``transform`` follows, else all of them."""
        if self.transform is None and self.decoder is not None:
            return tuple(getattr(self.decoder, "rngs", ALL_RNGS))
        return ALL_RNGS

    def decode(self, source: ImageSource) -> Any:
        """An image source as this dataset's samples start: the ``decoder``'s output, else the protected
        loader's RGB image (``transform`` comes next)."""
        return self.decoder(source) if self.decoder is not None else load_rgb(source, self.draft_size)

    def read(self, source: Any) -> Any:
        """Decode one sample's source (here a file path); a subclass that stores its images elsewhere
        (``maecore.packed.PackedImages``) overrides this and keeps :meth:`load`."""
        return self.decode(source)

    def load(self, index: int) -> tuple[Any, int, int]:
        """(image, target, number of unreadable files skipped to get it); the image as :meth:`decode` made it."""
        for tried in range(MAX_SUBSTITUTES):
            source, target = self.samples[(index + tried) % len(self.samples)]
            try:
                return self.read(source), target, tried
            except UNREADABLE as e:
                log.warning("skipping unreadable image %s: %s", source, e)
        raise UserError(f"{MAX_SUBSTITUTES} unreadable images in a row near {self.samples[index][0]}")

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        img, target, skipped = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, target, skipped


# ---- cheap decoding: RandomResizedCrop at the JPEG DCT scale the crop allows -------------------------------
DCT_SCALES = (8, 4, 2)  # what libjpeg decodes at directly (1/8, 1/4, 1/2), largest first
DRAFTABLE = ("JPEG", "MPO")  # Pillow formats whose decoder takes a DCT scale (MPO: a camera's multi-picture JPEG)
RESIZES = ("torch", "pil")


def _tv_decode_jpeg() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's CPU JPEG decoder (libjpeg-turbo; RGB out), or None where this torchvision has none.  On the
    same bytes it gives Pillow's pixels bit for bit (tests/test_fastdata.py) at about half Pillow's time on a
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

    *Pixels* (measured in tests/test_fastdata.py).  ``resize="pil"`` at DCT scale 1 (no reduction: every crop
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
    header parse; a JPEG with a restart-marker table (``maecore.packed --roi``) is decoded only over the MCUs the box
    touches (:func:`maecore.jpegroi.roi_jpeg`: the same pixels, bit for bit).
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip}, resize={self.resize!r})"

    def plan(self, im: Image.Image) -> CropPlan:
        """Draw this sample's box and flip from the torch RNG, exactly as the official transforms draw them."""
        return self.plan_size(im.width, im.height)

    def plan_size(self, width: int, height: int) -> CropPlan:
        """:meth:`plan` for an image of ``width`` x ``height``: torchvision's ``RandomResizedCrop.get_params``
        (the same RNG calls in the same order on the same dtypes, the same float arithmetic, the same central-crop
        fallback after 10 tries) without its per-call overhead (~4x: a tensor for the log-ratios each call, the
        PIL size query), then the flip's ``torch.rand(1)``; tests/test_fastdata.py checks box, flip and the RNG
        state left behind against torchvision's."""
        area = height * width
        s0, s1 = self.scale
        r0, r1 = self._log_ratio
        f, i = torch.empty(1), torch.empty(1, dtype=torch.int64)  # one float32 and one int64 draw at a time, as torchvision
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
            # image ~1.4x slower than a channels-last copy of it (a channels-first contiguous() costs 3x); same pixels
            x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(out_h, out_w), mode="bicubic", antialias=True)
        x = x[0]
        return x.flip(-1) if flip else x

    def decode_known(self, data: bytes, width: int, height: int, kind: int, table: np.ndarray | None = None) -> torch.Tensor:
        """:meth:`__call__` for the bytes of an image whose size (``width`` x ``height``) and ``kind`` (:func:`jpeg_kind`)
        the caller knows: the box is drawn without parsing the header, and a full-scale crop of an RGB JPEG is
        decoded by libjpeg-turbo straight away; with ``table`` (:func:`maecore.jpegroi.restart_table`, RGB or grey
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


NORMALIZE_CHUNK = 2  # images normalised at a time on the CPU (2 x 3 x 224 x 224 floats: 1.2 MB, within L2)


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``ToTensor`` + ``Normalize`` of uint8 images (``(..., C, H, W)``, on any device, any memory layout): the same
    float32 operations in the same order (/ 255, - mean, / std), so equal pixels give bitwise the official floats;
    a batch comes out channels-first contiguous, as the official pipeline's."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    if images.device.type != "cpu" or images.dim() != 4:
        return images.to(torch.float32, memory_format=torch.contiguous_format).div_(255).sub_(m).div_(s)
    # on the CPU a few images at a time, so the four passes run in cache (~30 % less time for a batch of 32
    # 224-px images); element by element the same operations, so the same floats
    out = torch.empty(images.shape, dtype=torch.float32)
    for k in range(0, len(images), NORMALIZE_CHUNK):
        o = out[k:k + NORMALIZE_CHUNK]
        o.copy_(images[k:k + NORMALIZE_CHUNK]).div_(255).sub_(m).div_(s)
    return out


class UInt8Normalize:
    """A trainer's ``device_batch`` hook: an ``(images, ...)`` batch whose images are uint8 (the fast decoders')
    gets them normalised where the batch now is (the device); any other batch passes unchanged."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, batch: Any) -> Any:
        images = batch[0] if isinstance(batch, tuple | list) else batch
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
            return batch
        out = normalize_uint8(images, self.mean, self.std)
        return type(batch)((out, *batch[1:])) if isinstance(batch, tuple | list) else out


# ---- --decode gpu: JPEG bytes from the workers, decoded on the device ----------------------------------------
class EncodedBatch:
    """A batch's images as :class:`GpuJpegCrop` leaves them: per sample ``(payload, plan)``, the payload the
    JPEG's bytes, or for a source the GPU path does not take the uint8 crop made on the CPU.  Not a tensor or a
    list, so ``to_device`` and pinning pass it through (nvJPEG reads its input from host memory)."""

    def __init__(self, items: list[tuple[bytes | torch.Tensor, CropPlan]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)


class GpuJpegCrop(FastRandomResizedCrop):
    """The worker's half of ``--decode gpu``: reads the header only and draws box and flip as
    :class:`FastRandomResizedCrop` (the same RNG calls), then hands over the bytes of an RGB or grey JPEG that
    ends with its end-of-image marker (a truncated one is caught here, skipped and counted as on the CPU paths);
    anything else is decoded here on the CPU path.  :class:`GpuDecode` finishes in the main process."""

    decode_known = None  # type: ignore[assignment]  # packed records take __call__: nvJPEG decodes whole files

    def __call__(self, source: ImageSource) -> tuple[bytes | torch.Tensor, CropPlan]:  # type: ignore[override]
        if isinstance(source, str | Path):
            data = Path(source).read_bytes()
        elif isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
        else:
            data = source.read()
        rng = torch.get_rng_state()
        try:
            with Image.open(io.BytesIO(data)) as im:
                plan = self.plan(im)
                if im.format in DRAFTABLE and im.mode in ("RGB", "L") and data.rstrip(b"\0")[-2:] == b"\xff\xd9":
                    return data, plan
                return self.render(im, plan), plan
        except BaseException as e:
            torch.set_rng_state(rng)
            if isinstance(e, Image.DecompressionBombError):
                raise UnusableImage(str(e)) from None
            raise


def collate_encoded(batch: list[tuple[Any, int, int]]) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` for :class:`GpuJpegCrop` samples ``((payload, plan), target, skipped)``."""
    return (EncodedBatch([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), torch.tensor([b[2] for b in batch]))


class GpuDecode:
    """A trainer's ``device_batch`` hook, the main process's half of ``--decode gpu``: decodes the batch's JPEGs
    with nvJPEG (``torchvision.io.decode_jpeg(..., device=cuda)``, one batched call), crops each plan's box,
    resizes it (bicubic, antialiased: torchvision.transforms.v2.functional), flips, stacks and normalises.  An image
    nvJPEG refuses (damage past the header) cannot be replaced by the next file any more: it is replaced by
    another image of the same batch, logged and counted in ``n_skipped``.  Other batches are only normalised."""

    def __init__(self, size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.device = torch.device(device)
        self.normalize = UInt8Normalize(mean, std)

    def decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        if not tensors:
            return []
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad image fails the batched call: decode one by one to find it
            out: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as e:
                    log.warning("skipping an image the GPU decoder refuses (%s): replaced by another of its batch", e)
                    out.append(None)
            return out

    def crop(self, img: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import InterpolationMode

        x = img[:, plan.top : plan.top + plan.height, plan.left : plan.left + plan.width]
        x = TF.resize(x, list(self.size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        return x.flip(-1) if plan.flip else x

    def __call__(self, batch: Any) -> Any:
        if not (isinstance(batch, tuple | list) and isinstance(batch[0], EncodedBatch)):
            return self.normalize(batch)
        enc, *rest = batch
        jpegs = [i for i, (p, _) in enumerate(enc.items) if isinstance(p, bytes)]
        decoded = dict(zip(jpegs, self.decode([enc.items[i][0] for i in jpegs])))  # type: ignore[misc]
        outs: list[torch.Tensor | None] = []
        for i, (payload, plan) in enumerate(enc.items):
            if i in decoded:
                img = decoded[i]
                outs.append(None if img is None else self.crop(img, plan))
            else:
                outs.append(payload.to(self.device, non_blocking=True))  # type: ignore[union-attr]
        bad = [i for i, o in enumerate(outs) if o is None]
        if bad:
            good = [o for o in outs if o is not None]
            if not good:
                raise UserError(f"the GPU decoder refused every image of a batch of {len(outs)}")
            outs = [good[n % len(good)] if o is None else o for n, o in enumerate(outs)]
            if len(rest) >= 2 and isinstance(rest[1], torch.Tensor):
                rest[1] = rest[1].clone()
                rest[1][bad] += 1
        return self.normalize((torch.stack(outs), *rest))  # type: ignore[arg-type]


# ---- --decode: the choice of input pipeline the training CLIs share (pretrain, the classification probe) ----
DECODES = ("fast", "official", "gpu")
DECODE_HELP = ("fast (default): JPEG DCT scale chosen from the crop, only the box resized, uint8 to the device, normalised "
               "there; official: the torchvision transforms in the workers; gpu: nvJPEG decode on the CUDA device (same "
               "crops and flips each way: docs/benchmarks.md)")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_decode(decode: str) -> None:
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")


def decode_unavailable(decode: str, device: str) -> str | None:
    """Why ``decode`` cannot run with ``--device device``, as one line (the CLIs' flag check), else ``None``."""
    if decode == "gpu" and (device == "cpu" or not torch.cuda.is_available()):
        return "--decode gpu decodes JPEGs on a CUDA device and this run has none: use --decode fast (the default)"
    return None


def crop_decoder(decode: str, size: int | tuple[int, int], scale: tuple[float, float]) -> FastRandomResizedCrop | None:
    """The workers' half of ``decode`` for RandomResizedCrop(``scale``, bicubic) + flip: the dataset's ``decoder``
    (:class:`FastRandomResizedCrop`, :class:`GpuJpegCrop`), or ``None`` for ``official``, which is the task's own
    torchvision transform with the same ``scale``."""
    check_decode(decode)
    if decode == "official":
        return None
    return (GpuJpegCrop if decode == "gpu" else FastRandomResizedCrop)(size, scale=scale)


def collate_pixels(batch: list[tuple[Any, ...]]) -> Any:
    """DataLoader ``collate_fn`` for the fast decoder's samples ``(uint8 CHW image, target, skipped)``: what
    ``default_collate`` makes, except that the images are stacked pixel-interleaved, as the decoders leave them
    (a channels-last uint8 batch: one plain copy per image where a channels-first stack transposes each one, ~40 us
    a 224-px image); :func:`normalize_uint8` makes it channels-first while it converts to float, a pass it makes
    anyway.  Any other batch: ``default_collate``."""
    from torch.utils.data import default_collate

    imgs = [b[0] for b in batch]
    if not all(isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 3 for x in imgs):
        return default_collate(batch)
    images = default_collate([x.permute(1, 2, 0) for x in imgs]).permute(0, 3, 1, 2)  # shared memory in a worker, as default
    return [images, *default_collate([b[1:] for b in batch])]


def decode_collate(decode: str) -> Callable | None:
    """The DataLoader ``collate_fn`` a ``decode`` needs (``None``: the default)."""
    check_decode(decode)
    return {"gpu": collate_encoded, "fast": collate_pixels}.get(decode)


def decode_device_batch(decode: str, size: int | tuple[int, int], device: torch.device, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> Callable[[Any], Any] | None:
    """What finishes a batch on the device (the trainer's ``device_batch``): normalising the fast path's uint8
    images, decoding the GPU path's JPEGs; ``None`` for ``official`` (its batches arrive normalised)."""
    check_decode(decode)
    if decode == "official":
        return None
    if decode == "gpu":
        return GpuDecode(size, mean, std, device)
    return UInt8Normalize(mean, std)


class SeededDataset(Dataset):
    """Wraps a dataset to take ``(index, seed)`` keys: python, numpy and torch (CPU) RNGs are seeded per
    sample before the transforms run (and restored afterwards in the main process).  A dataset that declares
    which of them its samples draw from (``rngs``, e.g. :attr:`ImageFiles.rngs`: the fast decoders draw from torch's
    only) gets just those seeded and restored: saving and restoring numpy's state alone costs ~0.1 ms a sample."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        if not isinstance(key, tuple):
            return self.base[key]
        index, seed = key
        rngs = getattr(self.base, "rngs", ALL_RNGS)  # asked each time: a transform set later changes the answer
        py, npy = "random" in rngs, "numpy" in rngs
        in_main = get_worker_info() is None
        if in_main:
            saved = (random.getstate() if py else None, np.random.get_state() if npy else None, torch.get_rng_state())
        if py:
            random.seed(seed)
        if npy:
            np.random.seed(seed % 2**32)
        # the CPU generator only (what transforms draw from): torch.manual_seed would also reseed the CUDA
        # generators, which costs ~80 us a sample where CUDA is not initialised (a stack trace is recorded each call)
        # and, in the main process, would reseed the device RNG that draws the masks
        torch.default_generator.manual_seed(seed)
        try:
            return self.base[index]
        finally:
            if in_main:
                if saved[0] is not None:
                    random.setstate(saved[0])
                if saved[1] is not None:
                    np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class ResumableSampler(Sampler):
    """Shuffled (or ordered) indices sharded over ranks, each paired with a per-sample seed.

    Like ``DistributedSampler`` (pads to a multiple of the world size; rank r takes r, r+W, …) but
    can start part-way through an epoch, which mid-epoch resumption needs.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.num_samples = math.ceil(n / world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch for the shuffle; ``start`` = samples of this rank's shard already consumed."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.world_size
        order += order[: total - len(order)]
        shard = order[self.rank : total : self.world_size]
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for i in shard[self.start :]:
            yield i, (base + i) % (2**63 - 1)
