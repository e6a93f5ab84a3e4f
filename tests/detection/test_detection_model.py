"""detection.model: the ViTDet trunk is the shared encoder, window partition round-trips, pyramid
strides/channels, detectron2 names, ViTDet layer decay, MAE weights load into backbone.net."""

from __future__ import annotations

import pytest
import torch

from detection.model import (
    LEVELS,
    build_detector,
    build_trunk,
    default_global_blocks,
    fpn_taps,
    layer_id_fn,
)
from maecore.models import VisionTransformer
from maecore.models.layers import window_partition, window_unpartition
from maecore.optim import param_groups

TINY = dict(arch="tiny", embed_dim=64, depth=4, num_heads=2)


def test_global_blocks_and_taps_follow_vitdet():
    assert default_global_blocks(12) == (2, 5, 8, 11)
    assert default_global_blocks(24) == (5, 11, 17, 23)
    assert default_global_blocks(32) == (7, 15, 23, 31)
    assert fpn_taps(12) == (2, 5, 8, 11) and fpn_taps(24) == (5, 11, 17, 23)


def test_trunk_with_global_attention_and_zero_rel_pos_equals_shared_encoder():
    torch.manual_seed(0)
    trunk = build_trunk(**TINY, patch_size=8, image_size=48, pretrain_img_size=32, window_size=0, drop_path_rate=0.0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, class_token=False,
                            pos_embed_cls_slot=True, final_norm=False, out_indices=(3,))
    # the encoder's weights (random, not init-default) into the trunk; rel-pos stays zero
    for p in enc.parameters():
        p.data.normal_(0, 0.05)
    missing, unexpected = trunk.load_state_dict(enc.state_dict(), strict=False)
    assert not unexpected and missing and all("rel_pos" in k for k in missing)
    assert all(float(trunk.get_parameter(k).detach().abs().sum()) == 0 for k in missing)
    x = torch.randn(2, 3, 48, 64)  # not the pretraining grid: both resample pos_embed bicubically
    trunk.eval(), enc.eval()
    with torch.no_grad():
        a, b = trunk(x)[-1], enc(x)[-1]
    assert a.shape == (2, 64, 6, 8)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the relative position is live: non-zero tables change the features
    with torch.no_grad():
        trunk.blocks[1].attn.rel_pos_h.normal_()
        assert (trunk(x)[-1] - b).abs().max() > 1e-3


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 10, 13, 8)
    win, padded = window_partition(x, 4)
    assert padded == (12, 16) and win.shape == (2 * 3 * 4, 16, 8)
    # zero padding sits at the bottom/right of the last windows
    grid = win.view(2, 3, 4, 4, 4, 8)
    assert float(grid[:, -1, :, 2:].abs().sum()) == 0 and float(grid[:, :, -1, :, 1:].abs().sum()) == 0
    torch.testing.assert_close(window_unpartition(win, 4, padded, (10, 13)), x, rtol=0, atol=0)


def test_rel_pos_sizes_and_detectron2_names():
    m = build_detector(7, **TINY, patch_size=16, image_size=128, pretrain_img_size=64, window_size=4, global_blocks=(1, 3))
    sd = m.state_dict()
    head_dim = 32
    assert sd["backbone.net.pos_embed"].shape == (1, 1 + 4 * 4, 64)  # pretraining grid with its cls slot
    assert sd["backbone.net.blocks.0.attn.rel_pos_h"].shape == (2 * 4 - 1, head_dim)  # window
    assert sd["backbone.net.blocks.3.attn.rel_pos_w"].shape == (2 * 8 - 1, head_dim)  # global 128/16 grid
    assert "backbone.net.cls_token" not in sd and "backbone.net.norm.weight" not in sd
    # SimpleFeaturePyramid layout of detectron2 (patch 16: simfp_2 .. simfp_5)
    for k in ("backbone.simfp_2.0.weight", "backbone.simfp_2.1.weight", "backbone.simfp_2.3.weight",
              "backbone.simfp_2.4.norm.weight", "backbone.simfp_2.5.weight", "backbone.simfp_3.0.weight",
              "backbone.simfp_3.2.norm.bias", "backbone.simfp_4.0.weight", "backbone.simfp_5.1.weight",
              "backbone.simfp_5.2.norm.weight"):
        assert k in sd, k
    assert sd["backbone.simfp_2.4.weight"].shape == (256, 16, 1, 1)  # dim/4 -> 256, LN over channels
    assert "backbone.simfp_2.4.bias" not in sd  # conv + norm has no bias (detectron2)
    assert m.rpn.head.conv[1] is not None  # 2-conv RPN
    assert len(m.roi_heads.box_head) == 7 and len(m.roi_heads.mask_head) == 4  # 4conv1fc / 4conv


