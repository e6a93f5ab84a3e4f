"""Trained task checkpoints converted whole (``python -m maecore.convert CKPT --to timm|mmseg|detectron2``):
tiny models built and saved the way the trainer saves them, every parameter and running statistic perturbed
away from its init, then the same logits / detections after the round trip, and the names the other
frameworks expect (instantiated when detectron2 / mmsegmentation are installed, skipped otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import maecore.convert.__main__ as CLI
from maecore.convert.trained import detectron2_to_detection, mmseg_to_segmentation, task_of
from maecore.engine import dump_args

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
    from classification.train import build_model, parse_args

    torch.manual_seed(0)
    args = parse_args(["--data_path", "-", "--model", "vit_tiny_patch16", "--patch_size", "8", "--embed_dim", "64", "--depth",
                       "2", "--num_heads", "4", "--input_size", "32", *flags])
    args.classes, args.num_classes = CLASSES, len(CLASSES)
    model, _ = build_model(args, len(CLASSES))
    perturb(model, 1)
    return model, save_like_trainer(model, args, tmp_path / "ckpt.pth")


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
    from segmentation.train import build_model, parse_args

    torch.manual_seed(0)
    args = parse_args(["--recipe", "demo", "--data_path", "-", "--model", "tiny", "--embed_dim", "64", "--depth", "4",
                       "--num_heads", "2", "--patch_size", "8", "--input_size", "32", "--channels", "16", "--aux_channels",
                       "8", "--num_classes", "5"])
    model = perturb(build_model(args), 2)
    return model, args, save_like_trainer(model, args, tmp_path_factory.mktemp("seg") / "ckpt.pth")


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
    assert "read back: all" in out and "model.decode_head.num_classes=5" in out and "model.backbone.out_indices=(0, 1, 2, 3)" in out
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
    from maecore.convert.trained import _default_out_indices
    from segmentation.model import default_out_indices

    assert all(_default_out_indices(d) == default_out_indices(d) for d in range(1, 41))


def test_segmentor_in_mmsegmentation(segmentor, tmp_path, capsys):
    pytest.importorskip("mmseg", reason="mmsegmentation is not installed")
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    model, args, ckpt = segmentor
    dst = tmp_path / "upernet_mmseg.pth"
    assert run([ckpt, "-o", dst, "--to", "mmseg"], capsys)[0] == 0
    overrides = torch.load(dst, weights_only=True)["meta"]["config_overrides"]
    register_all_modules()
    cfg = Config.fromfile(str(Path(__file__).parents[1] / "segmentation/configs/mmseg/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"))
    cfg.model.pretrained = None
    cfg.model.data_preprocessor = None
    for k, v in overrides.items():
        if k.startswith("model."):
            node, *path = k.split(".")[1:]
            target = cfg.model
            for p in [node, *path][:-1]:
                target = target[p]
            target[[node, *path][-1]] = tuple(v) if isinstance(v, list) and "size" in k else v
    bn = dict(type="BN", requires_grad=True)  # SyncBN needs a process group
    cfg.model.neck.norm_cfg = cfg.model.decode_head.norm_cfg = cfg.model.auxiliary_head.norm_cfg = bn
    net = MODELS.build(cfg.model).eval()
    load_checkpoint(net, str(dst), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        theirs = net.decode_head(net.neck(net.backbone(x)))
        theirs = nn.functional.interpolate(theirs, size=(32, 32), mode="bilinear", align_corners=False)
        assert (theirs - model(x)).abs().max() <= 1e-4


# ---- detection -> detectron2 ---------------------------------------------------------------------------------
SMALL = ["--model", "tiny", "--embed_dim", "64", "--depth", "2", "--num_heads", "2", "--patch_size", "16", "--input_size", "64",
         "--pretrain_img_size", "64", "--window_size", "2", "--global_blocks", "1", "--out_channels", "32", "--fc_dim", "64",
         "--anchor_sizes", "8", "16", "32", "64", "128", "--detections_per_img", "20", "--score_thresh", "0.0"]


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    from detection.train import build_model, get_parser

    torch.manual_seed(0)
    args = get_parser().parse_args(SMALL)
    args.num_classes, args.category_ids, args.category_names = 5, [10, 20, 30, 40, 50], CLASSES
    model = perturb(build_model(args, 5), 3)
    return model, args, save_like_trainer(model, args, tmp_path_factory.mktemp("det") / "ckpt.pth")


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


def test_detector_in_detectron2(detector, tmp_path, capsys):
    """detectron2's ViTDet Mask R-CNN, configured with the overrides the converter reports, loads every tensor by
    name (strict) and its backbone (trunk + simple feature pyramid) computes ours."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    model, args, ckpt = detector
    dst = tmp_path / "vitdet.pth"
    assert run([ckpt, "-o", dst, "--to", "detectron2"], capsys)[0] == 0
    saved = torch.load(dst, weights_only=True)
    cfg = model_zoo.get_config("common/models/mask_rcnn_vitdet.py")
    for k, v in saved["meta"]["config_overrides"].items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, tuple(v) if "topk" in k else v)
    net = instantiate(cfg.model).eval()
    net.load_state_dict(saved["model"], strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.backbone(model.transform(list(x))[0].tensors)
        theirs = net.backbone((x * 255 - net.pixel_mean) / net.pixel_std)
    for level in ("p2", "p3", "p4", "p5", "p6"):
        assert (ours[level] - theirs[level]).abs().max() <= 1e-4, level


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
