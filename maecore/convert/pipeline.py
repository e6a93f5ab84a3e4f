"""Canonical source -> target format: one pipeline for every format, which asks the format's record
(:class:`maecore.convert.formats.Format`) wherever formats differ."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from maecore.convert import formats
from maecore.convert.formats import Job
from maecore.convert.keys import DROP_REASONS, check_shapes, hw, infer_arch, is_neutral, key_kind, neutral_why
from maecore.convert.records import Converted, Source
from maecore.convert.report import ConversionReport
from maecore.convert.writers import save_safetensors
from maecore.errors import UserError
from maecore.models.pos_embed import resample_pos_embed


def convert(
    source: Source,
    to: str,
    *,
    img_size: int | tuple[int, int] | None = None,
    pool: str | None = None,
    fc_norm: str = "reinit",
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    patch_size: int | None = None,
) -> Converted:
    """Map a canonical source onto a target format.  Raises :class:`UserError` on anything that
    would not load or would silently lose trained weights."""
    fmt = formats.target_format(to)
    hints = dict(source.hints)
    if num_heads:
        hints["num_heads"] = num_heads
    if decoder_num_heads:
        hints["decoder_num_heads"] = decoder_num_heads
    state = source.state
    arch = infer_arch(state, hints)
    check_shapes(state, arch)
    rep = ConversionReport(dropped=dict(source.dropped), notes=list(source.notes))
    job = Job(state, arch, rep, hints, pool=pool, fc_norm=fc_norm)
    if fmt.prepare:
        fmt.prepare(job)
    if fc_norm not in ("reinit", "copy"):
        raise UserError(f"--fc-norm must be reinit or copy, not {fc_norm!r}")

    # ---- what the target keeps, key by key (in the source's order) ----
    out = job.out
    refused = []
    for k, v in state.items():
        kind = key_kind(k)
        if kind in ("pos_embed", "stem", "block"):
            out[k] = v
            continue
        if kind == "extra":
            name = "gamma" if k.endswith("gamma") else k.rsplit(".", 1)[-1]
            if name in fmt.extras:
                out[k] = v
            elif is_neutral(k, v):
                rep.dropped[k] = neutral_why(k)
            else:
                refused.append(k)
            continue
        if fmt.place and fmt.place(job, k, kind, v):
            continue
        if kind in fmt.keep:
            out[k] = v
        else:
            rep.dropped[k] = fmt.why.get(kind) or DROP_REASONS.get(kind, "not used by this target")
    if refused:
        raise UserError(f"{to} has no place for trained relative-position / layer-scale weights: "
                        f"{', '.join(refused[:6])}{' …' if len(refused) > 6 else ''}")
    if fmt.complete:
        fmt.complete(job)

    # ---- geometry: patch size, position tables ----
    target_img = hw(img_size) if img_size is not None else arch.img_size
    if patch_size and patch_size != arch.patch_size:
        # e.g. ViTDet-H: MAE ViT-H/14 weights run with 16x16 patches.  timm's resampling keeps each
        # token's projection of a resized patch (FlexiViT's pseudo-inverse); the table below follows
        # the new grid of the same image size.
        from timm.layers import resample_patch_embed

        if any(key_kind(k) in ("decoder", "mask_token") for k in out):
            raise UserError("--patch-size changes what the MAE decoder predicts; use it for encoder-only targets")
        w = out["patch_embed.proj.weight"]
        out["patch_embed.proj.weight"] = resample_patch_embed(w, [patch_size, patch_size], verbose=False)
        rep.resampled["patch_embed.proj.weight"] = (tuple(w.shape), tuple(out["patch_embed.proj.weight"].shape))
        arch.patch_size = patch_size
    if "pos_embed" in out:
        pe = out["pos_embed"]
        if fmt.pos_cls_slot and arch.pos_prefix == 0:
            out["pos_embed"] = torch.cat([pe.new_zeros(1, 1, pe.shape[2]), pe], dim=1)
            rep.notes.append("pos_embed had no cls slot: a zero row was added (ViTDet expects one)")
            arch.pos_prefix = 1
        new_grid = (target_img[0] // arch.patch_size, target_img[1] // arch.patch_size)
        if new_grid != arch.grid:
            before = tuple(out["pos_embed"].shape)
            out["pos_embed"] = resample_pos_embed(out["pos_embed"], new_grid, arch.grid, arch.pos_prefix)
            rep.resampled["pos_embed"] = (before, tuple(out["pos_embed"].shape))
            if "decoder_pos_embed" in out:
                before = tuple(out["decoder_pos_embed"].shape)
                out["decoder_pos_embed"] = resample_pos_embed(out["decoder_pos_embed"], new_grid, arch.grid, 1)
                rep.resampled["decoder_pos_embed"] = (before, tuple(out["decoder_pos_embed"].shape))
            arch.grid = new_grid
    if fmt.annotate:
        fmt.annotate(job)
    if arch.heads_guessed and fmt.records_heads:
        rep.notes.append(f"num_heads={arch.num_heads} guessed from width {arch.embed_dim} (pass --num-heads if different)")

    # ---- the target's names ----
    written, renamed = fmt.from_canonical(out, arch) if fmt.from_canonical else (dict(out), {})
    conv = Converted(to, written, rep, arch)
    if fmt.config:
        conv.config = fmt.config(arch, out, hints)
    rep.renamed.update({a: b for a, b in renamed.items() if a != b})
    rep.converted = list(written)
    if fmt.new_keys:
        rep.added.update(fmt.new_keys(job, written))
    return conv


def write_converted(conv: Converted, source: Source, dst: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write a conversion to ``dst`` (a directory for ``hf``); never overwrites without ``force``."""
    dst = Path(dst)
    fmt = formats.target_format(conv.target)
    if not fmt.directory:
        if dst.is_dir():
            raise UserError(f"{dst} is a directory; give a file name")
        if dst.exists() and not force:
            raise UserError(f"{dst} exists (use --force to overwrite)")
        if dst.suffix == ".safetensors":
            if not fmt.flat:
                raise UserError(f"{conv.target} files are torch checkpoints; use a .pth name (safetensors holds flat tensors only)")
            save_safetensors(conv.state, dst, {"source": source.path, "source_format": source.fmt})
            return [dst]
    return fmt.write(conv, source, dst, force)
