"""classification/: layer decay, LARS, partial fine-tuning, the three protocols end to end on the
synthetic ImageNet layout, evaluation (also under 2 processes), 448-px fine-tuning from 224."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed

from classification.data import LINPROBE_SCALE, build_datasets, eval_transform, linprobe_train, linprobe_transform
from classification.evaluate import knn_classify
from classification.lars import LARS
from classification.model import build_classifier, load_pretrained, setup_linear_probe, setup_partial_finetune
from classification.train import build_model, cli, main, parse_config, tuned_params
from maecore.checkpoint import load_file, save_atomic
from maecore.data.crop import FastRandomResizedCrop
from maecore.data.pixels import normalize_uint8
from maecore.data.sampler import SeededDataset
from maecore.engine import read_log
from maecore.models.pos_embed import get_2d_sincos_pos_embed
from maecore.optim import adamw, param_groups
from pretrain.model import build_mae
from synthetic import SHAPES, make_imagenet

SIZE, N_TRAIN, N_VAL = 32, 4, 2  # 28 train / 14 val images
TINY = ["--model", "vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", str(SIZE)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagenet(tmp_path_factory.mktemp("cls_world"), N_TRAIN, N_VAL, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A depth-2 MAE (decoder included) saved as the official release format {'model': sd}."""
    torch.manual_seed(0)
    m = build_mae("mae_vit_tiny_patch16", patch_size=8, img_size=SIZE, depth=2, decoder_depth=1, decoder_embed_dim=64,
                  decoder_num_heads=4)
    return save_atomic({"model": m.state_dict()}, tmp_path_factory.mktemp("mae") / "mae.pth")


def common(world: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, "--data_path", str(world), "--output_dir", str(out), "--batch_size", "8", "--num_workers", "0",
            "--no_progress", "--log_every", "1", "--seed", "0", *extra]


# --------------------------------------------------------------------------------------------------
# Layer decay, LARS
# --------------------------------------------------------------------------------------------------
def test_layer_decay_scales_vit_base() -> None:
    """Every ViT-B parameter's lr scale at 0.65 is the BEiT rule, written out independently here."""
    with torch.device("meta"):
        model = build_classifier("vit_base_patch16", 1000)
    groups = param_groups(model, 0.05, 0.65, model.layer_id, num_layers=model.depth + 1,
                          no_weight_decay=model.no_weight_decay())
    scales = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert set(scales) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            expect = 0.65**13
        elif name.startswith("blocks."):
            expect = 0.65 ** (12 - int(name.split(".")[1]))
        else:
            assert name.startswith(("fc_norm.", "head.")), name  # global pool: no final norm
            expect = 1.0
        assert math.isclose(scales[name], expect, rel_tol=1e-12), name
        assert wd[name] == (0.0 if p.ndim == 1 or name in ("cls_token", "pos_embed") else 0.05), name
    assert math.isclose(scales["patch_embed.proj.weight"], 0.65**13)
    assert math.isclose(scales["blocks.11.mlp.fc2.weight"], 0.65)


