"""Image classification transfer: ``python -m classification --protocol {finetune,linprobe,partial}``.

* ``finetune``: end-to-end fine-tuning (official ``main_finetune.py``): AdamW, layer-wise lr decay,
  RandAugment, random erasing, Mixup/CutMix, label smoothing, drop path.
* ``linprobe``: frozen encoder + BatchNorm + linear head with LARS (official ``main_linprobe.py``);
  ``--decode fast|official|gpu`` picks how its training images are decoded (as ``python -m pretrain``'s);
  ``--cache_features`` trains on features extracted once (no augmentation).
* ``partial``: the fine-tuning recipe on the last ``--tune_blocks K`` blocks (paper §4.3).

Flags follow the official scripts (``--finetune``, ``--blr``, ``--layer_decay``, ``--drop_path``,
``--cls_token``, ``--mixup``, ``--cutmix``, ``--smoothing``, ``--reprob``, ``--aa``, ``--eval
--resume CKPT``…).  ``--data_path`` holds ``train/`` and ``val/`` class folders.  Run under
``torchrun`` for DDP; evaluation counts each image once.  ``--eval --resume CKPT`` on a checkpoint of
ours takes the model flags (``MODEL_KEYS``) from it unless given on the command line; a file without
saved args (an official release, a converted file) needs ``--model`` etc.; it writes ``OUT/eval.json``
(:func:`maecore.checkpoint.write_eval`: the log's ``eval`` record, as every task's ``--eval`` does).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from classification.data import (
    FeatureDataset,
    build_datasets,
    eval_loader,
    eval_transform,
    finetune_transform,
    linprobe_train,
)
from classification.evaluate import confusion_figure, evaluate, extract_features, knn_accuracy, sync_buffers
from classification.lars import LARS
from classification.model import (
    VisionTransformerClassifier,
    build_classifier,
    load_pretrained,
    setup_linear_probe,
    setup_partial_finetune,
)
from classification.recipes import PROTOCOL_DEFAULTS, RECIPES
from maecore import distributed as du
from maecore.checkpoint import checkpoint_args, checkpoint_step, load_for_eval, unwrap_state_dict, write_eval
from maecore.cli import (
    OneLineParser,
    add_engine_args,
    add_model_args,
    check_model_args,
    config_from_args,
    given_flags,
    non_negative_float,
    positive_float,
    positive_int,
    ratio,
    run_cli,
)
from maecore.convert import load_weights
from maecore.data.decode import DECODE_HELP, DECODES, decode_collate, decode_device_batch, decode_unavailable
from maecore.engine import SCHEDULE_KEYS, Trainer, dump_args, resolve_amp, use_attention
from maecore.errors import UserError
from maecore.models import resolve_model
from maecore.optim import WarmupCosine, adamw, param_groups

PROTOCOLS = ("finetune", "linprobe", "partial")
# what builds the network and its eval view: ``--eval --resume CKPT`` takes these from the checkpoint's saved
# args unless given on the command line (the protocol and the head follow from the weights themselves)
MODEL_KEYS = ("model", "patch_size", "embed_dim", "depth", "num_heads", "input_size", "global_pool", "num_classes", "crop_pct")
# --decode changes the pixels of the probe's training crops: a resume keeps it unless --resume_override decode
CLS_SCHEDULE_KEYS = (*SCHEDULE_KEYS, "decode")


def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m classification", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=PROTOCOLS, default=None, help="default: the recipe's, else finetune")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="preset defaults; flags given override")
    g = p.add_argument_group("model")
    add_model_args(g, "vit", model="vit_large_patch16", input_size=224, input_size_help="image side in pixels",
                   num_classes_help="default: number of class folders in train/")
    g.add_argument("--drop_path", type=ratio(0.0, 1.0, hi_open=True), default=None, help="stochastic depth rate")
    g.add_argument("--head_init_std", type=float, default=None,
                   help="trunc-normal std of the new head (official: 2e-5 fine-tuning, 0.01 linear probe)")
    g.add_argument("--global_pool", action="store_true", default=None, help="average patch tokens (+ fc_norm)")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify the cls token")
    g.add_argument("--finetune", default="", help="pretrained MAE checkpoint (ours or official)")
    g.add_argument("--tune_blocks", type=non_negative_float, default=None, help="partial: tune the last K blocks (0.5 = last MLP)")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute each block's activations in the backward pass")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer state per block (FSDP2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--weight_decay", type=non_negative_float, default=None)
    g.add_argument("--lr", type=non_negative_float, default=None, help="absolute lr (default: blr * eff_batch / 256)")
    g.add_argument("--blr", type=non_negative_float, default=None, help="base lr: lr = blr * eff_batch / 256")
    g.add_argument("--layer_decay", type=ratio(0.0, 1.0, lo_open=True), default=None, help="layer-wise lr decay (BEiT rule)")
    g.add_argument("--min_lr", type=non_negative_float, default=None)
    g.add_argument("--warmup_epochs", type=non_negative_float, default=None)
    g.add_argument("--model_ema", action="store_true", help="keep an EMA of the weights (evaluated too)")
    g.add_argument("--model_ema_decay", type=ratio(0.0, 1.0), default=0.9999)
    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 ('none': off)")
    g.add_argument("--color_jitter", type=non_negative_float, default=None)
    g.add_argument("--smoothing", type=ratio(0.0, 1.0, hi_open=True), default=None, help="label smoothing")
    g.add_argument("--reprob", type=ratio(0.0, 1.0), default=None, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=positive_int, default=1)
    g.add_argument("--mixup", type=non_negative_float, default=None, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=non_negative_float, default=None, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix_minmax", type=ratio(0.0, 1.0), nargs=2, default=None)
    g.add_argument("--mixup_prob", type=ratio(0.0, 1.0), default=1.0)
    g.add_argument("--mixup_switch_prob", type=ratio(0.0, 1.0), default=0.5)
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    g.add_argument("--crop_pct", type=ratio(0.0, 1.0, lo_open=True), default=None,
                   help="eval centre-crop fraction (default 0.875 up to 224 px, else 1)")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data_path", required=True, help="folder with train/ and val/ class sub-folders")
    g.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    g.add_argument("--dist_eval", action="store_true", help="accepted for compatibility: evaluation is always sharded")
    g.add_argument("--cache_features", action="store_true", help="linprobe: extract features once, train without augmentation")
    g.add_argument("--decode", choices=DECODES, default=None,
                   help="linprobe training images only (finetune/partial keep timm's RandAugment pipeline; evaluation and "
                        "--cache_features the centre crop): " + DECODE_HELP)
    g.add_argument("--knn", action="store_true", help="kNN accuracy of the initial (pretrained) features")
    g.add_argument("--knn_k", type=positive_int, default=20)
    g.add_argument("--knn_t", type=positive_float, default=0.07)
    add_engine_args(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = get_parser()
    pre, _ = p.parse_known_args(argv)
    recipe = RECIPES[pre.recipe] if pre.recipe else {}
    protocol = pre.protocol or recipe.get("protocol", "finetune")
    # precedence: flags > recipe > protocol defaults > parser defaults
    p.set_defaults(**PROTOCOL_DEFAULTS[protocol])
    p.set_defaults(**{k: v for k, v in recipe.items() if k != "protocol"})
    args = p.parse_args(argv)
    args.protocol = protocol
    if args.aa in ("none", "None", ""):
        args.aa = None
    if args.protocol == "partial" and args.tune_blocks is None:
        p.error("--protocol partial needs --tune_blocks K (0.5, or an integer number of blocks)")
    if args.protocol != "partial" and args.tune_blocks is not None:
        p.error("--tune_blocks belongs to --protocol partial")
    if args.protocol == "linprobe" and (args.mixup > 0 or args.cutmix > 0):
        p.error("--mixup/--cutmix are not part of the linear probe")
    if args.cache_features and args.protocol != "linprobe":
        p.error("--cache_features needs --protocol linprobe (a frozen encoder)")
    if msg := resolve_decode(args):
        p.error(msg)
    if msg := check_args(args):
        p.error(msg)
    return args


def resolve_decode(args: argparse.Namespace) -> str | None:
    """``args.decode``: the probe's augmented training images default to ``fast``; where no image is augmented by a
    random crop (finetune/partial: RandAugment, ``--cache_features``, ``--eval``) it stays ``None`` and giving it is
    an error (one line, returned)."""
    if args.protocol == "linprobe" and not args.cache_features and not args.eval:
        args.decode = args.decode or "fast"
        return decode_unavailable(args.decode, args.device)
    if args.decode is not None:
        where = "--cache_features trains on centre-crop features" if args.cache_features else (
            "--eval only evaluates" if args.eval else f"--protocol {args.protocol} keeps timm's RandAugment pipeline")
        return f"--decode picks how --protocol linprobe decodes its training images; {where}"
    return None


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the model flags taken together, if anything (one line); run after parsing and
    again once ``--eval --resume`` has taken the checkpoint's model flags."""
    if msg := check_model_args(args):
        return msg
    if args.tune_blocks is not None:
        depth = args.depth or resolve_model(args.model).kwargs["depth"]
        k = args.tune_blocks
        if k > depth or (k != int(k) and k != 0.5):
            return f"--tune_blocks must be 0.5 or an integer in [0, {depth}] (the model's blocks), got {k:g}"
    return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return du.launch(partial(run, given=given_flags(get_parser(), argv)), args)


