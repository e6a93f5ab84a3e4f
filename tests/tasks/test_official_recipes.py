"""The paper-named recipes equal the official code, number for number (issue #24): per parameter (weight decay,
lr scale) and per iteration (lr).  Each framework's rule is written out here from its source, independently of
the toolkit's code, and compared with what our optimizer builders and schedules produce:

* MAE pretraining — ``main_pretrain.py``: timm 0.3.2 ``optim_factory.add_weight_decay(model, wd)`` (no skip list);
  ``util/lr_sched.py`` ``adjust_learning_rate``.
* MAE fine-tuning / linear probe — ``main_finetune.py``: ``util/lr_decay.py`` ``param_groups_lrd`` with timm's
  ``VisionTransformer.no_weight_decay()``; ``main_linprobe.py``: LARS over the head only.
* ViTDet — detectron2 ``solver/build.py`` ``get_default_optimizer_params``, ``modeling/backbone/vit.py``
  ``get_vit_lr_decay_rate``, ``configs/common/optim.py`` ``AdamW`` and ``projects/ViTDet/configs/COCO/
  mask_rcnn_vitdet_{b,l}_100ep.py`` / ``_h_75ep.py``; fvcore ``MultiStepParamScheduler`` /
  ``CompositeParamScheduler`` under detectron2's ``WarmupParamScheduler`` and ``LRMultiplier``.
* UperNet — mmsegmentation 1.2.2 ``engine/optimizers/layer_decay_optimizer_constructor.py``; mmseg 0.x's
  ``lr_config`` (mmcv ``PolyLrUpdaterHook`` with linear warm-up), which the published 48.13 was trained with;
  mmseg 1.x's ``LinearLR`` + ``PolyLR`` (mmengine 0.10, stepped once per iteration).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import replace

import pytest
import torch

# --------------------------------------------------------------------------------------------------
# Transcriptions of the official rules (plain Python, no toolkit code)
# --------------------------------------------------------------------------------------------------


def timm032_add_weight_decay(named_params, weight_decay: float, skip_list=()) -> dict[str, tuple[float, float]]:
    """timm 0.3.2 ``add_weight_decay`` (main_pretrain.py passes no skip list): {name: (wd, lr_scale)}; the
    official groups carry no ``lr_scale``, so ``adjust_learning_rate`` gives them the lr itself (scale 1)."""
    out = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue  # frozen weights
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            out[name] = (0.0, 1.0)
        else:
            out[name] = (weight_decay, 1.0)
    return out


TIMM_VIT_NO_WEIGHT_DECAY = {"pos_embed", "cls_token", "dist_token"}  # timm VisionTransformer.no_weight_decay()


def mae_get_layer_id_for_vit(name: str, num_layers: int) -> int:
    if name in ["cls_token", "pos_embed"]:
        return 0
    elif name.startswith("patch_embed"):
        return 0
    elif name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    else:
        return num_layers


def mae_param_groups_lrd(named_params, num_blocks: int, weight_decay: float, no_weight_decay_list, layer_decay: float):
    """util/lr_decay.py ``param_groups_lrd`` (``num_layers = len(model.blocks) + 1``)."""
    num_layers = num_blocks + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    out = {}
    for n, p in named_params:
        if not p.requires_grad:
            continue
        this_decay = 0.0 if (p.ndim == 1 or n in no_weight_decay_list) else weight_decay
        out[n] = (this_decay, layer_scales[mae_get_layer_id_for_vit(n, num_layers)])
    return out


def mae_adjust_learning_rate(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """util/lr_sched.py ``adjust_learning_rate`` (``epoch`` = data_iter_step / len(data_loader) + epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


# detectron2: the modules of ViTDet's Mask R-CNN that are torch norm types (``norm_module_types`` in
# get_default_optimizer_params) are the ViT blocks' ``norm1`` / ``norm2`` (``norm_layer=partial(nn.LayerNorm)`` in
# configs/common/models/mask_rcnn_vitdet.py); the ViT has no final norm, the pyramid (``norm="LN"``) and the box /
# mask heads (``conv_norm="LN"``) use ``detectron2.layers.LayerNorm``, a plain ``nn.Module``; the RPN head has none.
D2_TORCH_NORM_PARAM = re.compile(r"backbone\.net\.blocks\.\d+\.norm[12]\.(weight|bias)")


def d2_get_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12) -> float:
    layer_id = num_layers + 1
    if name.startswith("backbone"):
        if ".pos_embed" in name or ".patch_embed" in name:
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks."):].split(".")[2]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def d2_default_optimizer_params(d2_names, weight_decay: float, weight_decay_norm, lr_factor_func, overrides):
    """``get_default_optimizer_params(model, base_lr=lr, weight_decay_norm=…, lr_factor_func=…, overrides=…)`` under
    ``AdamW(weight_decay=0.1)`` (the groups without their own ``weight_decay`` take the optimizer's):
    {detectron2 name: (wd, lr factor)}."""
    out = {}
    for name in d2_names:
        module_param_name = name.rsplit(".", 1)[1]
        hyperparams = {"lr": 1.0, "weight_decay": weight_decay}
        if D2_TORCH_NORM_PARAM.fullmatch(name) and weight_decay_norm is not None:
            hyperparams["weight_decay"] = weight_decay_norm
        hyperparams["lr"] *= lr_factor_func(name)
        hyperparams.update(overrides.get(module_param_name, {}))
        out[name] = (hyperparams["weight_decay"], hyperparams["lr"])
    return out