def test_lars_update_matches_formula() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(4))
    lr, wd, m, eta = 0.5, 0.1, 0.9, 0.001
    opt = LARS([w, b], lr=lr, weight_decay=wd, momentum=m, trust_coefficient=eta)
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    mu_w, mu_b = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for _ in range(3):
        gw, gb = torch.randn(3, 4), torch.randn(4)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        u = gw + wd * w_ref
        u = u * (eta * w_ref.norm() / u.norm())
        mu_w = m * mu_w + u
        w_ref = w_ref - lr * mu_w
        mu_b = m * mu_b + gb  # 1-D: no weight decay, no trust ratio
        b_ref = b_ref - lr * mu_b
        torch.testing.assert_close(w.detach(), w_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.detach(), b_ref, rtol=1e-6, atol=1e-7)
    # timm's Lars is a different optimizer for the probe (wd 0): no trust ratio unless always_adapt, and
    # then it also adapts 1-D parameters — the reason classification/lars.py exists
    from timm.optim import Lars

    g = torch.randn(3, 4)
    ours, theirs = nn.Parameter(torch.ones(3, 4)), nn.Parameter(torch.ones(3, 4))
    ours.grad, theirs.grad = g.clone(), g.clone()
    LARS([ours], lr=1.0, weight_decay=0.0).step()
    Lars([theirs], lr=1.0, momentum=0.9, weight_decay=0.0).step()
    torch.testing.assert_close(ours.detach(), 1 - g * (eta * ours.new_ones(3, 4).norm() / g.norm()))
    assert not torch.allclose(ours, theirs)
    # zero weights: the trust ratio falls back to 1
    z = nn.Parameter(torch.zeros(2, 2))
    z.grad = torch.ones(2, 2)
    LARS([z], lr=1.0, momentum=0.0).step()
    assert torch.equal(z.detach(), -torch.ones(2, 2))


# --------------------------------------------------------------------------------------------------
# Partial fine-tuning / linear probe: exactly the intended parameters move
# --------------------------------------------------------------------------------------------------
def _tiny(depth: int = 3, **kw):
    torch.manual_seed(0)
    return build_classifier("vit_tiny_patch16", 7, img_size=SIZE, patch_size=8, depth=depth, embed_dim=64, num_heads=2, **kw)


def _step_and_diff(model) -> set[str]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05, 0.75, model.layer_id, num_layers=model.depth + 1, no_weight_decay=model.no_weight_decay())
    opt = adamw(groups, 1e-2, (0.9, 0.999), torch.device("cpu"))
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, SIZE, SIZE)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return changed


@pytest.mark.parametrize("k", [0.5, 1, 2, 3, 0])
@pytest.mark.parametrize("global_pool", [True, False])
def test_partial_finetune_trains_exactly_the_last_blocks(k: float, global_pool: bool) -> None:
    model = _tiny(global_pool=global_pool, drop_path_rate=0.1)
    names = [n for n, _ in model.named_parameters()]
    n_tuned = setup_partial_finetune(model, k)
    final = ("fc_norm.", "head.") if global_pool else ("norm.", "head.")
    if k == 0.5:
        expect = {n for n in names if n.startswith(("blocks.2.norm2.", "blocks.2.mlp.", *final))}
    elif k == 3:
        expect = set(names)
    else:
        blocks = tuple(f"blocks.{i}." for i in range(3 - int(k), 3))
        expect = {n for n in names if n.startswith(blocks + final)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expect
    assert n_tuned == sum(p.numel() for n, p in model.named_parameters() if n in expect)
    assert _step_and_diff(model) == expect  # the rest is bit-identical
    if 0 < k < 3:  # frozen blocks run as fixed feature extractors (no drop path)
        assert not model.blocks[0].training and model.blocks[-1].training


def test_partial_rejects_bad_k() -> None:
    from maecore.errors import UserError

    for k in (-1, 0.25, 4, 1.5):
        with pytest.raises(UserError, match="tune_blocks"):
            setup_partial_finetune(_tiny(), k)


def test_linear_probe_head_and_pooling(mae_ckpt: Path) -> None:
    # cls token after the encoder's pretrained final norm, BN(affine=False) + linear, only the linear tunes
    model = build_classifier("vit_tiny_patch16", 7, img_size=SIZE, patch_size=8, depth=2, global_pool=False)
    load_pretrained(model, mae_ckpt)
    setup_linear_probe(model)
    bn, lin = model.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}
    assert 0.005 < lin.weight.std().item() < 0.015 and torch.all(lin.bias == 0)
    sd = load_file(mae_ckpt)["model"]
    assert torch.equal(model.norm.weight, sd["norm.weight"])
    assert _step_and_diff(model) == {"head.1.weight", "head.1.bias"}
    # average pooling for the probe: no (untrained) fc_norm in front of the head, the pretrained norm stays
    avg = build_classifier("vit_tiny_patch16", 7, img_size=SIZE, patch_size=8, depth=2, global_pool=True, fc_norm=False)
    load_pretrained(avg, mae_ckpt)
    assert not any(n.startswith("fc_norm") for n, _ in avg.named_parameters())
    assert torch.equal(avg.norm.bias, sd["norm.bias"])
    x = torch.randn(2, 3, SIZE, SIZE)
    avg.eval()
    with torch.no_grad():
        tokens = avg.run_blocks(avg.add_prefix(*avg.embed(x)[::2]), (4, 4))[0]
        torch.testing.assert_close(avg.forward_head(avg.forward_features(x), pre_logits=True), avg.norm(tokens)[:, 1:].mean(1))


