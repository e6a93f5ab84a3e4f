"""Trained task checkpoints converted whole (``python -m pipeline.convert CKPT --to timm|mmseg|detectron2``):
tiny models built and saved the way the trainer saves them, every parameter and running statistic perturbed
away from its init, then the same logits / detections after the round trip, and the names the other
frameworks expect (instantiated when detectron2 / mmsegmentation are installed, skipped otherwise)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import pipeline.convert as CLI
from detection.export import import_state as detectron2_to_detection
from maecore.convert.trained import task_of
from maecore.engine import dump_args
from segmentation.export import import_state as mmseg_to_segmentation
from tests import ROOT

TOL = 1e-5
CLASSES = ["circle", "square", "triangle", "star", "ring"]


def perturb(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def save_like_trainer(model: nn.Module, args, path: Path) -> Path:
    """What ``Trainer.state_dict()`` writes, minus the optimizer's numbers."""
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 1, "step": 2, "args": dump_args(args)}, path)
    return path


def run(argv: list, capsys) -> tuple[int, str, str]:
    try:
        CLI.cli([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ---- classification -> timm --------------------------------------------------------------------------------
def _classifier(tmp_path: Path, *flags: str):
    from classification.config import ClassifierData
    from classification.train import build_model, parse_config

    torch.manual_seed(0)
    cfg = parse_config(["--data_path", "-", "--model", "vit_tiny_patch16", "--patch_size", "8", "--embed_dim", "64", "--depth",
                        "2", "--num_heads", "4", "--input_size", "32", *flags])
    model = build_model(cfg, len(CLASSES))
    perturb(model, 1)
    return model, save_like_trainer(model, cfg.saved_args(ClassifierData(CLASSES, len(CLASSES))), tmp_path / "ckpt.pth")


@pytest.mark.parametrize("flags,pool", [((), "avg"), (("--cls_token",), "token"), (("--protocol", "linprobe", "--global_pool"), "avg"),
                                        (("--protocol", "linprobe"), "token")])
def test_classifier_to_timm_same_logits(tmp_path, capsys, flags, pool):
    timm = pytest.importorskip("timm")
    model, ckpt = _classifier(tmp_path, *flags)
    code, out, err = run([ckpt, "-o", tmp_path / "timm.pth", "--to", "timm"], capsys)
    assert code == 0, err
    assert "the whole trained model" in out and "read back: all" in out
    sd = torch.load(tmp_path / "timm.pth", weights_only=True)
    linprobe = "linprobe" in flags
    assert ("fc_norm.weight" in sd) == (not linprobe and pool == "avg") and sd["head.weight"].shape == (5, 64)
    assert not any(k.startswith("head.0") or k.startswith("head.1") for k in sd)
    if linprobe:
        assert "folded into one head" in out
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5, global_pool=pool)
    if linprobe and pool == "avg":
        kw["fc_norm"] = False  # averaged after the final norm
    tv = timm.models.VisionTransformer(**kw).eval()
    tv.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (tv(x) - model(x)).abs().max() <= TOL


def test_classifier_to_timm_model_folder(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    model, ckpt = _classifier(tmp_path)
    code, out, err = run([ckpt, "-o", tmp_path / "timm_model", "--to", "timm"], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "timm_model" / "config.json").read_text())
    assert cfg["label_names"] == CLASSES and cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    tv = timm.create_model(f"local-dir:{tmp_path / 'timm_model'}", pretrained=True).eval()
    assert tv.pretrained_cfg["crop_pct"] == pytest.approx(0.875) and tv.num_classes == 5
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (tv(x) - model(x)).abs().max() <= TOL
    # never over an existing model without --force
    code, _, err = run([ckpt, "-o", tmp_path / "timm_model", "--to", "timm"], capsys)
    assert code == 2 and "--force" in err


# ---- segmentation -> mmseg ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def segmentor(tmp_path_factory):
    from segmentation.train import build_model, parse_config

    torch.manual_seed(0)
    args = parse_config(["--recipe", "demo", "--data_path", "-", "--model", "tiny", "--embed_dim", "64", "--depth", "4",
                         "--num_heads", "2", "--patch_size", "8", "--input_size", "32", "--channels", "16", "--aux_channels",
                         "8", "--num_classes", "5"])
    model = perturb(build_model(args), 2)
    return model, args, save_like_trainer(model, args.saved_args(), tmp_path_factory.mktemp("seg") / "ckpt.pth")


# mmseg's own names for one layer of its MAE backbone and the UperNet parts (written from mmseg's modules)
MMSEG_NAMES = {
    "backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.projection.weight", "backbone.layers.0.ln1.weight",
    "backbone.layers.0.attn.qkv.weight", "backbone.layers.0.attn.qkv.bias", "backbone.layers.0.attn.proj.weight",
    "backbone.layers.0.attn.relative_position_bias_table", "backbone.layers.0.attn.relative_position_index",
    "backbone.layers.0.gamma_1", "backbone.layers.0.gamma_2", "backbone.layers.0.ln2.bias",
    "backbone.layers.0.ffn.layers.0.0.weight", "backbone.layers.0.ffn.layers.1.bias",
    "neck.upsample_4x.0.weight", "neck.upsample_4x.1.running_var", "neck.upsample_4x.3.weight", "neck.upsample_2x.0.weight",
    "decode_head.psp_modules.3.1.conv.weight", "decode_head.psp_modules.0.1.bn.running_mean", "decode_head.bottleneck.conv.weight",
    "decode_head.lateral_convs.2.bn.weight", "decode_head.fpn_convs.0.conv.weight", "decode_head.fpn_bottleneck.bn.bias",
    "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.bias",
}


def test_segmentor_to_mmseg_and_back_same_logits(segmentor, tmp_path, capsys):
    from segmentation.train import build_model

    model, args, ckpt = segmentor
    dst = tmp_path / "upernet_mmseg.pth"
    code, out, err = run([ckpt, "-o", dst, "--to", "mmseg"], capsys)
    assert code == 0, err
    assert "read back: all" in out and "model.decode_head.num_classes=5" in out and "model.backbone.out_indices=(0,1,2,3)" in out
    ck = torch.load(dst, weights_only=True)
    sd = ck["state_dict"]
    assert MMSEG_NAMES <= set(sd) and not any(".blocks." in k or "norm1" in k for k in sd)
    assert ck["meta"]["dataset_meta"]["classes"] == ["0", "1", "2", "3", "4"]
    assert task_of(ck) is None  # mmseg's names: not a checkpoint of ours (its --to mmseg is the trunk, as before)
    back = build_model(args).eval()
    back.load_state_dict(mmseg_to_segmentation(sd), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_mmseg_config_taps_the_blocks_the_segmentor_taps():
    """Trained without ``--out_indices`` (saved as None), the recorded config taps the blocks the segmentor taps."""
    from segmentation.export import export
    from segmentation.model import default_out_indices
    from segmentation.train import build_model, parse_config

    for depth in (*range(1, 14), 24, 32, 40):
        args = parse_config(["--recipe", "demo", "--data_path", "-", "--model", "tiny", "--embed_dim", "32", "--depth", str(depth),
                           "--num_heads", "2", "--patch_size", "8", "--input_size", "32", "--channels", "8", "--aux_channels",
                           "8", "--num_classes", "5"])
        with torch.device("meta"):
            model = build_model(args)
        taps = export(dict(model.state_dict()), {**args.args(), "out_indices": None}).meta["config_overrides"]["model.backbone.out_indices"]
        assert taps == tuple(model.backbone.out_indices) == default_out_indices(depth), depth


MMSEG_CONFIG = ROOT / "segmentation/configs/mmseg/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"
RUNTIME = ("model", "train_dataloader", "val_dataloader", "test_dataloader")  # what mmseg's runner reads


def _shipped_config() -> dict:
    """The shipped mmseg config as mmengine holds it, without mmseg: each top-level name its own copy (a
    variable such as ``crop_size`` is substituted when the file is read, so setting it later changes nothing)."""
    import copy
    import runpy

    return {k: copy.deepcopy(v) for k, v in runpy.run_path(str(MMSEG_CONFIG)).items() if not k.startswith("__")}


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, str(i)))
    else:
        yield ".".join(path), node


