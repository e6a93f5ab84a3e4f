"""ADE20K UperNet training and ``--eval`` (the flags and recipes: :mod:`segmentation.config`).

The task interface, as in every task package: :func:`parse_config` (in :mod:`segmentation.config`),
:func:`build_model`, :func:`build_optimizer`, :func:`build_data`, :func:`train`, :func:`evaluate` (``--eval
--resume CKPT``) and :func:`main` / :func:`cli`.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from maecore import distributed as du
from maecore.checkpoint import checkpoint_args, checkpoint_step, load_file, unwrap_state_dict, write_eval
from maecore.cli import run_cli
from maecore.convert import load_backbone
from maecore.engine import Trainer, resolve_amp, use_attention
from maecore.errors import UserError
from maecore.optim import WarmupPoly, adamw, param_groups
from segmentation.config import (
    ARCH_KEYS,
    MODEL_KEYS,
    SegmentationConfig,
    SegmentationSchedule,
    check_config,
    checkpoint_config,
    get_parser,
    parse_config,
)
from segmentation.data import ADE20K, build_train_dataset, build_val_dataset
from segmentation.evaluate import MS_SCALES, evaluate_segmentation, format_results
from segmentation.model import UperNetViT, build_segmentor, maybe_sync_batchnorm

__all__ = ["ARCH_KEYS", "MODEL_KEYS", "build_data", "build_model", "build_optimizer", "build_trainer", "cli", "evaluate",
           "get_parser", "main", "optimizer_groups", "parse_config", "poly_schedule", "schedule_in_epochs", "train"]


def build_model(cfg: SegmentationConfig, num_classes: int | None = None) -> UperNetViT:
    """The UperNet of ``cfg`` for ``num_classes`` classes (``None``: ``--num_classes``), its backbone from
    ``--finetune`` if given."""
    try:
        model = build_segmentor(
            cfg.model, cfg.num_classes if num_classes is None else num_classes, cfg.input_size, cfg.patch_size,
            cfg.drop_path, cfg.channels, cfg.aux_channels, cfg.aux_weight, cfg.out_indices, cfg.embed_dim, cfg.depth,
            cfg.num_heads, grad_checkpointing=cfg.grad_checkpointing,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.finetune:
        report = load_backbone(model.backbone, cfg.finetune)
        if du.is_main():
            print(f"loaded {len(report.converted)} backbone tensors from {cfg.finetune} "
                  f"({len(report.added)} new at their neutral init, {len(report.dropped)} dropped)")
    return model


def build_data(cfg: SegmentationConfig) -> tuple[ADE20K | None, ADE20K]:
    """(train, val) splits of the ADE20K layout under ``--data_path`` (``--eval``: no train set)."""
    return (None if cfg.eval else build_train_dataset(cfg)), build_val_dataset(cfg)


def window_of(cfg: SegmentationConfig) -> tuple[tuple[int, int], tuple[int, int] | None]:
    w = (cfg.input_size, cfg.input_size)
    return w, ((cfg.stride, cfg.stride) if cfg.stride else None)


def evaluate_model(cfg: SegmentationConfig, model: torch.nn.Module, dataset, device: torch.device,
                   vis_dir: Path | None) -> dict:
    """mIoU of ``model`` on ``dataset`` by sliding windows (``--aug_test``: multi-scale + flip)."""
    window, stride = window_of(cfg)
    amp = resolve_amp(cfg.amp, device)
    use_attention(model, cfg.attn, device, amp)  # --eval: the kernel training evaluates with (in training: a no-op)
    return evaluate_segmentation(
        model, dataset, window, stride,
        scales=MS_SCALES if cfg.aug_test else (1.0,), flip=cfg.aug_test,
        device=device, amp=amp, num_workers=min(cfg.num_workers, 4),
        vis_dir=vis_dir, num_vis=cfg.num_vis, max_images=cfg.eval_max_images,
    )


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    return du.launch(evaluate if cfg.eval else train, cfg)


def evaluate(cfg: SegmentationConfig, device: torch.device) -> dict:
    """``--eval --resume CKPT``: the network is the one the checkpoint was trained as (its saved ``MODEL_KEYS``),
    except for the flags written on the command line (``cfg.given``)."""
    if not cfg.resume or cfg.resume == "auto":
        raise UserError("--eval needs --resume CHECKPOINT (a trained segmentation checkpoint)")
    ckpt = load_file(cfg.resume)
    cfg = checkpoint_config(cfg, checkpoint_args(ckpt), str(cfg.resume), log=print if du.is_main() else None)
    if msg := check_config(cfg):
        raise UserError(msg)
    model = build_model(replace(cfg, finetune=""))  # the weights are the checkpoint's, whole
    missing, unexpected = model.load_state_dict(unwrap_state_dict(ckpt), strict=False)
    step = checkpoint_step(ckpt)
    del ckpt
    if missing or unexpected:
        raise UserError(f"{cfg.resume}: not a checkpoint of this segmentation model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device)
    _, val = build_data(cfg)
    out = Path(cfg.output_dir)
    res = evaluate_model(cfg, model, val, device, out / "vis" if du.is_main() else None)
    if du.is_main():
        print(format_results(res))
        write_eval(out, "segmentation", cfg.resume, step, res)
    return res


def schedule_in_epochs(cfg: SegmentationConfig, n_train: int) -> tuple[int, int, int]:
    """(epochs, optimizer steps per epoch, eval_every in epochs) from the iteration-based flags.  An epoch's
    batches left over after its last whole accumulation make no step, so the epochs hold all --max_iters steps."""
    per_rank = math.ceil(n_train / du.world_size())
    steps_per_epoch = (per_rank // cfg.batch_size) // cfg.accum_iter
    if steps_per_epoch < 1:
        raise UserError(f"{n_train} training images give no full optimizer step per epoch "
                        f"(batch {cfg.batch_size} x accum {cfg.accum_iter} x {du.world_size()} processes)")
    epochs = math.ceil(cfg.max_iters / steps_per_epoch)
    eval_every = max(1, round(cfg.eval_iters / steps_per_epoch)) if cfg.eval_iters else epochs
    return epochs, steps_per_epoch, eval_every


def optimizer_groups(model: UperNetViT, cfg: SegmentationConfig) -> list[dict]:
    """BEiT layer decay over the blocks (neck and heads at scale 1) and the weight-decay rule of ``--wd_rule``:
    ``official`` is mmseg's ``LayerDecayOptimizerConstructor``, which exempts 1-D parameters and ``.bias`` (its
    ``name in ('pos_embed', 'cls_token')`` sees ``backbone.pos_embed`` and never matches), so the position table,
    the cls token and the relative-position tables decay; ``uniform`` also exempts those."""
    names = model.no_weight_decay() if cfg.wd_rule == "uniform" else ()
    return param_groups(model, cfg.weight_decay, cfg.layer_decay, layer_id=model.layer_id,
                        num_layers=model.backbone.depth + 1, no_weight_decay=names)


def build_optimizer(cfg: SegmentationConfig, model: UperNetViT, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) over :func:`optimizer_groups`."""
    return adamw(optimizer_groups(model, cfg), cfg.lr, (0.9, 0.999), device)


