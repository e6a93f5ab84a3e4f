"""ADE20K UperNet: backbone equivalence, relative-position index, sliding window, metrics, data, CLI."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from maecore.convert import load_backbone
from maecore.models.layers import relative_position_index
from maecore.optim import param_groups
from pretrain.model import MaskedAutoencoderViT
from segmentation.data import ADE20K, IGNORE_INDEX, TrainTransform, encode_label, random_crop
from segmentation.evaluate import (
    confusion_matrix,
    evaluate_segmentation,
    metrics_from_confusion,
    predict,
    save_visual,
    slide_inference,
)
from segmentation.model import build_backbone, build_segmentor, default_out_indices
from segmentation.train import cli, main
from synthetic import make_world

TINY = dict(embed_dim=64, depth=4, num_heads=2)


def tiny_segmentor(crop: int = 32, classes: int = 7, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_segmentor("tiny", classes, crop, 8, kw.pop("drop_path_rate", 0.0), 16, 8, **TINY, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("segworld")
    return make_world(root, size=32, n_train=8, n_val=3, tasks=("ade",))["ade"]


# ---- model ---------------------------------------------------------------------------------------
def test_relative_position_index_matches_direct_computation():
    gh, gw = 2, 3
    idx = relative_position_index((gh, gw))
    num_rel = (2 * gh - 1) * (2 * gw - 1)
    coords = [(y, x) for y in range(gh) for x in range(gw)]
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            assert idx[1 + i, 1 + j] == (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
    assert idx[0, 0] == num_rel + 2
    assert (idx[0, 1:] == num_rel).all() and (idx[1:, 0] == num_rel + 1).all()
    # same offset -> same slot; every table row but none beyond is used
    assert idx[1 + 0, 1 + 4] == idx[1 + 1, 1 + 5]
    assert sorted(idx.unique().tolist()) == list(range(num_rel + 3))


def test_out_indices_proportional():
    assert default_out_indices(12) == (3, 5, 7, 11)
    assert default_out_indices(24) == (7, 11, 15, 23)
    assert default_out_indices(4) == (0, 1, 2, 3)


def test_backbone_with_zero_bias_and_unit_layer_scale_equals_pretrained_encoder():
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2,
                               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2).eval()
    bb = build_backbone("tiny", 32, 8, drop_path_rate=0.1, **TINY).eval()
    report = load_backbone(bb, mae.state_dict())
    assert any(k.startswith("decoder_") for k in report.dropped) and "norm.weight" in report.dropped
    assert any(k.endswith("relative_position_bias_table") for k in report.added)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t, grid, pp = mae.embed(x)
        _, ref = mae.run_blocks(mae.add_prefix(t, pp), grid, (0, 1, 2, 3))
        got = bb(x)
    assert bb.blocks[0].ls1.gamma.eq(1).all() and bb.blocks[0].attn.relative_position_bias_table.eq(0).all()
    for a, b in zip(got, ref):
        assert a.shape == (2, 64, 4, 4)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the tables are live: a non-zero bias changes the features
        bb.blocks[1].attn.relative_position_bias_table.normal_()
        assert not torch.allclose(bb(x)[-1], ref[-1], atol=1e-3)


def test_neck_strides_head_and_loss():
    m = tiny_segmentor()
    x = torch.randn(2, 3, 32, 32)
    feats = m.features(x)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]  # strides 2, 4, 8, 16 of a patch-8 grid of 4
    target = torch.full((2, 32, 32), IGNORE_INDEX)
    loss, logs = m(x, target)  # an all-ignore crop gives 0, not NaN
    assert torch.isfinite(loss) and loss.item() == 0.0
    target[:, :16] = 3
    loss, logs = m(x, target)
    assert loss.item() > 0 and set(logs) == {"loss_decode", "loss_aux", "pix_acc"}
    expect = logs["loss_decode"] + 0.4 * logs["loss_aux"]
    torch.testing.assert_close(loss.detach(), expect)


def test_layer_decay_scales():
    m = tiny_segmentor()
    groups = param_groups(m, 0.05, 0.65, layer_id=m.layer_id, num_layers=5,
                          no_weight_decay=("pos_embed", "cls_token", "relative_position_bias_table"))
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert math.isclose(scale["backbone.patch_embed.proj.weight"], 0.65**5)
    assert math.isclose(scale["backbone.blocks.0.attn.qkv.weight"], 0.65**4)
    assert math.isclose(scale["backbone.blocks.3.mlp.fc1.weight"], 0.65**1)
    assert scale["neck.upsample_4x.0.weight"] == 1.0 and scale["decode_head.conv_seg.weight"] == 1.0
    assert wd["backbone.blocks.2.attn.relative_position_bias_table"] == 0.0 and wd["backbone.pos_embed"] == 0.0
    assert wd["backbone.blocks.2.attn.qkv.weight"] == 0.05


# ---- inference and metrics ------------------------------------------------------------------------
def test_slide_inference_one_window_equals_plain_and_pads_small_crops():
    m = tiny_segmentor().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(m, x, 7, (32, 32), (21, 21)), m(x))
        wide = torch.randn(1, 3, 16, 72)  # shorter than the window, wider than it: padded, 4 columns
        out = slide_inference(m, wide, 7, (32, 32), (21, 21))
        assert out.shape == (1, 7, 16, 72) and torch.isfinite(out).all()
        # the first column is exactly the padded window's logits, cut back
        padded = torch.nn.functional.pad(wide[..., :32], (0, 0, 0, 16))
        torch.testing.assert_close(out[..., :21], m(padded)[..., :16, :21])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 90, 3), dtype=np.uint8))
    pred = predict(m, img, 7, (32, 32), scales=(0.5, 1.0), flip=True)
    assert pred.shape == (20, 90) and pred.max() < 7


def test_metrics_perfect_and_hand_computed():
    label = torch.tensor([[0, 1, 2], [2, 255, 1]])
    m = metrics_from_confusion(confusion_matrix(label.clamp(max=2), label, 3))
    assert m["mIoU"] == 1.0 and m["mAcc"] == 1.0 and m["aAcc"] == 1.0
    cm = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])  # class 2 absent: left out of the means
    m = metrics_from_confusion(cm)
    assert m["IoU"][0] == pytest.approx(3 / 6) and m["IoU"][1] == pytest.approx(4 / 7) and math.isnan(m["IoU"][2])
    assert m["mIoU"] == pytest.approx((3 / 6 + 4 / 7) / 2)
    assert m["mAcc"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["aAcc"] == pytest.approx(7 / 10)
    pred, lab = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 2]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 255])
    assert confusion_matrix(pred, lab, 3).tolist() == [[3, 2, 0], [1, 4, 0], [0, 0, 0]]



def test_visual_panels_are_enlarged_and_titled(tmp_path):
    """A 64-px sample: three panels enlarged 3x (192 px), under a white band that titles each panel (image / ground
    truth / prediction) in dark text centred over it."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    save_visual(image, rng.integers(0, 4, (64, 64)), rng.integers(0, 4, (64, 64)), 4, tmp_path / "v.png")
    out = np.asarray(Image.open(tmp_path / "v.png").convert("RGB")).astype(int)
    band = out.shape[0] - 192
    assert out.shape[1] == 3 * 192 and 20 <= band <= 60
    assert (out[band:, :192] == np.asarray(image).repeat(3, 0).repeat(3, 1)).all()
    ink = out[:band].sum(axis=2) < 200  # dark title pixels
    for i in range(3):
        cols = np.flatnonzero(ink[:, i * 192:(i + 1) * 192].any(axis=0))
        assert cols.size > 10 and abs((cols.min() + cols.max()) / 2 - 96) < 12  # a title, centred over its panel

