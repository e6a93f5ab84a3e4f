"""MAE pretraining: ``python -m pretrain --data_path DIR --output_dir OUT [flags]`` (the flags:
:mod:`pretrain.config`).

The task interface, as in every task package: :func:`parse_config` (in :mod:`pretrain.config`), :func:`build_model`,
:func:`build_optimizer`, :func:`build_data`, :func:`train`, :func:`evaluate` (no ``--eval`` flag: called from Python)
and :func:`main` / :func:`cli`; ``predict``, ``export`` and ``benchmark_step`` in their modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from maecore import distributed as du
from maecore.checkpoint import checkpoint_args, checkpoint_step, load_file, unwrap_state_dict, write_eval
from maecore.cli import run_cli
from maecore.data.packed.remote import RemoteOptions
from maecore.engine import StepFn, Trainer, autocast, resolve_amp
from maecore.errors import UserError
from maecore.monitor import build_monitor
from maecore.optim import WarmupCosine, adamw, param_groups
from pretrain.config import (
    MODEL_KEYS,
    PRETRAIN_SCHEDULE_KEYS,
    PretrainConfig,
    check_config,
    checkpoint_config,
    get_parser,
    parse_config,
)
from pretrain.data import build_pretrain_dataset, fixed_images, pretrain_collate, pretrain_device_batch
from pretrain.evaluate import load_images, reconstruction_figure
from pretrain.model import MaskedAutoencoderViT, build_mae  # importing it registers the mae_vit_* builders --model resolves into

__all__ = ["MODEL_KEYS", "build_data", "build_model", "build_optimizer", "build_trainer", "cli", "evaluate", "get_parser", "main",
           "make_step_fn", "optimizer_groups", "parse_config", "train"]


def build_model(cfg: PretrainConfig, num_classes: None = None) -> MaskedAutoencoderViT:
    """The MAE of ``cfg`` (``num_classes``: the interface's; an MAE has no classifier)."""
    if num_classes is not None:
        raise ValueError("an MAE has no classifier: build_model takes no num_classes")
    return build_mae(
        cfg.model,
        img_size=cfg.input_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        norm_pix_loss=cfg.norm_pix_loss,
        mask_type=cfg.mask_type,
        encoder_mask_tokens=cfg.encoder_mask_tokens,
        decoder_embed_dim=cfg.decoder_embed_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads,
    )


def build_data(cfg: PretrainConfig) -> tuple[Dataset, None]:
    """(the training images, no validation set): a folder or a packed dataset, decoded as ``--decode`` says."""
    return build_pretrain_dataset(cfg.data_path, cfg.input_size, cfg.jpeg_draft, cfg.decode, RemoteOptions.from_flags(cfg)), None


def main(argv: list[str] | None = None) -> dict:
    return du.launch(train, parse_config(argv))


def train(cfg: PretrainConfig, device: torch.device) -> dict:
    trainer = build_trainer(cfg, device)
    summary = trainer.fit()
    if du.is_main():
        print(json.dumps(summary, default=str))
    return summary


def make_step_fn(mask_ratio: float) -> StepFn:
    """The pretraining step function (``maecore.engine.TrainStep`` runs it; ``pretrain.benchmark`` times it):
    the MAE loss on an ``(images, labels, skipped)`` batch; counts the unreadable files the loader skipped."""

    def step_fn(m, batch):
        imgs, _, skipped = batch
        loss, _, _ = m(imgs, mask_ratio=mask_ratio)
        return loss, {"n_skipped": skipped.sum()}

    return step_fn


def optimizer_groups(model: torch.nn.Module, weight_decay: float, wd_rule: str = "official") -> list[dict]:
    """AdamW groups.  ``official``: ``main_pretrain.py`` calls timm 0.3.2's ``add_weight_decay(model, wd)`` with no
    skip list, which exempts 1-D parameters and ``.bias`` only, so ``cls_token`` and ``mask_token`` decay (the
    frozen sin-cos tables are in no group).  ``uniform``: also the tokens (``model.no_weight_decay()``)."""
    return param_groups(model, weight_decay, no_weight_decay=model.no_weight_decay() if wd_rule == "uniform" else ())


def build_optimizer(cfg: PretrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95) over :func:`optimizer_groups`, as ``main_pretrain.py``."""
    return adamw(optimizer_groups(model, cfg.weight_decay, cfg.wd_rule), cfg.lr, (0.9, 0.95), device)


def build_trainer(cfg: PretrainConfig, device: torch.device) -> Trainer:
    du.seed_everything(cfg.seed + du.rank())
    out = Path(cfg.output_dir)
    dataset, _ = build_data(cfg)
    if cfg.jpeg_draft and cfg.decode != "official" and du.is_main():
        print(f"note: --jpeg_draft is deprecated and has no effect with --decode {cfg.decode}, which picks the JPEG "
              "DCT scale per crop; with --decode official it keeps its old meaning")
    model = build_model(cfg)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)

    eff_batch = cfg.batch_size * cfg.accum_iter * du.world_size()
    optimizer = build_optimizer(cfg, model, device)
    schedule = WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)

    if du.is_main():
        n_enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
        print(f"{cfg.model}: {n_enc / 1e6:.2f}M encoder params; {len(dataset)} images; "
              f"eff. batch {eff_batch} = {cfg.batch_size} x {cfg.accum_iter} x {du.world_size()}; lr {cfg.lr:.3g}")

    vis_paths = fixed_images(cfg.data_path, cfg.vis_images) if cfg.vis_every else []

    def on_epoch_end(m, epoch):
        if vis_paths and ((epoch + 1) % cfg.vis_every == 0 or epoch + 1 >= cfg.epochs):
            for name in (f"recon/epoch_{epoch:04d}.png", "recon-last.png"):
                reconstruction_figure(m, vis_paths, out / name, cfg.input_size, cfg.mask_ratio,
                                      patch_stats=True, title=f"{cfg.model} epoch {epoch}")

    return Trainer(cfg.engine(), model, optimizer, dataset, make_step_fn(cfg.mask_ratio), schedule, device,
                   args=cfg.saved_args(), on_epoch_end=on_epoch_end, model_keys=MODEL_KEYS,
                   schedule_keys=PRETRAIN_SCHEDULE_KEYS, collate_fn=pretrain_collate(cfg.decode),
                   device_batch=pretrain_device_batch(cfg.decode, cfg.input_size, device),
                   hooks=[build_monitor(cfg, model, dataset.classes, device)])


@torch.no_grad()
def evaluate(cfg: PretrainConfig, device: torch.device) -> dict:
    """The ``--resume`` MAE (built from the model flags it saved, except those written on the command line) on the
    fixed images of ``--data_path`` the figures take (``--vis_images`` of them, centre-cropped: from ``val/`` when it
    exists), each masked by the ``--seed`` noise: the masked-patch loss and the reconstruction figure
    (``OUT/recon-eval.png``), written to ``OUT/eval.json`` as every task's evaluation.  Pretraining has no ``--eval``
    flag (a new flag would change the args every checkpoint saves): this is the task interface's ``evaluate``."""
    du.seed_everything(cfg.seed + du.rank())
    if not cfg.resume or cfg.resume == "auto":
        raise UserError("evaluate needs --resume CHECKPOINT (an MAE of this toolkit)")
    ckpt = load_file(cfg.resume)
    cfg = checkpoint_config(cfg, checkpoint_args(ckpt), str(cfg.resume), log=print if du.is_main() else None)
    if msg := check_config(cfg):
        raise UserError(msg)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(unwrap_state_dict(ckpt), strict=False)
    step = checkpoint_step(ckpt)
    del ckpt
    if missing or unexpected:
        raise UserError(f"{cfg.resume}: not an MAE of these flags (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    paths = fixed_images(cfg.data_path, cfg.vis_images)
    imgs = load_images(paths, cfg.input_size)
    if imgs is None:
        raise UserError(f"{cfg.data_path}: no readable image to evaluate on (--vis_images {cfg.vis_images})")
    grid = (imgs.shape[-2] // model.patch_size, imgs.shape[-1] // model.patch_size)
    noise = torch.rand(imgs.shape[0], grid[0] * grid[1], generator=torch.Generator().manual_seed(cfg.seed))
    with autocast(device, resolve_amp(cfg.amp, device)):
        loss, _, _ = model(imgs.to(device), mask_ratio=cfg.mask_ratio, noise=noise.to(device))
    res = {"loss": float(loss), "n_images": int(imgs.shape[0]), "mask_ratio": cfg.mask_ratio}
    if du.is_main():
        out = Path(cfg.output_dir)
        reconstruction_figure(model, paths, out / "recon-eval.png", cfg.input_size, cfg.mask_ratio, patch_stats=True,
                              title=f"{cfg.model} {Path(cfg.resume).name}", seed=cfg.seed)
        write_eval(out, "pretrain", cfg.resume, step, res)
        print(json.dumps(res))
    return res


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