def test_finetune_448_from_224_checkpoint(tmp_path: Path) -> None:
    """pos_embed: frozen sin-cos 14x14 table -> learned 28x28 parameter, resampled bicubically."""
    mae = build_mae("mae_vit_tiny_patch16", depth=1, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=4)
    path = save_atomic({"model": mae.state_dict()}, tmp_path / "mae224.pth")
    model = build_classifier("vit_tiny_patch16", 7, img_size=448, depth=1)
    report = load_pretrained(model, path)
    assert report.resampled["pos_embed"] == ((1, 197, 192), (1, 785, 192))
    assert model.pos_embed.requires_grad and model.grid_size == (28, 28)
    table = torch.from_numpy(get_2d_sincos_pos_embed(192, 14, cls_token=True)).float()[None]
    torch.testing.assert_close(model.pos_embed.detach(), resample_abs_pos_embed(table, [28, 28], [14, 14], num_prefix_tokens=1,
                                                                                 antialias=False))
    assert torch.equal(model.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 448, 448)).shape == (1, 7)


# --------------------------------------------------------------------------------------------------
# The CLI, end to end
# --------------------------------------------------------------------------------------------------
def _check_run(out: Path, summary: dict) -> None:
    assert 0.0 <= summary["acc1"] <= 100.0 and summary["acc1"] <= summary["acc5"]
    assert summary["n_images"] == len(SHAPES) * N_VAL
    evals = read_log(out, "eval")
    assert evals and evals[-1]["acc1"] == summary["acc1"]
    assert read_log(out, "train")
    for f in ("checkpoint-last.pth", "checkpoint-best.pth", "confusion_matrix.png", "args.json"):
        assert (out / f).is_file(), f
    counts = json.loads((out / "confusion_matrix.json").read_text())["counts"]
    assert sum(map(sum, counts)) == summary["n_images"]
    assert 100.0 * sum(counts[i][i] for i in range(len(counts))) / summary["n_images"] == pytest.approx(summary["acc1"])


def _manual_accuracy(model, world: Path) -> float:
    """Top-1 from scratch: every val image through the eval transform, one by one."""
    from maecore.data.images import list_images, load_rgb

    tf = eval_transform(SIZE)
    model.eval()
    correct = total = 0
    classes = sorted(p.name for p in (world / "train").iterdir())
    for label, name in enumerate(classes):
        for f in list_images(world / "val" / name):
            with torch.no_grad():
                pred = model(tf(load_rgb(f))[None]).argmax(1).item()
            correct += pred == label
            total += 1
    return 100.0 * correct / total