def _merge(cfg: dict, overrides: dict) -> dict:
    """mmengine's ``merge_from_dict`` on plain dicts: dotted keys, a number indexes a list."""
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(last) if isinstance(node, list) else last] = value
    return cfg


def _crop_valued(value) -> bool:
    """A value the shipped config derives from its 512 crop: the crop, the stride 341, the scale (2048, 512)."""
    return isinstance(value, tuple) and any(v in (512, 341) for v in value)


def test_mmseg_overrides_set_every_value_the_shipped_config_derives_from_the_crop(segmentor, tmp_path, capsys):
    """A 32-px segmentor: the recorded overrides name every crop-derived value mmseg's runner reads, set to
    what our evaluation and training use, and mmseg's sliding windows then cover every pixel of the test view
    (the stride left at 341 for a 32-px window leaves holes and mmseg's ``slide_inference`` asserts)."""
    from segmentation.data import rescale_size
    from segmentation.evaluate import default_stride, eval_scale, window_grid

    _, args, ckpt = segmentor
    dst = tmp_path / "upernet_mmseg.pth"
    code, out, err = run([ckpt, "-o", dst, "--to", "mmseg"], capsys)
    assert code == 0, err
    overrides = torch.load(dst, weights_only=True)["meta"]["config_overrides"]
    shipped = _shipped_config()
    derived = {p for sec in RUNTIME for p, v in _leaves(shipped[sec], (sec,)) if _crop_valued(v)}
    assert len(derived) >= 8 and derived <= set(overrides), sorted(derived - set(overrides))
    cfg = _merge(shipped, overrides)
    assert not [p for sec in RUNTIME for p, v in _leaves(cfg[sec], (sec,)) if _crop_valued(v)]
    crop, model, train = (32, 32), cfg["model"], cfg["train_dataloader"]["dataset"]["pipeline"]
    assert model["backbone"]["img_size"] == model["test_cfg"]["crop_size"] == crop
    assert model["data_preprocessor"]["size"] == model["data_preprocessor"]["test_cfg"]["size"] == crop
    assert model["test_cfg"]["stride"] == default_stride(crop) == (21, 21)
    for loader in ("val_dataloader", "test_dataloader"):
        resize = cfg[loader]["dataset"]["pipeline"][1]
        assert resize["type"] == "Resize" and resize["scale"] == eval_scale(crop) == (128, 32)
    assert train[2]["type"] == "RandomResize" and train[2]["scale"] == tuple(args.scale)
    assert train[2]["ratio_range"] == tuple(args.ratio_range) and train[3]["cat_max_ratio"] == args.cat_max_ratio
    assert train[3]["type"] == "RandomCrop" and train[3]["crop_size"] == crop
    # every pixel of the test view (resized to the recorded scale, padded to at least the crop) under a window
    for h0, w0 in ((48, 400), (300, 40), (50, 50), (20, 90)):
        h, w = (max(v, c) for v, c in zip(rescale_size(h0, w0, cfg["test_dataloader"]["dataset"]["pipeline"][1]["scale"]),
                                          model["data_preprocessor"]["test_cfg"]["size"]))
        count = torch.zeros(h, w)
        for y0, y1, x0, x1 in window_grid(h, w, model["test_cfg"]["crop_size"], model["test_cfg"]["stride"]):
            count[y0:y1, x0:x1] += 1
        assert count.min() >= 1, (h0, w0)
    # the --cfg-options line of the report says the same
    line = next(n for n in out.splitlines() if "--cfg-options" in n)
    assert "model.test_cfg.stride=(21,21)" in line.split() and "val_dataloader.dataset.pipeline.1.scale=(128,32)" in line.split()


