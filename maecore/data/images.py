"""Image folders that survive bad files: one protected loader (:func:`load_rgb`, 8-bit RGB from any depth and
alpha, or one of :data:`UNREADABLE`) and :class:`ImageFiles`, which skips and counts an unreadable file.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from maecore.data.sampler import ALL_RNGS
from maecore.errors import UserError

log = logging.getLogger(__name__)

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
        (``maecore.data.packed.reader.PackedImages``) overrides this and keeps :meth:`load`."""
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