# the three ViTDet COCO configs: (depth, lr_decay_rate, weight_decay_norm, overrides, max_iter, milestones,
# warmup_length); H imports B's lr_multiplier and rescales max_iter and the milestones, not ``warmup_length``
_B_MILESTONES = [163889, 177546]
VITDET_CONFIGS = {
    "vitdet_b": (12, 0.7, 0.0, {"pos_embed": {"weight_decay": 0.0}}, 184375, _B_MILESTONES, 250 / 184375),
    "vitdet_l": (24, 0.8, 0.0, {"pos_embed": {"weight_decay": 0.0}}, 184375, _B_MILESTONES, 250 / 184375),
    "vitdet_h": (32, 0.9, None, {}, 184375 * 3 // 4, [m * 3 // 4 for m in _B_MILESTONES], 250 / 184375),
}
WHERE_EPSILON = 1e-6  # fvcore ParamScheduler


def d2_vitdet_lr(it: int, lr: float, max_iter: int, milestones, warmup_length: float, warmup_factor: float = 0.001) -> float:
    """LRMultiplier(WarmupParamScheduler(MultiStepParamScheduler([1, .1, .01], milestones, max_iter),
    warmup_length, warmup_factor), max_iter) at iteration ``it``: ``base_lr * multiplier(it / max_iter)``."""
    values = [1.0, 0.1, 0.01]

    def multistep(where: float) -> float:
        epoch_num = int((where + WHERE_EPSILON) * max_iter)
        return values[bisect.bisect_right(milestones, epoch_num)]

    start_value, end_value = warmup_factor * multistep(0.0), multistep(warmup_length)
    lengths = [warmup_length, 1 - warmup_length]
    where = it / max_iter
    i, running_total = 0, lengths[0]
    while (where + WHERE_EPSILON) > running_total and i < 1:
        i += 1
        running_total += lengths[i]
    if i == 0:  # "rescaled" linear warm-up
        w = (where - (running_total - lengths[0])) / lengths[0]
        return lr * (end_value * w + start_value * (1 - w))
    return lr * multistep(where)  # "fixed"


def mmseg_get_layer_id_for_vit(var_name: str, max_layer_id: int) -> int:
    if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    elif var_name.startswith("backbone.patch_embed"):
        return 0
    elif var_name.startswith("backbone.layers"):
        return int(var_name.split(".")[2]) + 1
    else:
        return max_layer_id - 1


def mmseg_layer_decay_params(named_shapes, base_wd: float, num_layers_cfg: int, decay_rate: float):
    """``LearningRateDecayOptimizerConstructor.add_params`` (``LayerDecayOptimizerConstructor``, layer_wise_vit) on
    the EncoderDecoder's names: {mmseg name: (wd, lr_scale)}."""
    num_layers = num_layers_cfg + 2
    out = {}
    for name, shape in named_shapes:
        if len(shape) == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token"):
            this_weight_decay = 0.0
        else:
            this_weight_decay = base_wd
        layer_id = mmseg_get_layer_id_for_vit(name, num_layers)
        out[name] = (this_weight_decay, decay_rate ** (num_layers - layer_id - 1))
    return out


def mmcv_poly_warmup_lr(it: int, base_lr: float, max_iters: int, warmup_iters: int, warmup_ratio: float = 1e-6,
                        power: float = 1.0, min_lr: float = 0.0) -> float:
    """mmseg 0.x ``lr_config = dict(policy='poly', warmup='linear', warmup_iters, warmup_ratio, power, min_lr,
    by_epoch=False)``: mmcv's PolyLrUpdaterHook ``get_lr`` and ``get_warmup_lr`` at ``runner.iter == it``."""
    coeff = (1 - it / max_iters) ** power
    regular = (base_lr - min_lr) * coeff + min_lr
    if it >= warmup_iters:
        return regular
    k = (1 - it / warmup_iters) * (1 - warmup_ratio)
    return regular * (1 - k)


def mmengine_linear_then_poly(base_lr: float, max_iters: int, warmup_iters: int, start_factor: float = 1e-6,
                              eta_min: float = 0.0, power: float = 1.0) -> list[float]:
    """mmseg 1.x ``param_scheduler = [LinearLR(start_factor, begin=0, end=warmup_iters), PolyLR(eta_min, power,
    begin=warmup_iters, end=max_iters)]`` (by_epoch=False), simulated as mmengine runs it: each scheduler's
    ``step()`` at construction and after every iteration, in its ``[begin, end)`` range, in chainable form.
    Returns the lr of iterations 0 .. max_iters - 1."""

    class Sched:
        def __init__(self, begin, end, value):
            self.begin, self.end, self.total_iters, self.value = begin, end, end - begin - 1, value
            self.last_step, self.global_step = -1, -1

        def step(self, lr):
            self.global_step += 1
            if self.begin <= self.global_step < self.end:
                self.last_step += 1
                return self.value(self, lr)
            return lr

    def linear(s, lr):  # LinearParamScheduler._get_value (end_factor 1.0)
        if s.last_step == 0:
            return lr * start_factor
        return lr * (1.0 + (1.0 - start_factor) / (s.total_iters * start_factor + (s.last_step - 1) * (1.0 - start_factor)))

    def poly(s, lr):  # PolyParamScheduler._get_value
        if s.last_step == 0:
            return lr
        return (lr - eta_min) * (1 - 1 / (s.total_iters - s.last_step + 1)) ** power + eta_min

    lr = base_lr
    scheds = [Sched(0, warmup_iters, linear), Sched(warmup_iters, max_iters, poly)]
    for s in scheds:  # built in order; each constructor calls step() once
        lr = s.step(lr)
    out = []
    for _ in range(max_iters):
        out.append(lr)
        for s in scheds:  # ParamSchedulerHook.after_train_iter
            lr = s.step(lr)
    return out


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """{parameter name: (weight_decay, lr_scale)} of the optimizer our builder made."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = (g["weight_decay"], g.get("lr_scale", 1.0))
    return out


def assert_same(ours: dict, official: dict) -> None:
    assert set(ours) == set(official), (sorted(set(ours) ^ set(official)))[:6]
    bad = [(n, ours[n], official[n]) for n in official if ours[n] != official[n]]
    assert not bad, f"{len(bad)} parameters differ, e.g. {bad[:4]}"


CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# MAE pretraining
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mae_vit_base_patch16", "mae_vit_large_patch16"])
def test_pretrain_groups_equal_main_pretrain(model):
    from pretrain.train import build_model, build_optimizer, parse_config

    args = parse_config(["--recipe", "paper", "--model", model, "--data_path", "x"])
    args = replace(args, lr=1.5e-4 * 4096 / 256)
    with torch.device("meta"):
        m = build_model(args)
    ours = by_name(build_optimizer(args, m, CPU), m)
    assert_same(ours, timm032_add_weight_decay(m.named_parameters(), 0.05))
    assert ours["cls_token"] == (0.05, 1.0) and ours["mask_token"] == (0.05, 1.0)  # the official code decays them
    assert "pos_embed" not in ours and "decoder_pos_embed" not in ours  # frozen sin-cos tables
    # opt-in: the tokens join the exempt 1-D parameters
    args = replace(args, wd_rule="uniform")
    uniform = by_name(build_optimizer(args, m, CPU), m)
    assert {n for n in uniform if uniform[n] != ours[n]} == {"cls_token", "mask_token"}


@pytest.mark.parametrize("recipe", ["demo"])
def test_pretrain_demo_follows_the_official_rule_too(recipe):
    from pretrain.train import build_model, build_optimizer, parse_config

    args = parse_config(["--recipe", recipe, "--data_path", "x"])
    args = replace(args, lr=1e-3)
    with torch.device("meta"):
        m = build_model(args)
    assert_same(by_name(build_optimizer(args, m, CPU), m), timm032_add_weight_decay(m.named_parameters(), args.weight_decay))


# --------------------------------------------------------------------------------------------------
# Fine-tuning and linear probe
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,model,depth", [("finetune_vit_base", "vit_base_patch16", 12),
                                                 ("finetune_vit_large", "vit_large_patch16", 24),
                                                 ("finetune_vit_huge", "vit_huge_patch14", 32)])
def test_finetune_groups_equal_param_groups_lrd(recipe, model, depth):
    from classification.train import build_model, build_optimizer, parse_config

    args = parse_config(["--recipe", recipe, "--data_path", "x"])
    assert args.model == model
    args = replace(args, lr=1e-3)
    with torch.device("meta"):
        m = build_model(args, 1000)
    official = mae_param_groups_lrd(m.named_parameters(), depth, args.weight_decay, TIMM_VIT_NO_WEIGHT_DECAY, args.layer_decay)
    assert_same(by_name(build_optimizer(args, m, CPU), m), official)


def test_linear_probe_tunes_the_head_only_with_lars():
    from classification.lars import LARS
    from classification.train import build_model, build_optimizer, parse_config

    args = parse_config(["--recipe", "linprobe", "--model", "vit_base_patch16", "--data_path", "x"])
    args = replace(args, lr=0.1 * 16384 / 256)
    with torch.device("meta"):
        m = build_model(args, 1000)
    opt = build_optimizer(args, m, CPU)
    # main_linprobe.py: LARS(model.head.parameters(), weight_decay=args.weight_decay) after the BN(affine=False) head
    assert isinstance(opt, LARS) and opt.defaults["weight_decay"] == args.weight_decay == 0.0
    assert set(by_name(opt, m)) == {f"head.1.{k}" for k in ("weight", "bias")}
    assert all(v == (0.0, 1.0) for v in by_name(opt, m).values())


@pytest.mark.parametrize("task,recipe", [("pretrain", "paper"), ("classification", "finetune_vit_base"),
                                         ("classification", "finetune_vit_large"), ("classification", "linprobe")])
def test_cosine_schedule_equals_adjust_learning_rate(task, recipe):
    from maecore.optim import WarmupCosine

    if task == "pretrain":
        from pretrain.train import parse_config
    else:
        from classification.train import parse_config
    args = parse_config(["--recipe", recipe, "--data_path", "x", *(["--model", "base"] if recipe == "linprobe" else [])])
    lr = 1e-3
    ours = WarmupCosine(lr, args.min_lr, args.warmup_epochs, args.epochs)  # as pretrain/ and classification/train.py build it
    w, e = args.warmup_epochs, args.epochs
    for t in (0.0, 0.25, w / 3, w - 1e-4, w, w + 1 / 1251, e / 2, e - 1e-4):
        assert ours(t) == pytest.approx(mae_adjust_learning_rate(t, lr, args.min_lr, w, e), rel=1e-12, abs=1e-18), t


# --------------------------------------------------------------------------------------------------
# ViTDet (detectron2)
# --------------------------------------------------------------------------------------------------
def _d2_names(model, args) -> dict[str, str]:
    """Our parameter name -> detectron2's (the converter's renaming, which real detectron2 loads: issue #24)."""
    from detection.export import export as detection_to_detectron2

    conv = detection_to_detectron2(dict(model.named_parameters()), args.args())
    return {n: conv.report.renamed.get(n, n) for n, _ in model.named_parameters()}


@pytest.mark.parametrize("recipe", ["vitdet_b", "vitdet_l", "vitdet_h"])
def test_vitdet_groups_equal_detectron2(recipe):
    from detection.train import build_model, build_optimizer, parse_config

    depth, rate, wd_norm, overrides, *_ = VITDET_CONFIGS[recipe]
    args = parse_config(["--recipe", recipe])
    with torch.device("meta"):
        m = build_model(args, 80)
    assert m.backbone.net.depth == depth
    to_d2 = _d2_names(m, args)
    official = d2_default_optimizer_params(to_d2.values(), 0.1, wd_norm, lambda n: d2_get_vit_lr_decay_rate(n, rate, depth), overrides)
    ours = by_name(build_optimizer(args, m, CPU), m)
    assert_same({to_d2[n]: v for n, v in ours.items()}, official)
    exempt = {n for n, (wd, _) in ours.items() if wd == 0.0}
    if recipe == "vitdet_h":
        assert not exempt  # overrides {} and weight_decay_norm None: every parameter decays
    else:  # pos_embed and the blocks' two LayerNorms; biases and rel_pos_h/w decay
        assert len(exempt) == 1 + 4 * depth and "backbone.net.pos_embed" in exempt
        assert ours["backbone.net.blocks.0.attn.rel_pos_h"][0] == ours["backbone.simfp_2.1.weight"][0] == 0.1


def test_vitdet_uniform_rule_is_opt_in():
    from detection.train import build_model, build_optimizer, parse_config

    args = parse_config(["--recipe", "vitdet_b", "--wd_rule", "uniform"])
    with torch.device("meta"):
        m = build_model(args, 80)
    ours = by_name(build_optimizer(args, m, CPU), m)
    exempt = {n for n, (wd, _) in ours.items() if wd == 0.0}
    one_d = {n for n, p in m.named_parameters() if p.ndim == 1}
    assert exempt == one_d | {"backbone.net.pos_embed"} | {n for n in ours if n.endswith((".rel_pos_h", ".rel_pos_w"))}


@pytest.mark.parametrize("recipe", ["vitdet_b", "vitdet_l", "vitdet_h"])
@pytest.mark.parametrize("images,world", [(117_266, 8), (118_287, 8), (5_000, 1)])
def test_vitdet_schedule_equals_detectron2(recipe, images, world):
    """ViTDet's iterations, warm-up and milestones whatever the dataset's size and the number of processes."""
    from detection.train import parse_config, schedule_length, step_schedule

    *_, max_iter, milestones, warmup_length = VITDET_CONFIGS[recipe]
    args = parse_config(["--recipe", recipe])
    steps_per_epoch = -(-images // world) // args.batch_size // args.accum_iter
    epochs, total = schedule_length(args, steps_per_epoch)
    assert total == max_iter and epochs * steps_per_epoch >= max_iter > (epochs - 1) * steps_per_epoch
    ours = step_schedule(args, total)
    assert ours.milestones == tuple(milestones) and ours.warmup == pytest.approx(warmup_length * max_iter, rel=1e-12)
    m1, m2 = milestones
    for it in (0, 1, 100, 186, 187, 188, 249, 250, 251, m1 - 1, m1, m1 + 1, m2 - 1, m2, m2 + 1, max_iter - 1):
        assert ours(it) == pytest.approx(d2_vitdet_lr(it, 1e-4, max_iter, milestones, warmup_length), rel=1e-12), it


def test_detection_demo_schedule_is_whole_epochs_with_vitdet_fractions():
    from detection.train import parse_config, schedule_length, step_schedule

    args = parse_config(["--recipe", "demo", "--epochs", "7"])
    epochs, total = schedule_length(args, 100)  # 400 images, batch 4
    assert (epochs, total) == (7, 700)
    ours = step_schedule(args, total)
    assert ours.milestones == (622, 674)
    for it in range(700):
        assert ours(it) == pytest.approx(d2_vitdet_lr(it, args.lr, 700, [622, 674], 20 / 700), rel=1e-12), it
    # --epochs on the command line wins over a recipe's iteration count
    assert parse_config(["--recipe", "vitdet_b", "--epochs", "12"]).max_iters == 0
    assert parse_config(["--recipe", "vitdet_b", "--epochs", "12", "--max_iters", "500"]).max_iters == 500


# --------------------------------------------------------------------------------------------------
# UperNet (mmsegmentation)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,depth", [("base", 12), ("large", 24)])
def test_upernet_groups_equal_mmseg_layer_decay_constructor(recipe, depth):
    from segmentation.export import export as segmentation_to_mmseg
    from segmentation.train import build_model, build_optimizer, parse_config

    args = parse_config(["--recipe", recipe, "--data_path", "x"])
    with torch.device("meta"):
        m = build_model(args)
    conv = segmentation_to_mmseg(dict(m.named_parameters()), args.args())
    to_mmseg = {n: conv.report.renamed.get(n, n) for n, _ in m.named_parameters()}
    official = mmseg_layer_decay_params([(to_mmseg[n], tuple(p.shape)) for n, p in m.named_parameters()],
                                        args.weight_decay, depth, args.layer_decay)
    ours = by_name(build_optimizer(args, m, CPU), m)
    assert_same({to_mmseg[n]: v for n, v in ours.items()}, official)
    decayed = {n for n, (wd, _) in ours.items() if wd}
    assert {"backbone.pos_embed", "backbone.cls_token"} <= decayed
    assert sum(n.endswith("relative_position_bias_table") for n in decayed) == depth
    # opt-in: those three kinds join the exempt 1-D parameters
    args = replace(args, wd_rule="uniform")
    uniform = by_name(build_optimizer(args, m, CPU), m)
    changed = {n for n in ours if uniform[n] != ours[n]}
    assert changed == {"backbone.pos_embed", "backbone.cls_token"} | {n for n in ours if n.endswith("relative_position_bias_table")}


ITERS = (0, 1, 2, 749, 1498, 1499, 1500, 1501, 80_000, 158_500, 159_998, 159_999)


def test_upernet_schedule_equals_mmseg_0x_lr_config():
    from segmentation.train import parse_config, poly_schedule

    args = parse_config(["--recipe", "base", "--data_path", "x"])
    ours = poly_schedule(args)
    for it in ITERS:
        assert ours(it) == pytest.approx(mmcv_poly_warmup_lr(it, 1e-4, 160_000, 1500), rel=1e-12, abs=1e-20), it


def test_upernet_poly_after_warmup_equals_mmseg_1x_param_scheduler():
    from segmentation.train import parse_config, poly_schedule

    args = parse_config(["--recipe", "base", "--data_path", "x", "--poly_after_warmup"])
    ours = poly_schedule(args)
    official = mmengine_linear_then_poly(1e-4, 160_000, 1500)
    for it in (*ITERS, *range(0, 160_000, 997)):
        assert ours(it) == pytest.approx(official[it], rel=1e-9, abs=1e-20), it
    assert official[1499] == pytest.approx(1e-4) and official[159_999] == 0.0
    # 1.x's restart gives up to ~1 % more lr than 0.x's decay over all 160k
    base = poly_schedule(parse_config(["--recipe", "base", "--data_path", "x"]))
    assert max(ours(i) / base(i) for i in range(1500, 159_000, 500)) == pytest.approx(1.0095, abs=5e-4)


# --------------------------------------------------------------------------------------------------
# The engine runs these schedules step by step (real training runs on the synthetic world)
# --------------------------------------------------------------------------------------------------
def _train_lrs(out) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"] - 1: r["lr"] for r in recs if r["type"] == "train"}  # logged after step r["step"] (1-based)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from synthetic import make_world

    root = tmp_path_factory.mktemp("official")
    return make_world(root, size=64, n_train=8, n_val=2, seed=2, tasks=("coco", "ade"))


def test_detection_run_follows_detectron2_iteration_by_iteration(worlds, tmp_path):
    """8 images at batch 2 (4 steps an epoch), --max_iters 6: the run stops mid-epoch 2 at step 6, with detectron2's lr
    at every step."""
    from detection.train import main

    out = tmp_path / "det"
    small = ["--model", "tiny", "--embed_dim", "64", "--depth", "2", "--num_heads", "2", "--patch_size", "16",
             "--input_size", "64", "--pretrain_img_size", "64", "--window_size", "2", "--global_blocks", "1",
             "--out_channels", "32", "--fc_dim", "64", "--anchor_sizes", "8", "16", "32", "64", "128",
             "--rpn_batch_size_per_image", "32", "--box_batch_size_per_image", "16", "--num_workers", "0", "--no_progress",
             "--amp", "none", "--device", "cpu", "--vis_images", "0", "--max_eval_images", "1"]
    summary = main(["--data_path", str(worlds["coco"]), "--output_dir", str(out), *small, "--batch_size", "2",
                    "--max_iters", "6", "--warmup_iters", "2", "--milestones", "0.5", "0.8", "--lr", "2e-4", "--log_every", "1"])
    assert summary["steps"] == 6
    lrs = _train_lrs(out)
    assert sorted(lrs) == list(range(6))
    for it, lr in lrs.items():
        assert lr == pytest.approx(d2_vitdet_lr(it, 2e-4, 6, [3, 4], 2 / 6), rel=1e-12), it


@pytest.mark.parametrize("after_warmup", [False, True])
def test_segmentation_run_follows_mmseg_iteration_by_iteration(worlds, tmp_path, after_warmup):
    """8 images at batch 2 with --accum_iter 3: 4 batches an epoch make 1 step (the 4th batch makes none), so the
    fractional-epoch clock would be off; the steps follow mmseg's lr, and there are --max_iters of them."""
    from segmentation.train import main

    out = tmp_path / "seg"
    main(["--recipe", "demo", "--data_path", str(worlds["ade"]), "--output_dir", str(out), "--model", "tiny",
          "--embed_dim", "32", "--depth", "2", "--num_heads", "2", "--patch_size", "8", "--input_size", "32",
          "--channels", "8", "--aux_channels", "8", "--num_workers", "0", "--no_progress", "--amp", "none",
          "--device", "cpu", "--num_vis", "0", "--eval_max_images", "1", "--batch_size", "2", "--accum_iter", "3",
          "--max_iters", "5", "--warmup_iters", "3", "--lr", "1e-3", "--log_every", "1",
          *(["--poly_after_warmup"] if after_warmup else [])])
    lrs = _train_lrs(out)
    assert sorted(lrs) == list(range(5))
    official = mmengine_linear_then_poly(1e-3, 5, 3) if after_warmup else [mmcv_poly_warmup_lr(i, 1e-3, 5, 3) for i in range(5)]
    for it, lr in lrs.items():
        assert lr == pytest.approx(official[it], rel=1e-12, abs=1e-20), it
