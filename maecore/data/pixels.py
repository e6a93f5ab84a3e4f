"""The fast decoders' uint8 batches: collated pixel-interleaved in the workers, normalised where the batch lands
(the device) with the official pipeline's float operations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


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


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``ToTensor`` + ``Normalize`` of uint8 images (``(..., C, H, W)``, on any device, any memory layout): the same
    float32 operations in the same order (/ 255, - mean, / std), so equal pixels give bitwise the official floats;
    a batch comes out channels-first contiguous, as the official pipeline's.

    On the CPU a batch (4-D) is normalised by table: each channel's 256 possible values are normalised once by those
    float32 operations (:func:`normalize_table`) and every pixel is looked up (``numpy.take``, image by image and
    channel by channel, so it runs in cache).  Two passes over the pixels (widening the indices, the look-up) where
    the operations take four, one of them a transposing uint8-to-float copy; the same floats, bit for bit."""
    channels = max(len(mean), len(std))
    if images.device.type == "cpu" and images.dim() == 4 and images.dtype == torch.uint8 and channels in (1, images.shape[1]):
        table = normalize_table(mean, std)
        x = images.numpy()
        out = np.empty(images.shape, dtype=np.float32)
        for k in range(x.shape[0]):
            for c in range(x.shape[1]):
                np.take(table[c % len(table)], x[k, c], out=out[k, c], mode="wrap")  # indices are 0-255: nothing wraps
        return torch.from_numpy(out)
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.to(torch.float32, memory_format=torch.contiguous_format).div_(255).sub_(m).div_(s)


@functools.lru_cache(maxsize=8)
def _table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    channels = max(len(mean), len(std))
    values = torch.arange(256, dtype=torch.uint8).expand(channels, 1, 256)  # every value, once per channel
    table = normalize_uint8(values, mean, std).view(channels, 256).numpy()  # 3-D: by the float32 operations
    table.flags.writeable = False
    return table


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(channels, 256)`` float32 (channels: the longer of ``mean`` and ``std``): what :func:`normalize_uint8`'s
    float32 operations make of each uint8 value in each channel, so a look-up gives the same bits; cached, read-only."""
    return _table(tuple(float(v) for v in mean), tuple(float(v) for v in std))


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
