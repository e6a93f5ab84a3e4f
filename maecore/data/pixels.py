"""The fast decoders' uint8 batches: collated pixel-interleaved in the workers, normalised where the batch lands
(the device) with the official pipeline's float operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