# ---- data ---------------------------------------------------------------------------------------
def test_reduce_zero_label_and_out_of_range():
    raw = np.array([[0, 1, 7], [8, 255, 200]])
    lab, n_bad = encode_label(raw, 7, True)
    assert lab.tolist() == [[255, 0, 6], [255, 255, 255]] and n_bad == 2  # 8 and 200 are out of range


def test_train_transform_crop_pad_and_cat_max_ratio():
    import random

    random.seed(0)
    img = Image.fromarray(np.full((20, 30, 3), 128, np.uint8))
    lab = np.zeros((20, 30), np.int64)
    lab[:, 15:] = 1
    x, y = TrainTransform(48, scale=(80, 20), ratio_range=(1.0, 1.0))(img, lab)
    assert x.shape == (3, 48, 48) and y.shape == (48, 48)
    assert (y[20:] == IGNORE_INDEX).all() and (y[:, 30:] == IGNORE_INDEX).all() and (x[:, 20:] == 0).all()
    # cat_max_ratio: a crop dominated (> 75 %) by one class is re-drawn
    lab = np.zeros((10, 100), np.int64)
    lab[:, 50:] = 1
    for _ in range(20):
        _, c = random_crop(np.zeros((10, 100, 3)), lab, (10, 10), 0.75)
        assert 0.25 < (c == 1).mean() < 0.75 or len(np.unique(c)) == 1  # single-class only if 10 tries fail
    assert sum(len(np.unique(random_crop(np.zeros((10, 100, 3)), lab, (10, 10), 0.75)[1])) == 2 for _ in range(20)) > 0