def test_mmseg_stride_and_test_scale_are_the_evaluations():
    from segmentation.evaluate import default_stride, eval_scale
    from segmentation.export import mmseg_crop_overrides

    for c in (16, 32, 64, 100, 224, 512, 640):
        o = mmseg_crop_overrides((c, c), {})
        assert o["model.test_cfg.stride"] == default_stride((c, c)) and o["test_dataloader.dataset.pipeline.1.scale"] == eval_scale((c, c))
    assert mmseg_crop_overrides((512, 512), {})["model.test_cfg.stride"] == (341, 341)  # the shipped config's own
    assert mmseg_crop_overrides((64, 64), {"stride": 40})["model.test_cfg.stride"] == (40, 40)  # --stride as trained


def test_segmentor_in_mmsegmentation(segmentor, tmp_path, capsys):
    """Built in mmseg from the shipped config and the report's ``--cfg-options`` (as mmseg's tools/test.py
    takes them), data preprocessor and all: mmseg's own ``slide_inference`` over an image wider than several
    windows gives our sliding-window logits."""
    pytest.importorskip("mmseg", reason="mmsegmentation is not installed")
    import argparse

    from mmengine.config import Config, DictAction
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    from segmentation.data import normalize
    from segmentation.evaluate import default_stride, slide_inference

    model, args, ckpt = segmentor
    dst = tmp_path / "upernet_mmseg.pth"
    code, out, err = run([ckpt, "-o", dst, "--to", "mmseg"], capsys)
    assert code == 0, err
    words = next(n for n in out.splitlines() if "--cfg-options" in n).split("--cfg-options", 1)[1].split()
    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    options = parser.parse_args(["--cfg-options", *words]).cfg_options
    assert options == torch.load(dst, weights_only=True)["meta"]["config_overrides"]
    register_all_modules()
    cfg = Config.fromfile(str(MMSEG_CONFIG))
    cfg.merge_from_dict(options)
    cfg.model.pretrained = None  # the trunk's MAE checkpoint: the whole model is loaded below
    net = MODELS.build(cfg.model).eval()
    load_checkpoint(net, str(dst), strict=True)
    for h, w in ((40, 150), (20, 90)):  # the second lower than the window: padded by mmseg's preprocessor, by us per window
        rgb = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(h), dtype=torch.uint8)
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
        with torch.no_grad():
            theirs = net.test_step(dict(inputs=[rgb.flip(0)], data_samples=[sample]))[0].seg_logits.data  # BGR, as mmcv loads
            ours = slide_inference(model, normalize(rgb.float() / 255)[None], 5, (32, 32), default_stride((32, 32)))[0]
        assert theirs.shape == ours.shape and (theirs - ours).abs().max() <= 1e-4, (h, w)