def test_finetune_cli_and_eval(world: Path, mae_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    # the recipe's defaults: mixup 0.8 / cutmix 1.0 / smoothing 0.1 / RandAugment / random erasing / layer decay
    summary = main(common(world, out, "--finetune", str(mae_ckpt), "--epochs", "1", "--blr", "5e-3", "--model_ema",
                          "--model_ema_decay", "0.9"))
    _check_run(out, summary)
    args = json.loads((out / "args.json").read_text())
    assert args["mixup"] == 0.8 and args["cutmix"] == 1.0 and args["aa"] == "rand-m9-mstd0.5-inc1" and args["layer_decay"] == 0.75
    assert "acc1_ema" in read_log(out, "eval")[-1]
    # --eval on the last checkpoint gives the same numbers, which an image-by-image count confirms; the model
    # flags (ViT-tiny/8, depth 2, 32 px) come from the checkpoint, only data/output flags are given
    res = main(["--data_path", str(world), "--output_dir", str(tmp_path / "ev"), "--batch_size", "8", "--num_workers", "0",
                "--eval", "--resume", str(out / "checkpoint-last.pth")])
    assert res["acc1"] == pytest.approx(summary["acc1"]) and res["loss"] == pytest.approx(summary["loss"], rel=1e-5)
    model = build_classifier("vit_tiny_patch16", 7, img_size=SIZE, patch_size=8, depth=2)
    model.load_state_dict(load_file(out / "checkpoint-last.pth")["model"])
    assert _manual_accuracy(model, world) == pytest.approx(res["acc1"])
    assert (tmp_path / "ev" / "confusion_matrix.png").stat().st_size > 1000


def test_linprobe_cli(world: Path, mae_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "lp"
    summary = main(common(world, out, "--protocol", "linprobe", "--finetune", str(mae_ckpt), "--epochs", "1"))
    _check_run(out, summary)
    ck = load_file(out / "checkpoint-last.pth")
    enc = load_file(mae_ckpt)["model"]
    assert torch.equal(ck["model"]["blocks.1.mlp.fc1.weight"], enc["blocks.1.mlp.fc1.weight"])  # frozen
    assert "head.0.running_mean" in ck["model"] and "mu" in str(ck["optimizer"]["state"])  # BN head, LARS state
    assert ck["args"]["decode"] == "fast"  # the probe's default


def test_linprobe_decode_fast_trains_as_official(world: Path, mae_ckpt: Path, tmp_path: Path, capsys) -> None:
    """--decode fast (uint8 crops, normalised on the device by the trainer's device_batch hook) against --decode
    official (linprobe_transform in the workers): the same boxes, flips and labels under the sampler's seeds, so
    the same losses up to the resize's rounding; the choice is printed and saved in args.json."""
    losses = {}
    for decode in ("fast", "official"):
        out = tmp_path / decode
        main(common(world, out, "--protocol", "linprobe", "--finetune", str(mae_ckpt), "--epochs", "1", "--max_steps", "2",
                    "--decode", decode))
        assert f"training images: --decode {decode}" in capsys.readouterr().out
        assert json.loads((out / "args.json").read_text())["decode"] == decode
        losses[decode] = [r["loss"] for r in read_log(out, "train")]
    assert len(losses["fast"]) == 2 and losses["fast"] == pytest.approx(losses["official"], rel=2e-3)
    # it changes the training pixels: a resume keeps it unless --resume_override decode
    resume = common(world, tmp_path / "official", "--protocol", "linprobe", "--finetune", str(mae_ckpt), "--epochs", "1",
                    "--max_steps", "2", "--resume", "auto")
    assert "decode official -> fast" in _cli_error(resume, capsys)


def test_linprobe_fast_samples_are_the_official_ones(world: Path) -> None:
    """The probe's train split through linprobe_train: official = linprobe_transform (torchvision's default scale
    0.08-1, as main_linprobe); fast = uint8 crops with the same (image, label, skipped) order.  With Pillow's resize
    the normalised pixels are bitwise linprobe_transform's (same boxes, flips); the default torch resize within 1/255
    on most pixels."""
    tf, dec = linprobe_train(SIZE, "official")
    assert dec is None and tf.transforms[0].scale == LINPROBE_SCALE == (0.08, 1.0)
    tf, dec = linprobe_train(SIZE, "fast")
    assert tf is None and isinstance(dec, FastRandomResizedCrop) and dec.scale == LINPROBE_SCALE
    off = SeededDataset(build_datasets(world, linprobe_transform(SIZE), None)[0])
    pil = SeededDataset(build_datasets(world, None, None, train_decoder=FastRandomResizedCrop(SIZE, LINPROBE_SCALE, resize="pil"))[0])
    fast = SeededDataset(build_datasets(world, None, None, train_decoder=dec)[0])
    for i in range(len(off)):
        a, b, c = off[(i, 31 * i + 7)], pil[(i, 31 * i + 7)], fast[(i, 31 * i + 7)]
        assert a[1:] == b[1:] == c[1:] and b[0].dtype == c[0].dtype == torch.uint8
        assert torch.equal(normalize_uint8(b[0], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), a[0])
        assert (c[0].float() - b[0].float()).abs().le(1).float().mean() > 0.9


def test_linprobe_cached_features_and_knn(world: Path, mae_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "lpc"
    summary = main(common(world, out, "--protocol", "linprobe", "--finetune", str(mae_ckpt), "--epochs", "3",
                          "--cache_features", "--knn", "--knn_k", "5", "--blr", "1.0"))
    _check_run(out, summary)
    assert 0.0 <= summary["knn_acc1"] <= 100.0
    assert json.loads((out / "args.json").read_text())["decode"] is None  # centre-crop features: no --decode
    # the checkpoint is a whole classifier: --eval on images gives the accuracy measured on cached features
    res = main(common(world, tmp_path / "ev", "--eval", "--resume", str(out / "checkpoint-last.pth"), "--protocol", "linprobe"))
    assert res["acc1"] == pytest.approx(summary["acc1"])


def test_partial_cli(world: Path, mae_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pt"
    summary = main(common(world, out, "--protocol", "partial", "--tune_blocks", "0.5", "--finetune", str(mae_ckpt),
                          "--epochs", "1", "--mixup", "0", "--cutmix", "0"))
    _check_run(out, summary)
    ck = load_file(out / "checkpoint-last.pth")["model"]
    enc = load_file(mae_ckpt)["model"]
    assert torch.equal(ck["blocks.1.attn.qkv.weight"], enc["blocks.1.attn.qkv.weight"])
    assert not torch.equal(ck["blocks.1.mlp.fc2.weight"], enc["blocks.1.mlp.fc2.weight"])
    n_mlp = sum(v.numel() for k, v in ck.items() if k.startswith(("blocks.1.norm2", "blocks.1.mlp", "fc_norm", "head")))
    assert summary["tuned_params"] == n_mlp


def test_pretrain_cli_checkpoint_accepted(world: Path, tmp_path: Path) -> None:
    """The pretraining CLI's own checkpoint ({'model', 'optimizer', …, 'args'}) goes straight into --finetune;
    an encoder-only export (decoder dropped, as official releases) goes through the converter too."""
    from maecore.convert import load_backbone
    from pretrain.train import main as pretrain_main

    pretrain_main(["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--input_size", str(SIZE), "--decoder_depth", "1",
                   "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--epochs", "1",
                   "--max_steps", "1", "--num_workers", "0", "--no_progress", "--vis_every", "0", "--data_path", str(world),
                   "--output_dir", str(tmp_path / "pre")])
    ckpt = tmp_path / "pre" / "checkpoint-last.pth"
    sd = load_file(ckpt)["model"]
    # what `--finetune CKPT` does (training itself is covered by the tests above, on depth-2 models)
    args = parse_config(["--model", "vit_tiny_patch16", "--patch_size", "8", "--input_size", str(SIZE), "--data_path", str(world),
                       "--finetune", str(ckpt)])
    model = build_model(args, 7)
    assert tuned_params(model) == sum(p.numel() for p in model.parameters())
    assert torch.equal(model.blocks[11].mlp.fc2.weight, sd["blocks.11.mlp.fc2.weight"])
    assert torch.equal(model.pos_embed, sd["pos_embed"]) and model.pos_embed.requires_grad  # sin-cos -> learned
    assert model.head.weight.std().item() < 1e-4 and torch.all(model.fc_norm.weight == 1)
    # an encoder-only export (decoder dropped, as the official releases) through the converter
    encoder_only = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    other = build_classifier("vit_tiny_patch16", 7, img_size=SIZE, patch_size=8, global_pool=False)
    report = load_backbone(other, {"model": encoder_only})
    assert not report.dropped and set(report.added) == {"head.weight", "head.bias"}
    assert torch.equal(other.norm.weight, sd["norm.weight"])


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def _cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_cli_errors(world: Path, tmp_path: Path, capsys) -> None:
    assert "not found" in _cli_error(common(tmp_path / "nope", tmp_path / "o"), capsys)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert "bad.pth" in _cli_error(common(world, tmp_path / "o", "--finetune", str(bad)), capsys)
    assert "--tune_blocks" in _cli_error(common(world, tmp_path / "o", "--protocol", "partial"), capsys)
    assert "--num_classes 3" in _cli_error(common(world, tmp_path / "o", "--nb_classes", "3"), capsys)
    assert "--resume" in _cli_error(common(world, tmp_path / "o", "--eval"), capsys)
    wrong = save_atomic({"model": build_mae("mae_vit_tiny_patch16", patch_size=8, img_size=SIZE, depth=3, decoder_depth=1,
                                            decoder_embed_dim=64, decoder_num_heads=4).state_dict()}, tmp_path / "d3.pth")
    assert "unknown keys" in _cli_error(common(world, tmp_path / "o", "--finetune", str(wrong)), capsys)
    # --decode: a choice of argparse; only the probe's augmented training images have one; gpu needs CUDA
    assert "invalid choice: 'jpeg'" in _cli_error(common(world, tmp_path / "o", "--protocol", "linprobe", "--decode", "jpeg"), capsys)
    assert "RandAugment" in _cli_error(common(world, tmp_path / "o", "--decode", "fast"), capsys)
    assert "centre-crop" in _cli_error(common(world, tmp_path / "o", "--protocol", "linprobe", "--cache_features", "--decode", "fast"),
                                       capsys)
    if not torch.cuda.is_available():
        assert "CUDA" in _cli_error(common(world, tmp_path / "o", "--protocol", "linprobe", "--decode", "gpu"), capsys)
    odd = common(world, tmp_path / "o", "--batch_size", "7")
    assert "even" in _cli_error(odd, capsys)
    # a val class the training set does not have
    (world.parent / "odd").mkdir()
    import shutil

    shutil.copytree(world, world.parent / "odd" / "in")
    shutil.copytree(world / "val" / "star", world.parent / "odd" / "in" / "val" / "zebra")
    assert "zebra" in _cli_error(common(world.parent / "odd" / "in", tmp_path / "o"), capsys)


def test_knn_classify_votes() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = knn_classify(train, labels, torch.tensor([[1.0, 0.05], [0.1, 1.0]]), num_classes=2, k=2, temperature=0.07)
    assert scores.argmax(1).tolist() == [0, 1]
    # weights exp(cos / T) of the k nearest, summed per class
    cos = torch.nn.functional.normalize(torch.tensor([[0.1, 1.0]]), dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    top = cos[0].topk(2)
    expect = torch.zeros(2).index_add_(0, labels[top.indices], (top.values / 0.07).exp())
    torch.testing.assert_close(scores[1], expect)


def test_val_reindexed_to_train_classes(world: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "sub"
    shutil.copytree(world, root)
    shutil.rmtree(root / "val" / "circle")  # val lacks the first class: indices must not shift
    train, val, classes = build_datasets(root, None, None)
    assert classes == train.classes and len(classes) == 7
    assert {classes[t] for _, t in val.samples} == set(classes) - {"circle"}
    assert all(classes[t] == p.parent.name for p, t in val.samples)


@pytest.mark.parametrize("fmt", ["classification", "timm", "safetensors"])
def test_converter_outputs_accepted(mae_ckpt: Path, world: Path, tmp_path: Path, fmt: str) -> None:
    """tools/convert.py exports (our task format, timm, safetensors) load through --finetune."""
    import pipeline.convert as tool

    dst = tmp_path / ("enc.safetensors" if fmt == "safetensors" else "enc.pth")
    tool.main([str(mae_ckpt), "-o", str(dst), "--to", fmt])
    model = build_model(parse_config([*TINY, "--data_path", str(world), "--finetune", str(dst)]), 7)
    sd = load_file(mae_ckpt)["model"]
    for k in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "cls_token"):
        assert torch.equal(model.state_dict()[k], sd[k]), k
    torch.testing.assert_close(model.pos_embed.detach(), sd["pos_embed"])
    assert model.head.weight.abs().max().item() < 1e-3  # fresh head whatever the file carried


def test_recipes_match_reference(world: Path) -> None:
    """FINETUNE.md / LINPROBE.md numbers (REFERENCE.md); flags given on the command line win."""
    d = ["--data_path", str(world)]
    for name, (model, blr, ld, dp, ep) in {"finetune_vit_base": ("vit_base_patch16", 5e-4, 0.65, 0.1, 100),
                                           "finetune_vit_large": ("vit_large_patch16", 1e-3, 0.75, 0.2, 50),
                                           "finetune_vit_huge": ("vit_huge_patch14", 1e-3, 0.75, 0.3, 50)}.items():
        a = parse_config(["--recipe", name, *d])
        assert (a.protocol, a.model, a.blr, a.layer_decay, a.drop_path, a.epochs) == ("finetune", model, blr, ld, dp, ep)
        assert (a.weight_decay, a.min_lr, a.warmup_epochs, a.mixup, a.cutmix, a.smoothing, a.reprob) == (0.05, 1e-6, 5, 0.8, 1.0, 0.1, 0.25)
        assert a.aa == "rand-m9-mstd0.5-inc1" and a.global_pool
    a = parse_config(["--recipe", "linprobe", *d])
    got = (a.protocol, a.blr, a.weight_decay, a.warmup_epochs, a.epochs, a.global_pool, a.mixup)
    assert got == ("linprobe", 0.1, 0.0, 10, 90, False, 0.0)
    a = parse_config(["--recipe", "finetune_vit_base", "--blr", "1e-4", "--cls_token", *d])
    assert a.blr == 1e-4 and a.global_pool is False and a.layer_decay == 0.65
    assert parse_config(["--protocol", "partial", "--tune_blocks", "0.5", *d]).tune_blocks == 0.5


def test_randaugment_posterize_survives_magnitude_10() -> None:
    """rand-m9-mstd0.5-inc1 sometimes draws magnitude 10 = keep 0 bits, which Pillow >= 11 rejects."""
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from classification.data import finetune_transform

    ra = next(t for t in finetune_transform(SIZE).transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.fromarray(np.full((SIZE, SIZE, 3), 200, dtype=np.uint8))
    assert np.asarray(op(img)).max() == 0  # 0 bits kept: black, as older Pillow made it


@pytest.mark.parametrize("argv,std", [([], 2e-5), (["--protocol", "linprobe"], 0.01), (["--head_init_std", "0.003"], 0.003),
                                      (["--protocol", "linprobe", "--head_init_std", "0.02"], 0.02)])
def test_head_init_std_flag(argv: list[str], std: float) -> None:
    """The official head inits by default (2e-5 fine-tuning, 0.01 probe); --head_init_std overrides both."""
    from classification.train import build_model, parse_config

    args = parse_config(["--data_path", "x", "--model", "vit_tiny_patch16", "--depth", "1", "--input_size", "32", *argv])
    model = build_model(args, 5)
    lin = model.head[-1] if isinstance(model.head, nn.Sequential) else model.head
    assert model.head_init_std == std
    assert abs(lin.weight.std().item() - std) < 0.2 * std
