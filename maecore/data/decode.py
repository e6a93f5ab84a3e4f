"""``--decode``: the choice of input pipeline the training CLIs share (pretrain, the classification probe), and
what each choice puts in the workers, the collate function and the trainer's ``device_batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from maecore.data.crop import FastRandomResizedCrop
from maecore.data.gpu import GpuDecode, GpuJpegCrop, collate_encoded
from maecore.data.pixels import UInt8Normalize, collate_pixels

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