# ---- detection -> detectron2 ---------------------------------------------------------------------------------
SMALL = ["--model", "tiny", "--embed_dim", "64", "--depth", "2", "--num_heads", "2", "--patch_size", "16", "--input_size", "64",
         "--pretrain_img_size", "64", "--window_size", "2", "--global_blocks", "1", "--out_channels", "32", "--fc_dim", "64",
         "--anchor_sizes", "8", "16", "32", "64", "128", "--detections_per_img", "20", "--score_thresh", "0.0"]
# what a detection run learns from its annotations (detection.config.DetectorData), saved beside the flags
LEARNED = {"num_classes": 5, "category_ids": [10, 20, 30, 40, 50], "category_names": CLASSES}


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    from detection.train import build_model, parse_config

    torch.manual_seed(0)
    cfg = parse_config(SMALL)
    model = perturb(build_model(cfg, 5), 3)
    return model, cfg, save_like_trainer(model, cfg.saved_args(LEARNED), tmp_path_factory.mktemp("det") / "ckpt.pth")


# detectron2's names for the heads of its ViTDet Mask R-CNN (mask_rcnn_vitdet.py: 2-conv RPN, 4conv1fc, 4conv mask head)
D2_HEAD_NAMES = {
    "proposal_generator.rpn_head.conv.conv0.weight", "proposal_generator.rpn_head.conv.conv1.bias",
    "proposal_generator.rpn_head.objectness_logits.weight", "proposal_generator.rpn_head.anchor_deltas.bias",
    "roi_heads.box_head.conv1.weight", "roi_heads.box_head.conv1.norm.weight", "roi_heads.box_head.conv4.norm.bias",
    "roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc1.bias", "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.bbox_pred.bias", "roi_heads.mask_head.mask_fcn1.weight", "roi_heads.mask_head.mask_fcn4.norm.weight",
    "roi_heads.mask_head.deconv.weight", "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias",
    "backbone.net.pos_embed", "backbone.net.blocks.1.attn.rel_pos_h", "backbone.simfp_2.4.norm.weight", "backbone.simfp_5.2.weight",
}


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_detector_to_detectron2_and_back_same_detections(detector, tmp_path, capsys, suffix):
    from detection.train import build_model

    model, args, ckpt = detector
    dst = tmp_path / f"vitdet{suffix}"
    code, out, err = run([ckpt, "-o", dst, "--to", "detectron2"], capsys)
    assert code == 0, err
    assert "read back: all" in out and "rows reordered [1..K, 0]" in out and "pooler_type='ROIAlign'" in out
    from maecore.checkpoint import unwrap_state_dict
    from maecore.convert.io import read_checkpoint

    sd = unwrap_state_dict(read_checkpoint(dst))
    assert task_of(sd) is None  # detectron2's names: not a checkpoint of ours
    assert D2_HEAD_NAMES <= set(sd) and not any(k.startswith(("rpn.", "roi_heads.box_head.0", "roi_heads.mask_predictor")) for k in sd)
    ours = model.state_dict()
    # detectron2: classes 0..K-1 then background; class-specific boxes and masks for the K classes only
    assert torch.equal(sd["roi_heads.box_predictor.cls_score.weight"][5], ours["roi_heads.box_predictor.cls_score.weight"][0])
    assert torch.equal(sd["roi_heads.box_predictor.cls_score.weight"][:5], ours["roi_heads.box_predictor.cls_score.weight"][1:])
    assert sd["roi_heads.box_predictor.bbox_pred.weight"].shape == (20, 64)
    assert torch.equal(sd["roi_heads.box_predictor.bbox_pred.weight"], ours["roi_heads.box_predictor.bbox_pred.weight"][4:])
    assert sd["roi_heads.mask_head.predictor.weight"].shape[0] == 5
    if suffix == ".pth":
        meta = torch.load(dst, weights_only=True)["meta"]
        assert meta["category_ids"] == [10, 20, 30, 40, 50] and meta["config_overrides"]["model.roi_heads.num_classes"] == 5
        assert meta["config_overrides"]["model.backbone.net.window_block_indexes"] == [0]
    back = build_model(args, 5).eval()
    back.load_state_dict(detectron2_to_detection(sd), strict=True)
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (6, 7)]
    with torch.no_grad():
        a, b = model(images), back(images)
    assert sum(len(d["boxes"]) for d in a) > 0
    for da, db in zip(a, b):
        assert torch.equal(da["labels"], db["labels"])
        for k in ("boxes", "scores", "masks"):
            assert (da[k] - db[k]).abs().max() <= TOL, k


