"""Mask R-CNN on COCO with a ViT backbone, training and ``--eval`` (the flags: :mod:`detection.config`).

The task interface, as in every task package: :func:`parse_config` (in :mod:`detection.config`), :func:`build_model`,
:func:`build_optimizer`, :func:`build_data`, :func:`train`, :func:`evaluate` (``--eval``) and :func:`main` /
:func:`cli`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from maecore import distributed as du
from maecore.checkpoint import checkpoint_args, checkpoint_step, load_file, unwrap_state_dict, write_eval
from maecore.cli import run_cli
from maecore.convert import load_backbone
from maecore.engine import Trainer, resolve_amp, use_attention
from maecore.errors import UserError
from maecore.optim import WarmupStep, adamw, param_groups

from .config import MODEL_KEYS, DetectionConfig, DetectorData, check_config, checkpoint_config, get_parser, parse_config
from .data import CocoInstances, build_datasets, collate
from .evaluate import evaluate_coco
from .model import build_detector, layer_id_fn

__all__ = ["MODEL_KEYS", "build_data", "build_model", "build_optimizer", "cli", "evaluate", "get_parser", "main",
           "optimizer_groups", "parse_config", "schedule_length", "step_schedule", "train"]


def build_model(cfg: DetectionConfig, num_classes: int | None = None) -> nn.Module:
    """The detector of ``cfg`` for ``num_classes`` object classes (``None``: ``--num_classes``), its trunk from
    ``--finetune`` if given."""
    num_classes = cfg.num_classes if num_classes is None else num_classes
    if num_classes is None:
        raise ValueError("build_model needs num_classes (no --num_classes given)")
    try:
        model = build_detector(
            num_classes, backbone=cfg.backbone, arch=cfg.model, image_size=cfg.input_size,
            pretrain_img_size=cfg.pretrain_img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, window_size=cfg.window_size, global_blocks=cfg.global_blocks,
            drop_path_rate=cfg.drop_path, out_channels=cfg.out_channels, fc_dim=cfg.fc_dim, grad_checkpointing=cfg.grad_checkpointing,
            anchor_sizes=cfg.anchor_sizes, rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            box_batch_size_per_image=cfg.box_batch_size_per_image, detections_per_img=cfg.detections_per_img,
            box_score_thresh=cfg.score_thresh,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.finetune:
        report = load_backbone(model.backbone.net, cfg.finetune)
        if du.is_main():
            print(f"loaded {len(report.converted)} trunk tensors from {cfg.finetune} "
                  f"({len(report.dropped)} dropped, {len(report.added)} new)")
    return model


def optimizer_groups(model, cfg: DetectionConfig) -> list[dict]:
    """ViTDet's layer decay (``get_vit_lr_decay_rate``) with the weight-decay rule of ``--wd_rule``."""
    if cfg.wd_rule == "official":
        names, decay_1d = model.vitdet_no_weight_decay(), True
    elif cfg.wd_rule == "decay_all":
        names, decay_1d = set(), True
    else:
        names, decay_1d = model.no_weight_decay(), False
    return param_groups(model, cfg.weight_decay, layer_decay=cfg.layer_decay, layer_id=layer_id_fn(model),
                        num_layers=model.backbone.net.depth + 1, no_weight_decay=names, decay_1d=decay_1d)


def build_optimizer(cfg: DetectionConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) over :func:`optimizer_groups`."""
    return adamw(optimizer_groups(model, cfg), cfg.lr, (0.9, 0.999), device)


def schedule_length(cfg: DetectionConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, optimizer steps) of the run: ``--max_iters`` steps (ViTDet counts iterations, not epochs) over as
    many epochs as they need, or ``--epochs`` whole epochs."""
    if cfg.max_iters:
        return math.ceil(cfg.max_iters / steps_per_epoch), cfg.max_iters
    return cfg.epochs, cfg.epochs * steps_per_epoch


def step_schedule(cfg: DetectionConfig, total_steps: int) -> WarmupStep:
    """The ViTDet schedule in optimizer steps: ``--warmup_iters`` steps of linear warm-up from 0.001, x0.1 from each
    milestone on, the milestones being fractions of the run's ``total_steps`` rounded down to a step, as fvcore counts
    them (ViTDet-B/L: 163,889 and 177,546 of 184,375; H: 122,916 and 133,159 of 138,281)."""
    milestones = tuple(int(m * total_steps + 1e-6) for m in cfg.milestones)
    return WarmupStep(cfg.lr, warmup=cfg.warmup_iters, milestones=milestones, gamma=0.1, warmup_factor=0.001)


def resolve_classes(cfg: DetectionConfig, found: int, source: object) -> int:
    """The detector's class count: ``--num_classes`` (or a checkpoint's) must be the categories of the annotations,
    since predictions map back to their category ids."""
    if cfg.num_classes is not None and cfg.num_classes != found:
        raise UserError(f"--num_classes {cfg.num_classes} does not match the {found} categories of {source}")
    return found


