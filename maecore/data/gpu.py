"""``--decode gpu``: JPEG bytes from the workers (:class:`GpuJpegCrop`), decoded on the CUDA device
(:class:`GpuDecode`, nvJPEG) with the fast decoder's boxes and flips.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from maecore.data.crop import DRAFTABLE, CropPlan, FastRandomResizedCrop
from maecore.data.images import ImageSource, UnusableImage
from maecore.data.pixels import UInt8Normalize
from maecore.errors import UserError

log = logging.getLogger(__name__)


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