@pytest.mark.parametrize("backbone", ["vitdet", "vitfpn"])
@pytest.mark.parametrize("patch", [8, 16])
def test_pyramid_strides_and_channels(backbone, patch):
    m = build_detector(7, backbone=backbone, **TINY, patch_size=patch, image_size=64, pretrain_img_size=64,
                       window_size=2, global_blocks=(1, 3), out_channels=32).eval()
    with torch.no_grad():
        feats = m.backbone(torch.randn(1, 3, 64, 96))
    assert list(feats) == list(LEVELS)
    strides = [patch // 4, patch // 2, patch, patch * 2, patch * 4]
    for (name, f), s in zip(feats.items(), strides):
        assert f.shape == (1, 32, -(-64 // s), -(-96 // s)), (name, f.shape)  # p6: stride-2 1x1 pool rounds up
    assert m.backbone.out_channels == 32


def test_vitdet_layer_decay_and_no_weight_decay():
    m = build_detector(7, **TINY, patch_size=16, image_size=64, pretrain_img_size=64, window_size=2, global_blocks=(3,))
    decay, depth = 0.7, 4
    groups = param_groups(m, 0.1, layer_decay=decay, layer_id=layer_id_fn(m), num_layers=depth + 1, no_weight_decay=m.no_weight_decay())
    where = {n: g for g in groups for n in g["names"]}
    assert where["backbone.net.pos_embed"]["lr_scale"] == pytest.approx(decay ** (depth + 1))
    assert where["backbone.net.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(decay ** (depth + 1))
    assert where["backbone.net.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(decay**depth)
    assert where["backbone.net.blocks.3.mlp.fc1.weight"]["lr_scale"] == pytest.approx(decay)
    for k in ("backbone.simfp_3.0.weight", "rpn.head.cls_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.weight"):
        assert where[k]["lr_scale"] == 1.0 and where[k]["weight_decay"] == 0.1
    # --wd_rule uniform: every 1-D parameter, pos_embed and rel_pos_h/w
    for k in ("backbone.net.pos_embed", "backbone.net.blocks.2.attn.rel_pos_h", "backbone.simfp_2.1.weight",
              "backbone.simfp_2.4.norm.weight", "backbone.net.blocks.0.norm1.weight"):
        assert where[k]["weight_decay"] == 0.0, k
    assert where["backbone.net.blocks.1.attn.qkv.weight"]["weight_decay"] == 0.1
    # ViTDet's own rule (--wd_rule official): pos_embed and the trunk's LayerNorms only; biases and rel_pos decay
    groups = param_groups(m, 0.1, layer_decay=decay, layer_id=layer_id_fn(m), num_layers=depth + 1,
                          no_weight_decay=m.vitdet_no_weight_decay(), decay_1d=True)
    exempt = {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}
    assert exempt == {"backbone.net.pos_embed"} | {f"backbone.net.blocks.{i}.norm{j}.{k}" for i in range(depth) for j in (1, 2)
                                                   for k in ("weight", "bias")}


def test_mae_checkpoint_loads_into_backbone_net(tmp_path):
    from maecore.checkpoint import save_atomic
    from maecore.convert import load_backbone

    mae = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, pos_embed="sincos")
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in mae.state_dict().items()}
    sd["decoder_embed.weight"] = torch.zeros(32, 64)
    sd["mask_token"] = torch.zeros(1, 1, 32)
    save_atomic({"model": sd, "epoch": 3}, tmp_path / "mae.pth")
    m = build_detector(7, **TINY, patch_size=16, image_size=128, pretrain_img_size=64, window_size=4, global_blocks=(3,))
    report = load_backbone(m.backbone.net, tmp_path / "mae.pth")
    assert {"cls_token", "norm.weight", "decoder_embed.weight", "mask_token"} <= set(report.dropped)
    net_sd = m.backbone.net.state_dict()
    torch.testing.assert_close(net_sd["pos_embed"], sd["pos_embed"])  # cls slot kept, same grid
    torch.testing.assert_close(net_sd["blocks.2.mlp.fc2.weight"], sd["blocks.2.mlp.fc2.weight"])
    assert float(net_sd["blocks.3.attn.rel_pos_h"].abs().sum()) == 0