def build_data(cfg: DetectionConfig) -> tuple[CocoInstances | None, CocoInstances]:
    """(train, val) COCO sets of ``--data_path`` or the explicit json/image paths (``--eval``: no train set)."""
    if not cfg.data_path:
        missing = [f"--{k}" for k in ("train_json", "train_images", "val_json", "val_images")
                   if not getattr(cfg, k) and not (cfg.eval and k.startswith("train"))]
        if missing:
            raise UserError(f"give --data_path (a COCO root) or {', '.join(missing)}")
    return build_datasets(cfg.data_path, cfg.input_size, cfg.train_json, cfg.train_images, cfg.val_json, cfg.val_images,
                          tuple(cfg.lsj_scale), need_train=not cfg.eval)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    return du.launch(evaluate if cfg.eval else train, cfg)


def prepare(cfg: DetectionConfig) -> tuple[CocoInstances | None, CocoInstances, DetectorData]:
    """The data sets and the categories they hold (what training and ``--eval`` both start with)."""
    train_set, val_set = build_data(cfg)
    if du.is_main():
        for ds in (train_set, val_set):
            if ds is not None:
                print(ds.summary())
    # saved with the checkpoint: predict writes the dataset's category ids and names without the annotations
    data = DetectorData(resolve_classes(cfg, len(val_set.cat_ids), val_set.ann_file), list(val_set.cat_ids),
                        list(val_set.class_names))
    return train_set, val_set, data


def evaluator(cfg: DetectionConfig, val_set: CocoInstances, device: torch.device, amp: str):
    """COCOeval of a model on ``val_set`` (boxes and masks), with its overlay figure in ``--output_dir``."""
    out = Path(cfg.output_dir)

    def evaluate_model(m, epoch: int) -> dict:
        use_attention(m, cfg.attn, device, amp)  # --eval: the kernel training evaluates with (in training: a no-op)
        return evaluate_coco(m, val_set, device, out, cfg.eval_batch_size, min(cfg.num_workers, 2), amp,
                             cfg.max_eval_images, cfg.vis_images, vis_name="predictions.png")

    return evaluate_model


def evaluate(cfg: DetectionConfig, device: torch.device) -> dict:
    """``--eval``: COCO metrics of the ``--resume`` checkpoint (the detector built from the model flags saved in it,
    except those written on the command line: ``cfg.given``), or of ``--finetune``'s trunk weights."""
    du.seed_everything(cfg.seed + du.rank())
    ckpt = None
    if cfg.resume:
        ckpt = load_file(cfg.resume)
        cfg = checkpoint_config(cfg, checkpoint_args(ckpt), str(cfg.resume), log=print if du.is_main() else None)
        if msg := check_config(cfg):
            raise UserError(msg)
    _, val_set, data = prepare(cfg)
    model = build_model(cfg, data.num_classes)
    amp = resolve_amp(cfg.amp, device)
    step = checkpoint_step(ckpt)
    if ckpt is not None:
        state = unwrap_state_dict(ckpt)
        del ckpt
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{cfg.resume}: not a detector checkpoint for these flags "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device)
    metrics = evaluator(cfg, val_set, device, amp)(model, 0)
    if du.is_main():
        write_eval(Path(cfg.output_dir), "detection", cfg.resume or cfg.finetune, step, metrics)
        print(json.dumps(metrics))
    return metrics


def train(cfg: DetectionConfig, device: torch.device) -> dict:
    """Train (``cfg.eval``: :func:`evaluate`)."""
    du.seed_everything(cfg.seed + du.rank())
    train_set, val_set, data = prepare(cfg)
    assert train_set is not None
    model = build_model(cfg, data.num_classes)
    amp = resolve_amp(cfg.amp, device)
    optimizer = build_optimizer(cfg, model, device)
    ipe = -(-len(train_set) // du.world_size()) // cfg.batch_size
    steps_per_epoch = max(ipe // cfg.accum_iter, 1)
    epochs, total = schedule_length(cfg, steps_per_epoch)
    schedule = step_schedule(cfg, total)
    if du.is_main():
        n = sum(p.numel() for p in model.parameters())
        eff = cfg.batch_size * cfg.accum_iter * du.world_size()
        print(f"{cfg.backbone} {cfg.model}: {n / 1e6:.2f}M params; eff. batch {eff}; lr {cfg.lr:.3g}; "
              f"{steps_per_epoch} steps/epoch; {total} steps ({epochs} epochs); warm-up {schedule.warmup:g} steps; "
              f"x0.1 at steps {list(schedule.milestones)}; weight decay rule {cfg.wd_rule}")

    def step_fn(m, batch):
        images, targets = batch
        losses = m(images, targets)
        return sum(losses.values()), losses

    learned = (data, {"epochs": epochs})  # the epochs --max_iters takes at this dataset's size
    # --max_iters ends the run mid-epoch; --max_steps (smoke runs) may end it sooner
    engine = cfg.engine(*learned, max_steps=min(filter(None, (cfg.max_steps, cfg.max_iters)), default=0))
    trainer = Trainer(engine, model, optimizer, train_set, step_fn, schedule, device, args=cfg.saved_args(*learned),
                      collate_fn=collate, evaluate=evaluator(cfg, val_set, device, amp), model_keys=MODEL_KEYS)
    summary = trainer.fit()
    if du.is_main():
        print(json.dumps(summary, default=str))
    return summary


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