def poly_schedule(cfg: SegmentationConfig) -> WarmupPoly:
    """mmseg's warm-up + poly (power 1) in optimizer steps: 0.x's by default, 1.x's with ``--poly_after_warmup``."""
    return WarmupPoly(cfg.lr, cfg.warmup_iters, cfg.max_iters, power=1.0, min_lr=cfg.min_lr,
                      restart=cfg.poly_after_warmup)


def build_trainer(cfg: SegmentationConfig, device: torch.device) -> Trainer:
    du.seed_everything(cfg.seed + du.rank())
    out = Path(cfg.output_dir)
    dataset, val = build_data(cfg)
    model = maybe_sync_batchnorm(build_model(cfg), device)

    optimizer = build_optimizer(cfg, model, device)
    epochs, spe, eval_every = schedule_in_epochs(cfg, len(dataset))
    learned = SegmentationSchedule(epochs, eval_every)
    schedule = poly_schedule(cfg)  # counted in optimizer steps, whatever the epoch length

    if du.is_main():
        n_bb = sum(p.numel() for p in model.backbone.parameters())
        n_all = sum(p.numel() for p in model.parameters())
        eff = cfg.batch_size * cfg.accum_iter * du.world_size()
        print(f"UperNet {cfg.model}: {n_bb / 1e6:.2f}M backbone / {n_all / 1e6:.2f}M total params; "
              f"{len(dataset)} train / {len(val)} val images; eff. batch {eff}; {cfg.max_iters} iterations "
              f"= {epochs} epochs of {spe:g} steps; lr {cfg.lr:g}, layer decay {cfg.layer_decay}")

    def step_fn(m, batch):
        img, label, skipped, n_oor = batch
        loss, logs = m(img, label)
        return loss, {**logs, "n_skipped": skipped.sum(), "n_label_oor": n_oor.sum()}

    def evaluate_hook(m, epoch):
        res = evaluate_model(cfg, m, val, device, out / "vis" if du.is_main() else None)
        if du.is_main():
            print(f"epoch {epoch}: " + format_results(res).splitlines()[0])
        return res

    return Trainer(cfg.engine(learned, max_steps=cfg.max_iters, best_key="mIoU"), model, optimizer, dataset, step_fn,
                   schedule, device, args=cfg.saved_args(learned), evaluate=evaluate_hook, model_keys=MODEL_KEYS)


def train(cfg: SegmentationConfig, device: torch.device) -> dict:
    """Train (``cfg.eval``: :func:`evaluate`)."""
    trainer = build_trainer(cfg, device)
    summary = trainer.fit()
    if du.is_main():
        print(json.dumps({k: v for k, v in summary.items() if k != "IoU_per_class"}, default=str))
    return summary


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