# detectron2's SimpleFeaturePyramid (modeling/backbone/vit.py), transcribed: level strides int(patch / scale) for scales
# (4, 2, 1, 0.5), each named p<log2 stride>, and the top block's one level more
def d2_pyramid(patch: int) -> tuple[list[str], list[int]]:
    strides = [int(patch / s) for s in (4.0, 2.0, 1.0, 0.5)]
    top = int(math.log2(strides[-1])) + 1
    return [f"p{int(math.log2(s))}" for s in strides] + [f"p{top}"], strides + [2**top]


# what common/models/mask_rcnn_fpn.py + mask_rcnn_vitdet.py set (transcribed), under the shipped config
D2_LEVEL_DEFAULTS = {
    "model.backbone.top_block.in_feature": "p5",  # LastLevelMaxPool's fixed in_feature
    "model.proposal_generator.in_features": ["p2", "p3", "p4", "p5", "p6"],
    "model.proposal_generator.anchor_generator.strides": [4, 8, 16, 32, 64],
    "model.roi_heads.box_in_features": ["p2", "p3", "p4", "p5"],
    "model.roi_heads.box_pooler.scales": [1 / 4, 1 / 8, 1 / 16, 1 / 32],
    "model.roi_heads.mask_in_features": ["p2", "p3", "p4", "p5"],
    "model.roi_heads.mask_pooler.scales": [1 / 4, 1 / 8, 1 / 16, 1 / 32],
}
D2_B_CONFIG = ROOT / "detection" / "configs" / "detectron2" / "mask_rcnn_vitdet_b_100ep.py"