def test_bad_inputs_are_skipped_and_counted(world, tmp_path, caplog):
    root = tmp_path / "ade"
    shutil.copytree(world, root)
    base = root / "ADEChallengeData2016"
    imgs, anns = base / "images" / "validation", base / "annotations" / "validation"
    shutil.copy(imgs / "ADE_val_00000001.jpg", imgs / "no_label.jpg")  # image without label file
    grey = Image.open(imgs / "ADE_val_00000002.jpg").convert("L")  # grey-scale image
    grey.save(imgs / "ADE_val_00000002.jpg")
    lab = np.array(Image.open(anns / "ADE_val_00000003.png"))
    lab[:4] = 42  # values beyond the 7 classes
    Image.fromarray(lab).save(anns / "ADE_val_00000003.png")
    Image.open(imgs / "ADE_val_00000001.jpg").save(anns / "ADE_val_00000001.png")  # colour "label" map
    ds = ADE20K(root, "val", 7)
    assert len(ds) == 3 and ds.num_unlabelled == 1 and "no label file" in caplog.text
    img, label, skipped, n_oor = ds[1]
    assert img.mode == "RGB" and skipped == 0
    _, label, skipped, n_oor = ds[0]  # the colour label is skipped, the next sample stands in
    assert skipped == 1 and "RGB image" in caplog.text
    _, label, skipped, n_oor = ds[2]
    assert n_oor == 4 * 32 and label.max() == IGNORE_INDEX and (label[:4] == IGNORE_INDEX).all()
    m = tiny_segmentor()
    res = evaluate_segmentation(m, ds, (32, 32))
    assert res["n_images"] == 2 and res["n_skipped"] == 2 and res["n_label_oor"] == 4 * 32
    assert 0 <= res["mIoU"] <= 100


