"""Image classification transfer, training and ``--eval``: ``python -m classification [flags]`` (the flags and the
protocols: :mod:`classification.config`).

The task interface, as in every task package: :func:`parse_config` (in :mod:`classification.config`),
:func:`build_model`, :func:`build_optimizer`, :func:`build_data`, :func:`train`, :func:`evaluate` (``--eval
--resume CKPT``) and :func:`main` / :func:`cli`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from classification import evaluate as metrics
from classification.config import (
    CLS_SCHEDULE_KEYS,
    MODEL_KEYS,
    PROTOCOLS,
    ClassificationConfig,
    ClassifierData,
    check_config,
    checkpoint_config,
    get_parser,
    parse_config,
)
from classification.data import (
    FeatureDataset,
    build_datasets,
    eval_loader,
    eval_transform,
    finetune_transform,
    has_split,
    linprobe_train,
)
from classification.evaluate import confusion_figure, extract_features, knn_accuracy, sync_buffers
from classification.lars import LARS
from classification.model import (
    VisionTransformerClassifier,
    build_classifier,
    load_pretrained,
    setup_linear_probe,
    setup_partial_finetune,
)
from maecore import distributed as du
from maecore.checkpoint import checkpoint_args, checkpoint_step, load_file, unwrap_state_dict, write_eval
from maecore.cli import run_cli
from maecore.convert import load_weights
from maecore.data.decode import decode_collate, decode_device_batch
from maecore.data.images import ImageFiles
from maecore.data.packed.remote import RemoteOptions
from maecore.engine import Trainer, resolve_amp, use_attention
from maecore.errors import UserError
from maecore.optim import WarmupCosine, adamw, param_groups

__all__ = ["MODEL_KEYS", "PROTOCOLS", "build_criterion", "build_data", "build_model", "build_optimizer", "cli", "eval_data",
           "evaluate", "get_parser", "main", "parse_config", "train", "trained_view", "tuned_params"]


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    return du.launch(evaluate if cfg.eval else train, cfg)


def build_model(cfg: ClassificationConfig, num_classes: int | None = None) -> VisionTransformerClassifier:
    """The classifier for ``cfg.protocol`` with ``num_classes`` outputs (``None``: ``--num_classes``), with pretrained
    weights if ``--finetune``; :func:`tuned_params` counts what the optimiser will tune."""
    num_classes = cfg.num_classes if num_classes is None else num_classes
    if num_classes is None:
        raise ValueError("build_model needs num_classes (no --num_classes given)")
    linprobe = cfg.protocol == "linprobe"
    model = build_classifier(
        cfg.model, num_classes, img_size=cfg.input_size, patch_size=cfg.patch_size, depth=cfg.depth,
        embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, global_pool=cfg.global_pool, fc_norm=False if linprobe else None,
        drop_path_rate=cfg.drop_path,
        head_init_std=cfg.head_init_std if cfg.head_init_std is not None else (0.01 if linprobe else 2e-5),
    )
    if cfg.finetune:
        report = load_pretrained(model, cfg.finetune)
        if du.is_main():
            print(f"loaded {len(report.converted)} tensors from {cfg.finetune}"
                  + (f"; resampled {', '.join(f'{k} {a}->{b}' for k, (a, b) in report.resampled.items())}" if report.resampled else "")
                  + f"; new: {', '.join(sorted(report.added)) or 'none'}")
    elif du.is_main() and not cfg.eval:
        print("warning: no --finetune checkpoint: the encoder starts from random weights")
    if linprobe:
        setup_linear_probe(model, model.head_init_std)
    elif cfg.protocol == "partial":
        setup_partial_finetune(model, cfg.tune_blocks)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def tuned_params(model: nn.Module) -> int:
    """The parameters the optimiser tunes (the protocol froze the others)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_optimizer(cfg: ClassificationConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if cfg.protocol == "linprobe":
        # LARS sorts out 1-D parameters itself; groups only carry lr_scale (1) for the engine
        groups = param_groups(model, cfg.weight_decay, no_weight_decay=model.no_weight_decay())
        return LARS([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, model.layer_id, num_layers=model.depth + 1,
                          no_weight_decay=model.no_weight_decay())
    return adamw(groups, cfg.lr, (0.9, 0.999), device)


def build_data(cfg: ClassificationConfig) -> tuple[ImageFiles | None, ImageFiles]:
    """(train, val) image folders in one class index space (``val.classes``: train/'s folders).  Training: train/ seen
    through the protocol's augmentation (the probe's ``--decode``, the centre crop for ``--cache_features``, else
    timm's RandAugment pipeline).  ``--eval``: no train set (:func:`eval_data`)."""
    if cfg.eval:
        return None, eval_data(cfg)
    val_tf = eval_transform(cfg.input_size, cfg.crop_pct)
    train_decoder = None
    if cfg.decode is not None:  # the probe's augmented training images (config.resolve_decode)
        train_tf, train_decoder = linprobe_train(cfg.input_size, cfg.decode)
    elif cfg.protocol == "linprobe":  # --cache_features: these images only count; the features come from feat_loader
        train_tf = val_tf
    else:
        train_tf = finetune_transform(cfg.input_size, cfg.aa, cfg.reprob, cfg.remode, cfg.recount, cfg.color_jitter)
    train_ds, val_ds, _ = build_datasets(cfg.data_path, train_tf, val_tf, train_decoder=train_decoder, remote=RemoteOptions.from_flags(cfg))
    return train_ds, val_ds


def eval_data(cfg: ClassificationConfig, classes: Sequence[str] | None = None) -> ImageFiles:
    """val/ seen through the evaluation transform, in the class index space ``classes`` (a checkpoint's), else
    train/'s class folders (val/'s own when there is no train/)."""
    has_train = not classes and has_split(cfg.data_path, "train", RemoteOptions.from_flags(cfg))
    _, val_ds, _ = build_datasets(cfg.data_path, None, eval_transform(cfg.input_size, cfg.crop_pct),
                                  need_train=has_train, classes=classes, remote=RemoteOptions.from_flags(cfg))
    return val_ds


def build_criterion(cfg: ClassificationConfig, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """SoftTargetCrossEntropy behind Mixup/CutMix (which applies the smoothing), else smoothed or
    plain cross-entropy — the official choice."""
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
        if cfg.batch_size % 2:
            raise UserError(f"Mixup/CutMix pair images within a batch: --batch_size must be even, got {cfg.batch_size}")
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.smoothing), None
    return nn.CrossEntropyLoss(), None


def resolve_classes(cfg: ClassificationConfig, found: list[str]) -> int:
    n = cfg.num_classes or len(found)
    if n < len(found):
        raise UserError(f"--num_classes {n} is smaller than the {len(found)} class folders found")
    if n > len(found) and du.is_main():
        print(f"warning: --num_classes {n} > {len(found)} classes found; {n - len(found)} outputs are never trained")
    return n


def train(cfg: ClassificationConfig, device: torch.device) -> dict:
    """Train (``cfg.eval``: :func:`evaluate`)."""
    du.seed_everything(cfg.seed + du.rank())
    out = Path(cfg.output_dir)
    amp = resolve_amp(cfg.amp, device)
    train_ds, val_ds = build_data(cfg)
    classes = list(val_ds.classes)
    data = ClassifierData(classes, resolve_classes(cfg, classes))  # stored in checkpoints: --eval maps val folders by name
    learned: list = [data]
    num_classes = data.num_classes
    model = build_model(cfg, num_classes)
    n_tuned = tuned_params(model)
    model.to(device)
    sync_buffers(model, params=True)  # one model on all ranks before anything uses it (random parts are per-rank seeded)

    eff_batch = cfg.batch_size * cfg.accum_iter * du.world_size()
    if du.is_main():
        n_all = sum(p.numel() for p in model.parameters())
        print(f"{cfg.protocol} {cfg.model}: {n_tuned / 1e6:.3f}M of {n_all / 1e6:.2f}M parameters tuned; "
              f"{len(train_ds)} train / {len(val_ds)} val images, {num_classes} classes; "
              f"eff. batch {eff_batch} = {cfg.batch_size} x {cfg.accum_iter} x {du.world_size()}; lr {cfg.lr:.3g}"
              + (f"; training images: --decode {cfg.decode}" if cfg.decode else ""))

    pin = cfg.pin_mem and device.type == "cuda"
    val_loader = eval_loader(val_ds, cfg.batch_size, cfg.num_workers, pin)
    knn = {}
    if cfg.cache_features or cfg.knn:
        val_tf = eval_transform(cfg.input_size, cfg.crop_pct)
        feat_ds = build_datasets(cfg.data_path, val_tf, val_tf, classes=classes, remote=RemoteOptions.from_flags(cfg))[0]
        feat_loader = eval_loader(feat_ds, cfg.batch_size, cfg.num_workers, pin)
        tr_f, tr_t = extract_features(model, feat_loader, device, amp)
        va_f, va_t = extract_features(model, val_loader, device, amp)
        if cfg.knn:
            knn = knn_accuracy(tr_f, tr_t, va_f, va_t, num_classes, cfg.knn_k, cfg.knn_t)
            if du.is_main():
                print(f"kNN (k={cfg.knn_k}, T={cfg.knn_t}) on the initial features: " + json.dumps(knn))
        if cfg.cache_features:
            train_ds = FeatureDataset(tr_f.cpu(), tr_t.cpu())
            val_loader = eval_loader(FeatureDataset(va_f.cpu(), va_t.cpu()), cfg.batch_size, 0, pin)
            learned.append({"num_workers": 0})  # features are already in memory

    optimizer = build_optimizer(cfg, model, device)
    schedule = WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    criterion, mixup_fn = build_criterion(cfg, num_classes)

    def step_fn(m, batch):
        x, target, skipped = batch
        if mixup_fn is not None:
            x, target = mixup_fn(x, target)
        loss = criterion(m(x).float(), target)
        return loss, {"n_skipped": torch.as_tensor(skipped).sum()}

    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)

    last: dict = {}

    def evaluate_hook(m, epoch):
        res = metrics.evaluate(m, val_loader, device, num_classes, amp)
        last["confusion"] = res.pop("confusion")
        if ema is not None:
            r = metrics.evaluate(ema.module, val_loader, device, num_classes, amp)
            res.update({f"{k}_ema": v for k, v in r.items() if k in ("acc1", "acc5", "loss")})
        if du.is_main():
            print(f"epoch {epoch}: acc1 {res['acc1']:.2f} acc5 {res['acc5']:.2f} loss {res['loss']:.4f} on {res['n_images']} images")
        return res

    after_step = (lambda m, step: ema.update(m, step)) if ema is not None else None
    decode = {} if cfg.decode is None else dict(  # uint8 / JPEG batches finished on the device, as pretraining's
        collate_fn=decode_collate(cfg.decode),
        device_batch=decode_device_batch(cfg.decode, cfg.input_size, device, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    trainer = Trainer(cfg.engine(*learned, best_key="acc1"), model, optimizer, train_ds, step_fn, schedule, device,
                      args=cfg.saved_args(*learned), evaluate=evaluate_hook, after_step=after_step,
                      extra_state={"model_ema": ema} if ema else None, model_keys=MODEL_KEYS, schedule_keys=CLS_SCHEDULE_KEYS,
                      **decode)
    summary = trainer.fit()
    summary.update(best_acc1=trainer.best, tuned_params=n_tuned, **knn)
    if du.is_main():
        if "confusion" in last:
            write_confusion(last["confusion"], classes, out, f"{cfg.protocol} {cfg.model}")
        print(json.dumps({k: v for k, v in summary.items() if k != "confusion"}, default=str))
    return summary


def write_confusion(confusion: torch.Tensor, classes: list[str], out: Path, title: str) -> None:
    confusion_figure(confusion, classes, out / "confusion_matrix.png", title=title)
    (out / "confusion_matrix.json").write_text(json.dumps({"classes": classes, "counts": confusion.tolist()}))


def trained_view(cfg: ClassificationConfig, state: dict[str, torch.Tensor]) -> ClassificationConfig:
    """The config that builds the network of trained weights ``state`` (an evaluation, a prediction): a BatchNorm +
    linear head is the probe's, ``fc_norm`` means global pooling, and nothing is loaded from ``--finetune``."""
    protocol = "linprobe" if "head.1.weight" in state else cfg.protocol
    return replace(cfg, protocol=protocol, finetune="", eval=True,
                   global_pool="fc_norm.weight" in state or (protocol == "linprobe" and bool(cfg.global_pool)))


def evaluate(cfg: ClassificationConfig, device: torch.device) -> dict:
    """``--eval --resume CKPT``: top-1/top-5 of a fine-tuned checkpoint (ours or official) on val/; the model
    flags saved in a checkpoint of ours are used unless written on the command line (``cfg.given``)."""
    du.seed_everything(cfg.seed + du.rank())
    amp = resolve_amp(cfg.amp, device)
    if not cfg.resume or cfg.resume == "auto":
        raise UserError("--eval needs --resume PATH (the checkpoint to evaluate)")
    ckpt = load_file(cfg.resume)
    cfg = checkpoint_config(cfg, checkpoint_args(ckpt), str(cfg.resume), log=print if du.is_main() else None)
    if msg := check_config(cfg):
        raise UserError(msg)
    state = unwrap_state_dict(ckpt)
    saved_classes = (checkpoint_args(ckpt) or {}).get("classes")
    step = checkpoint_step(ckpt)
    del ckpt
    val_ds = eval_data(cfg, saved_classes)
    classes = list(val_ds.classes)
    head_w = state.get("head.weight", state.get("head.1.weight"))
    if head_w is None:
        raise UserError(f"{cfg.resume}: no classification head (head.weight) — is this a pretraining checkpoint? use --finetune to train")
    num_classes = cfg.num_classes or head_w.shape[0]
    if len(classes) > num_classes:
        raise UserError(f"the checkpoint's head has {head_w.shape[0]} outputs, fewer than the {len(classes)} classes in val/")
    cfg = trained_view(cfg, state)
    model = build_model(cfg, num_classes)
    try:
        load_weights(model, state, "exact")  # pos_embed from another input size is resampled
    except UserError as e:
        raise UserError(f"{cfg.resume}: does not fit {cfg.model} ({e}); "
                        "check --model/--patch_size/--embed_dim/--depth/--num_heads") from None
    model.to(device)
    use_attention(model, cfg.attn, device, amp)  # the kernel its training evaluated with
    res = metrics.evaluate(model, eval_loader(val_ds, cfg.batch_size, cfg.num_workers), device, num_classes, amp)
    confusion = res.pop("confusion")
    if du.is_main():
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_confusion(confusion, classes, out, f"eval {Path(cfg.resume).name}")
        write_eval(out, "classification", cfg.resume, step, res)
        print(json.dumps(res))
    return res


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