@pytest.fixture(scope="module")
def detector8(tmp_path_factory):
    """The demo's pyramid: patch 8, strides 2, 4, 8, 16 and 32 (detectron2's p1-p5)."""
    from detection.train import build_model, parse_config

    torch.manual_seed(0)
    flags = list(SMALL)
    flags[flags.index("--patch_size") + 1], flags[flags.index("--window_size") + 1] = "8", "4"
    cfg = parse_config(flags)
    model = perturb(build_model(cfg, 5), 4)
    return model, cfg, save_like_trainer(model, cfg.saved_args(LEARNED), tmp_path_factory.mktemp("det8") / "ckpt.pth")


@pytest.mark.parametrize("patch", [16, 8])
def test_detectron2_levels_follow_the_pyramid(detector, detector8, patch, tmp_path, capsys):
    """The recorded overrides, applied over the shipped config's level values, name the levels and strides detectron2's
    pyramid builds for the checkpoint's patch size, and those are our pyramid's own strides and pooler scales."""
    model, _, ckpt = detector if patch == 16 else detector8
    dst = tmp_path / "vitdet.pth"
    code, out, err = run([ckpt, "-o", dst, "--to", "detectron2"], capsys)
    assert code == 0, err
    overrides = torch.load(dst, weights_only=True)["meta"]["config_overrides"]
    used = {k: overrides.get(k, v) for k, v in D2_LEVEL_DEFAULTS.items()}
    names, strides = d2_pyramid(patch)
    scales = [1 / s for s in strides[:4]]
    assert used == {
        "model.backbone.top_block.in_feature": names[3], "model.proposal_generator.in_features": names,
        "model.proposal_generator.anchor_generator.strides": strides, "model.roi_heads.box_in_features": names[:4],
        "model.roi_heads.box_pooler.scales": scales, "model.roi_heads.mask_in_features": names[:4],
        "model.roi_heads.mask_pooler.scales": scales,
    }
    assert (patch == 16) == (not set(D2_LEVEL_DEFAULTS) & set(overrides))  # patch 16: the config as shipped
    assert all(f"{k}={overrides[k]}" in out for k in set(D2_LEVEL_DEFAULTS) & set(overrides))  # the report lists them
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))]
    with torch.no_grad():
        feats = model.backbone(model.transform(images)[0].tensors)
        model(images)  # torchvision's poolers infer their scales from the feature maps
    assert [64 // f.shape[-1] for f in feats.values()] == strides
    assert model.roi_heads.box_roi_pool.scales == scales and model.roi_heads.mask_roi_pool.scales == scales
    # the top block's level is an argument of the shipped config's top block (detectron2's LastLevelMaxPool takes none)
    import ast

    assigned = {ast.unparse(n.targets[0]): ast.unparse(n.value) for n in ast.parse(D2_B_CONFIG.read_text()).body
                if isinstance(n, ast.Assign)}
    assert assigned["model.backbone.top_block"] == "L(last_level_max_pool)(in_feature='p5')"


@pytest.mark.parametrize("patch", [16, 8])
def test_detector_in_detectron2(detector, detector8, patch, tmp_path, capsys):
    """detectron2's ViTDet Mask R-CNN, built from the shipped LazyConfig with the overrides the converter reports,
    loads every tensor by name (strict); its pyramid, RPN head and RoI poolers compute ours level by level, and it
    runs inference (patch 8 before the levels were recorded: IndexError in SimpleFeaturePyramid.forward)."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import Boxes

    model, args, ckpt = detector if patch == 16 else detector8
    dst = tmp_path / "vitdet.pth"
    assert run([ckpt, "-o", dst, "--to", "detectron2"], capsys)[0] == 0
    saved = torch.load(dst, weights_only=True)
    cfg = LazyConfig.load(str(D2_B_CONFIG))
    for k, v in saved["meta"]["config_overrides"].items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, v)
    net = instantiate(cfg.model).eval()
    net.load_state_dict(saved["model"], strict=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ours = model.backbone(model.transform(list(x))[0].tensors)
        theirs = net.backbone((x * 255 - net.pixel_mean) / net.pixel_std)
        names = net.proposal_generator.in_features
        assert list(theirs) == names and len(ours) == len(names)
        for a, b in zip(ours.values(), theirs.values()):
            assert (a - b).abs().max() <= 1e-4
        logits, deltas = net.proposal_generator.rpn_head([theirs[f] for f in names])
        our_logits, our_deltas = model.rpn.head(list(ours.values()))
        for a, b in zip(logits + deltas, our_logits + our_deltas):
            assert (a - b).abs().max() <= 1e-4
        # from the finest level to the coarsest (a box past the image: level 5 or more, clamped to the last)
        boxes = torch.tensor([[2.0, 3.0, 12.0, 9.0], [5.0, 5.0, 60.0, 50.0], [0.0, 10.0, 40.0, 63.0], [20.0, 1.0, 27.0, 30.0],
                              [-200.0, -150.0, 250.0, 260.0]])
        feats = [theirs[f] for f in net.roi_heads.box_in_features]
        pooled = model.roi_heads.box_roi_pool(ours, [boxes], [(64, 64)])
        assert (net.roi_heads.box_pooler(feats, [Boxes(boxes)]) - pooled).abs().max() <= 1e-4
        detections = net([{"image": x[0] * 255, "height": 64, "width": 64}])[0]["instances"]
    assert len(detections) > 0 and detections.pred_masks.shape[-2:] == (64, 64)


# ---- refusals ---------------------------------------------------------------------------------------------------
def test_trained_checkpoints_refuse_what_they_cannot_be(segmentor, detector, tmp_path, capsys):
    _, _, seg = segmentor
    code, _, err = run([seg, "-o", tmp_path / "x.pth", "--to", "official"], capsys)
    assert code == 2 and "trained segmentation checkpoint" in err and "--to mmseg" in err and len(err.strip().splitlines()) == 1
    code, _, err = run([seg, "-o", tmp_path / "x.pth", "--to", "mmseg", "--img-size", "64"], capsys)
    assert code == 2 and "--img-size" in err
    _, _, det = detector
    # a detection checkpoint to a trunk format still gives the trunk, as before
    code, out, err = run([det, "-o", tmp_path / "trunk.pth", "--to", "detection"], capsys)
    assert code == 0, err
    trunk = torch.load(tmp_path / "trunk.pth", weights_only=True)["model"]
    assert all(k.startswith(("blocks.", "pos_embed", "patch_embed")) for k in trunk)


def test_detector_patch_size_detectron2_cannot_name(tmp_path, capsys):
    """Patch 12 gives strides 3, 6, 12, 24: detectron2's pyramid names levels by log2 stride and its RoI pooler
    needs power-of-two scales, so the conversion refuses in one line rather than write a model that cannot run."""
    from detection.train import build_model, parse_config

    flags = list(SMALL)
    flags[flags.index("--patch_size") + 1], flags[flags.index("--input_size") + 1] = "12", "96"
    cfg = parse_config(flags)
    ckpt = save_like_trainer(build_model(cfg, 5), cfg.saved_args({"num_classes": 5}), tmp_path / "ckpt.pth")
    code, _, err = run([ckpt, "-o", tmp_path / "vitdet.pth", "--to", "detectron2"], capsys)
    assert code == 2 and err.startswith("error: ") and "patch size 12" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "vitdet.pth").exists()
