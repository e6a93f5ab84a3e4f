"""Reconstruction figures: original / masked / reconstruction / reconstruction + visible patches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from maecore.data.images import try_load_rgb
from pretrain.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from pretrain.model import MaskedAutoencoderViT

log = logging.getLogger(__name__)

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoderViT,
    imgs: torch.Tensor,
    mask_ratio: float = 0.75,
    seed: int = 0,
    patch_stats: bool = False,
) -> dict[str, torch.Tensor]:
    """Run the MAE on normalised images with a fixed-seed mask; return the four panels (N, C, H, W),
    normalised like the input.

    A ``norm_pix_loss`` model predicts per-patch-normalised pixels; with ``patch_stats`` each
    predicted patch is mapped back with the *target* patch's mean and std (a peek at the truth the
    figure must admit to), else with no de-normalisation at all.
    """
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    grid = (imgs.shape[-2] // model.patch_size, imgs.shape[-1] // model.patch_size)
    noise = torch.rand(imgs.shape[0], grid[0] * grid[1], generator=g).to(imgs.device)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if model.norm_pix_loss and patch_stats:
        target = model.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    rec = model.unpatchify(pred, grid)
    m = mask.unsqueeze(-1).expand(-1, -1, model.patch_size**2 * model.in_chans)
    m = model.unpatchify(m, grid)  # 1 = removed
    return {
        "original": imgs,
        "masked": imgs * (1 - m),
        "reconstruction": rec,
        "reconstruction + visible": imgs * (1 - m) + rec * m,
        "mask": m,
    }


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) ImageNet-normalised -> (H, W, C) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = x.detach().float().cpu() * std + mean
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def save_grid(panels: dict[str, torch.Tensor], path: str | Path, title: str = "", scale: int = 0) -> Path:
    """One row per image, one column per panel, a header with column names and the title."""
    n, _, h, w = panels["original"].shape
    scale = scale or max(1, 128 // max(h, w))
    cw, ch, pad, head = w * scale, h * scale, 4, 34
    canvas = Image.new("RGB", (len(COLUMNS) * (cw + pad) + pad, head + n * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title, fill="black")
    for j, name in enumerate(COLUMNS):
        draw.text((pad + j * (cw + pad), 18), name, fill="black")
        for i in range(n):
            tile = Image.fromarray(to_uint8(panels[name][i])).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cw + pad), head + i * (ch + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def load_images(paths: Sequence[str | Path], input_size: int | tuple[int, int]) -> torch.Tensor | None:
    """The readable ones of ``paths`` as a normalised batch (an unreadable file is skipped with one warning
    line, as in training); ``None`` when none is readable."""
    tf = eval_transform(input_size)
    imgs = [tf(im) for im in map(try_load_rgb, paths) if im is not None]
    return torch.stack(imgs) if imgs else None


def reconstruction_figure(
    model: MaskedAutoencoderViT,
    paths: Sequence[str | Path | bytes],  # files, or encoded images (a packed dataset's records)
    out: str | Path,
    input_size: int | tuple[int, int],
    mask_ratio: float = 0.75,
    patch_stats: bool = False,
    title: str = "",
    seed: int = 0,
) -> Path | None:
    """Draw the figure for the readable images among ``paths``; with none readable, no figure: one warning
    line and ``None`` (a figure never stops a training run)."""
    device = next(model.parameters()).device
    imgs = load_images(paths, input_size)
    if imgs is None:
        log.warning("no readable image among the %d for %s: figure not drawn", len(paths), out)
        return None
    panels = reconstruct(model, imgs.to(device), mask_ratio, seed=seed, patch_stats=patch_stats)
    panels = {k: v.cpu() for k, v in panels.items()}
    if model.norm_pix_loss:
        title += "  [de-normalised with each target patch's mean/std]" if patch_stats else "  [normalised-pixel output, not de-normalised]"
    return save_grid(panels, out, title=title.strip())