# ---- training and evaluation through the CLI -------------------------------------------------------
def test_train_then_eval_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--recipe", "demo", "--data_path", str(world), "--output_dir", str(out), "--model", "tiny",
              "--embed_dim", "64", "--depth", "4", "--num_heads", "2", "--patch_size", "8", "--crop_size", "32",
              "--channels", "16", "--aux_channels", "8", "--num_workers", "0", "--no_progress"]
    summary = main(common + ["--batch_size", "4", "--max_iters", "4", "--warmup_iters", "2", "--eval_iters", "2",
                             "--log_every", "2", "--num_vis", "2"])
    assert summary["steps"] == 4 and summary["n_images"] == 3 and 0 <= summary["mIoU"] <= 100
    assert {"mAcc", "aAcc", "IoU_per_class"} <= set(summary) and len(summary["IoU_per_class"]) == 7
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in logs if r["type"] == "train"]
    assert len([r for r in logs if r["type"] == "eval"]) == 2 and all(math.isfinite(r["loss"]) for r in train)
    assert (out / "checkpoint-best.pth").exists() and len(list((out / "vis").glob("*.png"))) == 2
    for png in (out / "vis").glob("*.png"):  # 32-px panels enlarged 6x (nearest): 192 px high, three side by side
        w, h = Image.open(png).size  # under a band of titles
        assert w == 3 * 192 and 192 + 20 <= h <= 192 + 60
    res = main(common + ["--eval", "--resume", str(out / "checkpoint-last.pth"), "--output_dir", str(tmp_path / "ev")])
    assert res["mIoU"] == pytest.approx(summary["mIoU"]) and res["n_images"] == 3
    assert "mIoU" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_takes_model_flags_from_checkpoint_and_torchrun_gives_the_same_metrics(world, tmp_path, run_module):
    """``--eval --resume`` with only data/output flags (the default recipe is ViT-B, crop 512, 150 classes)
    builds the trained network from the checkpoint's args; one process and two (torchrun, gloo) sum the
    same confusion matrix, each of the 3 val images (an odd number) counted once."""
    out = tmp_path / "run"
    main(["--recipe", "demo", "--data_path", str(world), "--output_dir", str(out), "--model", "tiny", "--embed_dim", "64",
          "--depth", "4", "--num_heads", "2", "--patch_size", "8", "--crop_size", "32", "--channels", "16",
          "--aux_channels", "8", "--num_workers", "0", "--no_progress", "--batch_size", "4", "--max_iters", "2",
          "--warmup_iters", "0", "--num_vis", "0", "--eval_max_images", "1"])
    base = ["--eval", "--resume", out / "checkpoint-last.pth", "--data_path", world, "--num_workers", "0", "--no_progress"]
    one = run_module("segmentation", [*base, "--output_dir", tmp_path / "ev1"])
    two = run_module("segmentation", [*base, "--output_dir", tmp_path / "ev2"], nproc=2)
    for p in (one, two):
        lines = [x for x in p.stdout.splitlines() if x.startswith("model flags from")]
        assert len(lines) == 1, p.stdout  # printed once, by rank 0
        assert "depth=4" in lines[0] and "input_size=32" in lines[0] and "num_classes=7" in lines[0]
    r1, r2 = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("ev1", "ev2"))
    assert r1["n_images"] == r2["n_images"] == 3 and r1["n_skipped"] == r2["n_skipped"] == 0
    for k in ("mIoU", "mAcc", "aAcc", "IoU_per_class", "n_label_oor"):
        assert r1[k] == r2[k], k
    assert 0 < r1["aAcc"] <= 100 and len(r1["IoU_per_class"]) == 7
    assert len(list((tmp_path / "ev2" / "vis").glob("*.png"))) == 2  # rank 0's shard: images 0 and 2


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--recipe", "demo", "--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["--recipe", "demo", "--data_path", str(tmp_path), "--eval", "--output_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err


def test_shallow_backbone_feeds_four_levels():
    # depth 2: the default taps repeat a block (0, 1, 1, 1) rather than starve the 4-level neck
    from segmentation.model import build_segmentor, default_out_indices

    assert default_out_indices(2) == (0, 1, 1, 1)
    model = build_segmentor("tiny", num_classes=5, crop_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            channels=16, aux_channels=8).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    logits = logits[0] if isinstance(logits, tuple) else logits
    assert logits.shape[-2:] == (32, 32)
    with pytest.raises(ValueError, match="out_indices"):
        build_segmentor("tiny", num_classes=5, crop_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                        out_indices=(0, 1, 2, 3))