def build_model(args: argparse.Namespace, num_classes: int) -> tuple[VisionTransformerClassifier, int]:
    """The classifier for ``args.protocol``, with pretrained weights if ``--finetune``; returns it and
    the number of parameters the optimiser will tune."""
    linprobe = args.protocol == "linprobe"
    model = build_classifier(
        args.model, num_classes, img_size=args.input_size, patch_size=args.patch_size, depth=args.depth,
        embed_dim=args.embed_dim, num_heads=args.num_heads, global_pool=args.global_pool, fc_norm=False if linprobe else None,
        drop_path_rate=args.drop_path,
        head_init_std=args.head_init_std if args.head_init_std is not None else (0.01 if linprobe else 2e-5),
    )
    if args.finetune:
        report = load_pretrained(model, args.finetune)
        if du.is_main():
            print(f"loaded {len(report.converted)} tensors from {args.finetune}"
                  + (f"; resampled {', '.join(f'{k} {a}->{b}' for k, (a, b) in report.resampled.items())}" if report.resampled else "")
                  + f"; new: {', '.join(sorted(report.added)) or 'none'}")
    elif du.is_main() and not args.eval:
        print("warning: no --finetune checkpoint: the encoder starts from random weights")
    if linprobe:
        setup_linear_probe(model, model.head_init_std)
    elif args.protocol == "partial":
        setup_partial_finetune(model, args.tune_blocks)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_optimizer(args: argparse.Namespace, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if args.protocol == "linprobe":
        # LARS sorts out 1-D parameters itself; groups only carry lr_scale (1) for the engine
        groups = param_groups(model, args.weight_decay, no_weight_decay=model.no_weight_decay())
        return LARS([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=args.lr, weight_decay=args.weight_decay)
    groups = param_groups(model, args.weight_decay, args.layer_decay, model.layer_id, num_layers=model.depth + 1,
                          no_weight_decay=model.no_weight_decay())
    return adamw(groups, args.lr, (0.9, 0.999), device)


def build_criterion(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """SoftTargetCrossEntropy behind Mixup/CutMix (which applies the smoothing), else smoothed or
    plain cross-entropy — the official choice."""
    mixup = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        if args.batch_size % 2:
            raise UserError(f"Mixup/CutMix pair images within a batch: --batch_size must be even, got {args.batch_size}")
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(args.smoothing), None
    return nn.CrossEntropyLoss(), None


def resolve_classes(args: argparse.Namespace, found: list[str]) -> int:
    n = args.num_classes or len(found)
    if n < len(found):
        raise UserError(f"--num_classes {n} is smaller than the {len(found)} class folders found")
    if n > len(found) and du.is_main():
        print(f"warning: --num_classes {n} > {len(found)} classes found; {n - len(found)} outputs are never trained")
    return n


def run(args: argparse.Namespace, device: torch.device, given: Collection[str] = ()) -> dict:
    """Train, or with ``--eval`` evaluate; ``given``: the flags written on the command line (they win over
    the model flags an evaluated checkpoint carries)."""
    du.seed_everything(args.seed + du.rank())
    out = Path(args.output_dir)
    amp = resolve_amp(args.amp, device)
    if args.eval:
        return run_eval(args, device, amp, given)

    train_decoder = None
    val_tf = eval_transform(args.input_size, args.crop_pct)
    if args.decode is not None:  # the probe's augmented training images (resolve_decode)
        train_tf, train_decoder = linprobe_train(args.input_size, args.decode)
    elif args.protocol == "linprobe":  # --cache_features: these images only count; the features come from feat_loader
        train_tf = val_tf
    else:
        train_tf = finetune_transform(args.input_size, args.aa, args.reprob, args.remode, args.recount, args.color_jitter)
    train_ds, val_ds, classes = build_datasets(args.data_path, train_tf, val_tf, train_decoder=train_decoder)
    args.classes = classes  # stored in checkpoints: --eval maps val folders by name
    num_classes = args.num_classes = resolve_classes(args, classes)
    model, n_tuned = build_model(args, num_classes)
    model.to(device)
    sync_buffers(model, params=True)  # one model on all ranks before anything uses it (random parts are per-rank seeded)

    eff_batch = args.batch_size * args.accum_iter * du.world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    if du.is_main():
        n_all = sum(p.numel() for p in model.parameters())
        print(f"{args.protocol} {args.model}: {n_tuned / 1e6:.3f}M of {n_all / 1e6:.2f}M parameters tuned; "
              f"{len(train_ds)} train / {len(val_ds)} val images, {num_classes} classes; "
              f"eff. batch {eff_batch} = {args.batch_size} x {args.accum_iter} x {du.world_size()}; lr {args.lr:.3g}"
              + (f"; training images: --decode {args.decode}" if args.decode else ""))

    pin = args.pin_mem and device.type == "cuda"
    val_loader = eval_loader(val_ds, args.batch_size, args.num_workers, pin)
    knn = {}
    if args.cache_features or args.knn:
        feat_loader = eval_loader(build_datasets(args.data_path, val_tf, val_tf, classes=classes)[0], args.batch_size,
                                  args.num_workers, pin)
        tr_f, tr_t = extract_features(model, feat_loader, device, amp)
        va_f, va_t = extract_features(model, val_loader, device, amp)
        if args.knn:
            knn = knn_accuracy(tr_f, tr_t, va_f, va_t, num_classes, args.knn_k, args.knn_t)
            if du.is_main():
                print(f"kNN (k={args.knn_k}, T={args.knn_t}) on the initial features: " + json.dumps(knn))
        if args.cache_features:
            train_ds = FeatureDataset(tr_f.cpu(), tr_t.cpu())
            val_loader = eval_loader(FeatureDataset(va_f.cpu(), va_t.cpu()), args.batch_size, 0, pin)
            args.num_workers = 0  # features are already in memory

    optimizer = build_optimizer(args, model, device)
    schedule = WarmupCosine(args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    criterion, mixup_fn = build_criterion(args, num_classes)

    def step_fn(m, batch):
        x, target, skipped = batch
        if mixup_fn is not None:
            x, target = mixup_fn(x, target)
        loss = criterion(m(x).float(), target)
        return loss, {"n_skipped": torch.as_tensor(skipped).sum()}

    ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.model_ema_decay)

    last: dict = {}

    def evaluate_hook(m, epoch):
        res = evaluate(m, val_loader, device, num_classes, amp)
        last["confusion"] = res.pop("confusion")
        if ema is not None:
            r = evaluate(ema.module, val_loader, device, num_classes, amp)
            res.update({f"{k}_ema": v for k, v in r.items() if k in ("acc1", "acc5", "loss")})
        if du.is_main():
            print(f"epoch {epoch}: acc1 {res['acc1']:.2f} acc5 {res['acc5']:.2f} loss {res['loss']:.4f} on {res['n_images']} images")
        return res

    after_step = (lambda m, step: ema.update(m, step)) if ema is not None else None
    cfg = config_from_args(args, best_key="acc1")
    decode = {} if args.decode is None else dict(  # uint8 / JPEG batches finished on the device, as pretraining's
        collate_fn=decode_collate(args.decode),
        device_batch=decode_device_batch(args.decode, args.input_size, device, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    trainer = Trainer(cfg, model, optimizer, train_ds, step_fn, schedule, device, args=dump_args(args),
                      evaluate=evaluate_hook, after_step=after_step, extra_state={"model_ema": ema} if ema else None,
                      model_keys=MODEL_KEYS, schedule_keys=CLS_SCHEDULE_KEYS, **decode)
    summary = trainer.fit()
    summary.update(best_acc1=trainer.best, tuned_params=n_tuned, **knn)
    if du.is_main():
        if "confusion" in last:
            write_confusion(last["confusion"], classes, out, f"{args.protocol} {args.model}")
        print(json.dumps({k: v for k, v in summary.items() if k != "confusion"}, default=str))
    return summary


def write_confusion(confusion: torch.Tensor, classes: list[str], out: Path, title: str) -> None:
    confusion_figure(confusion, classes, out / "confusion_matrix.png", title=title)
    (out / "confusion_matrix.json").write_text(json.dumps({"classes": classes, "counts": confusion.tolist()}))


def run_eval(args: argparse.Namespace, device: torch.device, amp: str, given: Collection[str] = ()) -> dict:
    """``--eval --resume CKPT``: top-1/top-5 of a fine-tuned checkpoint (ours or official) on val/; the model
    flags saved in a checkpoint of ours are used unless in ``given`` (written on the command line)."""
    if not args.resume or args.resume == "auto":
        raise UserError("--eval needs --resume PATH (the checkpoint to evaluate)")
    ckpt = load_for_eval(args.resume, args, get_parser(), MODEL_KEYS, given)
    if msg := check_args(args):
        raise UserError(msg)
    state = unwrap_state_dict(ckpt)
    saved_classes = (checkpoint_args(ckpt) or {}).get("classes")
    step = checkpoint_step(ckpt)
    del ckpt
    has_train = (Path(args.data_path) / "train").is_dir()
    _, val_ds, classes = build_datasets(args.data_path, None, eval_transform(args.input_size, args.crop_pct),
                                        need_train=has_train and not saved_classes, classes=saved_classes)
    head_w = state.get("head.weight", state.get("head.1.weight"))
    if head_w is None:
        raise UserError(f"{args.resume}: no classification head (head.weight) — is this a pretraining checkpoint? use --finetune to train")
    num_classes = args.num_classes or head_w.shape[0]
    if len(classes) > num_classes:
        raise UserError(f"the checkpoint's head has {head_w.shape[0]} outputs, fewer than the {len(classes)} classes in val/")
    if "head.1.weight" in state and args.protocol != "linprobe":
        args.protocol = "linprobe"  # a BN + linear probe head
    args.global_pool = "fc_norm.weight" in state or (args.protocol == "linprobe" and args.global_pool)
    args.finetune = ""
    model, _ = build_model(args, num_classes)
    try:
        load_weights(model, state, "exact")  # pos_embed from another input size is resampled
    except UserError as e:
        raise UserError(f"{args.resume}: does not fit {args.model} ({e}); "
                        "check --model/--patch_size/--embed_dim/--depth/--num_heads") from None
    model.to(device)
    use_attention(model, args.attn, device, amp)  # the kernel its training evaluated with
    res = evaluate(model, eval_loader(val_ds, args.batch_size, args.num_workers), device, num_classes, amp)
    confusion = res.pop("confusion")
    if du.is_main():
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_confusion(confusion, classes, out, f"eval {Path(args.resume).name}")
        write_eval(out, "classification", args.resume, step, res)
        print(json.dumps(res))
    return res


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
