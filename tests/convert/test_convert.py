"""tools/convert.py and maecore.convert: every path checked by numbers on tiny models (CPU, fp32).

Models: ViT 64-d x 2 blocks, 4 heads, patch 8, 32 px (4x4 grid); MAE decoder 32-d x 1 block.  All
parameters are perturbed away from their init so a swapped or dropped tensor cannot go unnoticed.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import pipeline.convert as CLI
from maecore.convert import convert, load_backbone, load_source, read_state
from maecore.errors import UserError
from maecore.models import VisionTransformer
from pretrain.model import MaskedAutoencoderViT
from tests import ROOT

TOL = 1e-5
VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
DEC = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in-process: (exit status, stdout, stderr)."""
    try:
        CLI.cli([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def perturb(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def patch_tokens_through(enc: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The pretrained encoder's blocks run on patch tokens only (no cls token), as ViTDet runs them;
    (B, D, H, W) after the last block."""
    t, grid, _ = enc.embed(x)
    for blk in enc.blocks:
        t = blk(t, grid, 0)
    return t.transpose(1, 2).reshape(t.shape[0], -1, *grid)


@pytest.fixture(scope="module")
def mae() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return perturb(MaskedAutoencoderViT(**VIT, **DEC), 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, mae) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    sd = mae.state_dict()
    enc = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    paths = {"full": d / "mae_full.pth", "enc": d / "mae_enc.pth", "ours": d / "checkpoint-last.pth"}
    torch.save({"model": sd}, paths["full"])
    torch.save({"model": enc}, paths["enc"])
    torch.save({"model": sd, "optimizer": {}, "epoch": 3,
                "args": {"model": "mae_vit_tiny_patch16", "decoder_num_heads": 4, "input_size": 32}}, paths["ours"])
    return paths


@pytest.fixture(scope="module")
def encoder(mae) -> VisionTransformer:
    """The MAE's encoder as a plain VisionTransformer (same weights)."""
    enc = VisionTransformer(**VIT)
    load_backbone(enc, {"model": mae.state_dict()})
    return enc.eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------
def test_timm_parity_both_directions(tmp_path, files, encoder, x, capsys):
    timm = pytest.importorskip("timm")
    dst = tmp_path / "timm.pth"
    code, out, _ = run([files["full"], "-o", dst, "--to", "timm"], capsys)
    assert code == 0 and "MAE decoder" in out
    sd = torch.load(dst, weights_only=True)
    tv = timm.models.VisionTransformer(**VIT, num_classes=0, global_pool="token").eval()
    tv.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert (tv.forward_features(x) - encoder.forward_features(x)).abs().max() <= TOL

    # timm -> ours: a (perturbed) timm model's bare state dict, detected as timm
    tv2 = perturb(timm.models.VisionTransformer(**VIT, num_classes=5, global_pool="token"), 2)
    src = tmp_path / "timm_src.pth"
    torch.save(tv2.state_dict(), src)
    assert load_source(src).fmt == "timm"
    ours = VisionTransformer(**VIT).eval()
    report = load_backbone(ours, src)
    assert "head.weight" in report.dropped and not report.added
    with torch.no_grad():
        assert (tv2.forward_features(x) - ours.forward_features(x)).abs().max() <= TOL


def test_timm_avg_pool_fc_norm_choice(tmp_path, files, encoder, x, capsys):
    timm = pytest.importorskip("timm")
    dst = tmp_path / "timm_avg.pth"
    code, out, _ = run([files["enc"], "-o", dst, "--to", "timm", "--pool", "avg", "--fc-norm", "copy"], capsys)
    assert code == 0 and "timm avg pooling has no final norm" in out
    sd = torch.load(dst, weights_only=True)
    assert "norm.weight" not in sd and torch.equal(sd["fc_norm.weight"], encoder.norm.weight)
    tv = timm.models.VisionTransformer(**VIT, num_classes=0, global_pool="avg").eval()
    tv.load_state_dict(sd, strict=True)
    with torch.no_grad():
        t, grid, pre = encoder.embed(x)
        tokens, _ = encoder.run_blocks(encoder.add_prefix(t, pre), grid)
        assert (tv.forward_features(x) - tokens).abs().max() <= TOL  # timm avg: no final norm
    # default --fc-norm reinit leaves fc_norm to timm and says so
    code, out, _ = run([files["enc"], "-o", tmp_path / "timm_avg2.pth", "--to", "timm", "--pool", "avg"], capsys)
    assert code == 0 and "re-initialises fc_norm" in out
    assert "fc_norm.weight" not in torch.load(tmp_path / "timm_avg2.pth", weights_only=True)


# --------------------------------------------------------------------------------------------------
# HF ViTMAE
# --------------------------------------------------------------------------------------------------
def test_hf_vitmae_loss_parity_and_bit_identical_round_trip(tmp_path, files, mae, x, capsys):
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    code, out, _ = run([files["full"], "-o", hf_dir, "--to", "hf", "--num-heads", "4", "--decoder-num-heads", "4"], capsys)
    assert code == 0, out
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["layer_norm_eps"] == 1e-6 and cfg["num_attention_heads"] == 4
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss, pred, mask = mae(x, 0.75, noise)
        o = hf(pixel_values=x, noise=noise)
    assert abs(loss.item() - o.loss.item()) <= TOL
    assert (pred - o.logits).abs().max() <= TOL and torch.equal(mask, o.mask)

    # ours -> HF -> ours is bit-identical (qkv split and concatenated back)
    back = tmp_path / "back.pth"
    code, _, _ = run([hf_dir, "-o", back, "--to", "official"], capsys)
    assert code == 0
    sd = torch.load(back, weights_only=True)["model"]
    ref = mae.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_hf_model_into_ours_and_encoder_only(tmp_path, files, encoder, x, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                    image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=4, decoder_intermediate_size=128, layer_norm_eps=1e-6)
    torch.manual_seed(4)
    hf = perturb(transformers.ViTMAEForPreTraining(cfg), 5)
    src = tmp_path / "hf_src"
    hf.save_pretrained(src)  # whatever layout this transformers version writes
    source = load_source(src)
    assert source.fmt == "hf" and source.hints["num_heads"] == 4
    ours = MaskedAutoencoderViT(**VIT, **DEC)
    dst = tmp_path / "from_hf.pth"
    code, _, _ = run([src, "-o", dst, "--to", "official"], capsys)
    assert code == 0
    ours.load_state_dict(torch.load(dst, weights_only=True)["model"], strict=True)
    ours.eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loss, pred, _ = ours(x, 0.75, noise)
        o = hf(pixel_values=x, noise=noise)
    assert abs(loss.item() - o.loss.item()) <= TOL and (pred - o.logits).abs().max() <= TOL

    # encoder-only release -> ViTMAEModel directory (no decoder) that HF loads completely
    enc_dir = tmp_path / "hf_enc"
    code, _, _ = run([files["enc"], "-o", enc_dir, "--to", "hf", "--num-heads", "4"], capsys)
    assert code == 0
    assert json.loads((enc_dir / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    m, info = transformers.ViTMAEModel.from_pretrained(enc_dir, output_loading_info=True, mask_ratio=0.0)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    noise = torch.arange(16.0).expand(2, 16)  # mask_ratio 0 with sorted noise keeps patch order
    with torch.no_grad():
        assert (m.eval()(pixel_values=x, noise=noise).last_hidden_state - encoder.forward_features(x)).abs().max() <= TOL


# --------------------------------------------------------------------------------------------------
# our task trunks: same features as the encoder when the extra parts are neutral
# --------------------------------------------------------------------------------------------------
def _detection_trunk(img_size: int = 32, window: int = 0, windowed=()) -> VisionTransformer:
    return VisionTransformer(**{**VIT, "img_size": img_size}, class_token=False, pos_embed_cls_slot=True, final_norm=False,
                             rel_pos="decomposed", window_size=window, window_block_indexes=windowed, out_indices=(1,)).eval()


def test_detection_trunk_same_features(tmp_path, files, encoder, x, capsys):
    dst = tmp_path / "det.pth"
    code, out, _ = run([files["full"], "-o", dst, "--to", "detection"], capsys)
    assert code == 0
    ck = torch.load(dst, weights_only=True)
    assert ck["meta"]["task"] == "detection" and ck["meta"]["format"] == "maecore-trunk"
    assert "cls_token" not in ck["model"] and ck["model"]["pos_embed"].shape == (1, 17, 64)  # cls slot kept
    ref = patch_tokens_through(encoder, x)
    for trunk in (_detection_trunk(), _detection_trunk(window=4, windowed=(0, 1))):  # global / one whole-grid window
        report = load_backbone(trunk, dst)
        assert any("rel_pos_h" in k for k in report.added) and not report.resampled
        with torch.no_grad():
            assert (trunk(x)[0] - ref).abs().max() <= TOL

    # a larger input: the file resampled once == the encoder resampling at run time (same bicubic)
    big = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(8))
    dst48 = tmp_path / "det48.pth"
    code, out, _ = run([files["full"], "-o", dst48, "--to", "detection", "--img-size", "48"], capsys)
    assert code == 0 and "(1, 17, 64) -> (1, 37, 64)" in out
    trunk = _detection_trunk(48)
    load_backbone(trunk, dst48)
    with torch.no_grad():
        assert (trunk(big)[0] - patch_tokens_through(encoder, big)).abs().max() <= TOL


def test_segmentation_trunk_same_features(tmp_path, files, encoder, x, capsys):
    dst = tmp_path / "seg.pth"
    code, _, _ = run([files["ours"], "-o", dst, "--to", "segmentation"], capsys)
    assert code == 0
    meta = torch.load(dst, weights_only=True)["meta"]
    assert meta["source_format"] == "ours" and meta["num_heads"] == 3  # from the recorded --model tiny
    trunk = VisionTransformer(**VIT, rel_pos="bias", init_values=1.0, final_norm=False, out_indices=(0, 1)).eval()
    report = load_backbone(trunk, dst)
    assert {"blocks.0.ls1.gamma", "blocks.1.attn.relative_position_bias_table"} <= set(report.added)
    ref_enc = VisionTransformer(**VIT, out_indices=(0, 1)).eval()
    ref_enc.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        for a, b in zip(trunk(x), ref_enc(x)):
            assert (a - b).abs().max() <= TOL


def test_classification_file_loads_both_pooling_modes(tmp_path, files, encoder, x, capsys):
    class Classifier(VisionTransformer):  # the classification layout: flat encoder keys + fc_norm + head
        def __init__(self, avg: bool) -> None:
            super().__init__(**VIT, final_norm=not avg)
            self.fc_norm = nn.LayerNorm(64, eps=1e-6) if avg else nn.Identity()
            self.head = nn.Linear(64, 5)

    dst = tmp_path / "cls.pth"
    code, _, _ = run([files["full"], "-o", dst, "--to", "classification"], capsys)
    assert code == 0
    avg, tok = Classifier(avg=True).eval(), Classifier(avg=False).eval()
    r_avg, r_tok = load_backbone(avg, dst), load_backbone(tok, dst)
    assert "norm.weight" in r_avg.dropped and "fc_norm.weight" in r_avg.added and "head.weight" in r_avg.added
    assert "norm.weight" in r_tok.converted
    with torch.no_grad():
        assert (tok.forward_features(x) - encoder.forward_features(x)).abs().max() <= TOL


# --------------------------------------------------------------------------------------------------
# detectron2 / mmdet / mmseg files against the documented key sets
# --------------------------------------------------------------------------------------------------
def _block_keys(prefix: str, subs: list[str], depth: int = 2) -> set[str]:
    return {f"{prefix}{i}.{s}.{wb}" for i in range(depth) for s in subs for wb in ("weight", "bias")}


# detectron2.modeling.backbone.vit.ViT (use_rel_pos=True) under SimpleFeaturePyramid.net
D2_KEYS = ({"backbone.net.pos_embed", "backbone.net.patch_embed.proj.weight", "backbone.net.patch_embed.proj.bias"}
           | _block_keys("backbone.net.blocks.", ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"])
           | {f"backbone.net.blocks.{i}.attn.rel_pos_{a}" for i in range(2) for a in "hw"})
# mmseg MAE backbone (BEiT layers, qkv with bias, layer scale, relative position bias tables)
MMSEG_KEYS = ({"cls_token", "pos_embed", "patch_embed.projection.weight", "patch_embed.projection.bias"}
              | _block_keys("layers.", ["ln1", "attn.qkv", "attn.proj", "ln2", "ffn.layers.0.0", "ffn.layers.1"])
              | {f"layers.{i}.{n}" for i in range(2) for n in ("gamma_1", "gamma_2", "attn.relative_position_bias_table")})


def test_detectron2_and_mmdet_files(tmp_path, files, encoder, x, capsys):
    pth, pkl = tmp_path / "vitdet.pth", tmp_path / "vitdet.pkl"
    code, out, _ = run([files["full"], "-o", pth, "--to", "detectron2"], capsys)
    assert code == 0 and "ViTDet runs without a cls token" in out and "rel_pos" in out
    ck = torch.load(pth, weights_only=True)
    assert set(ck) == {"model"} and "matching_heuristics" not in ck  # exact names: no heuristics needed
    new = {k for k in D2_KEYS if "rel_pos" in k}
    assert set(ck["model"]) == D2_KEYS - new
    assert ck["model"]["backbone.net.pos_embed"].shape == (1, 17, 64)  # pretraining grid + cls slot
    # the names are exactly our detection trunk's (ViTDet mirror): strict load with zero rel-pos
    trunk = _detection_trunk()
    trunk.load_state_dict({k.removeprefix("backbone.net."): v for k, v in ck["model"].items()}
                          | {k.removeprefix("backbone.net."): torch.zeros_like(trunk.state_dict()[k.removeprefix("backbone.net.")])
                             for k in new}, strict=True)
    with torch.no_grad():
        assert (trunk(x)[0] - patch_tokens_through(encoder, x)).abs().max() <= TOL

    code, _, _ = run([files["full"], "-o", pkl, "--to", "detectron2"], capsys)
    assert code == 0
    with open(pkl, "rb") as f:
        zoo = pickle.load(f, encoding="latin1")  # as DetectionCheckpointer reads model-zoo files
    assert set(zoo) == {"model", "__author__", "matching_heuristics"} and zoo["matching_heuristics"] is False
    assert all(torch.equal(torch.from_numpy(zoo["model"][k]), v) for k, v in ck["model"].items())
    assert load_source(pkl).fmt == "detectron2"  # read back through the arrays-only unpickler
    trunk = _detection_trunk()
    load_backbone(trunk, pkl)  # the task loader reads detectron2 names too
    with torch.no_grad():
        assert (trunk(x)[0] - patch_tokens_through(encoder, x)).abs().max() <= TOL

    mmdet = tmp_path / "mmdet.pth"
    code, _, _ = run([files["full"], "-o", mmdet, "--to", "mmdet"], capsys)
    ckm = torch.load(mmdet, weights_only=True)
    assert code == 0 and set(ckm) == {"model"}
    assert set(ckm["model"]) == {k.removeprefix("backbone.net.") for k in D2_KEYS - new}


def test_mmseg_file_and_back(tmp_path, files, encoder, x, capsys):
    dst = tmp_path / "mmseg.pth"
    code, out, _ = run([files["full"], "-o", dst, "--to", "mmseg"], capsys)
    assert code == 0 and "layers.*.ffn.layers.0.0" in out
    ck = torch.load(dst, weights_only=True)
    assert "state_dict" in ck  # what mmseg's MAE.init_weights unwraps
    new = {k for k in MMSEG_KEYS if "gamma" in k or "relative_position" in k}
    assert set(ck["state_dict"]) == MMSEG_KEYS - new
    # mmseg names read back into our segmentation trunk give the encoder's features
    trunk = VisionTransformer(**VIT, rel_pos="bias", init_values=1.0, final_norm=False, out_indices=(1,)).eval()
    load_backbone(trunk, dst)
    ref = VisionTransformer(**VIT, out_indices=(1,)).eval()
    ref.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert (trunk(x)[0] - ref(x)[0]).abs().max() <= TOL


def test_detectron2_instantiated(tmp_path, files, encoder, x, capsys):
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import ViT

    pth = tmp_path / "vitdet.pth"
    assert run([files["full"], "-o", pth, "--to", "detectron2"], capsys)[0] == 0
    net = ViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, window_size=0, window_block_indexes=[],
              use_rel_pos=True, pretrain_img_size=32, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), out_feature="last_feat")
    holder = nn.Module()
    holder.backbone = nn.Module()
    holder.backbone.net = net
    DetectionCheckpointer(holder).load(str(pth))
    with torch.no_grad():
        assert (net.eval()(x)["last_feat"] - patch_tokens_through(encoder, x)).abs().max() <= TOL


def test_mmseg_instantiated(tmp_path, files, encoder, x, capsys):
    pytest.importorskip("mmseg", reason="mmsegmentation is not installed")
    from mmseg.models.backbones import MAE

    dst = tmp_path / "mmseg.pth"
    assert run([files["full"], "-o", dst, "--to", "mmseg"], capsys)[0] == 0
    m = MAE(img_size=32, patch_size=8, embed_dims=64, num_layers=2, num_heads=4, init_values=1.0, out_indices=[1],
            norm_cfg=dict(type="LN", eps=1e-6), init_cfg=dict(type="Pretrained", checkpoint=str(dst)))
    m.init_weights()
    m.eval()  # mmseg's BEiT.train() returns None: m.eval()(x) would call None
    ref = VisionTransformer(**VIT, out_indices=(1,)).eval()
    ref.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert (m(x)[0] - ref(x)[0]).abs().max() <= TOL


# --------------------------------------------------------------------------------------------------
# refusals: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------------
def _one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_refuses_wrong_shapes_and_unknown_keys(tmp_path, mae, capsys):
    sd = {k: v for k, v in mae.state_dict().items()}
    bad = dict(sd, **{"blocks.1.attn.qkv.weight": torch.zeros(192, 32)})
    torch.save({"model": bad}, tmp_path / "bad_shape.pth")
    line = _one_error_line(*run([tmp_path / "bad_shape.pth", "-o", tmp_path / "o.pth", "--to", "timm"], capsys)[::2])
    assert "shape mismatch" in line and "blocks.1.attn.qkv.weight" in line
    torch.save({"model": dict(sd, **{"blocks.0.attn.gate.weight": torch.zeros(4)})}, tmp_path / "unknown.pth")
    line = _one_error_line(*run([tmp_path / "unknown.pth", "-o", tmp_path / "o.pth", "--to", "detectron2"], capsys)[::2])
    assert "unknown keys" in line and "blocks.0.attn.gate.weight" in line
    assert not (tmp_path / "o.pth").exists()
    # a trained relative-position table has no place in timm: refused, not dropped
    torch.save({"model": dict(sd, **{"blocks.0.attn.rel_pos_h": torch.ones(7, 16)})}, tmp_path / "relpos.pth")
    line = _one_error_line(*run([tmp_path / "relpos.pth", "-o", tmp_path / "o.pth", "--to", "timm"], capsys)[::2])
    assert "blocks.0.attn.rel_pos_h" in line
    # and the library call the tasks use refuses a model of another size by name
    with pytest.raises(UserError, match="shape mismatch"):
        load_backbone(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4), tmp_path / "bad_shape.pth")


def test_refuses_truncated_and_non_checkpoint_files(tmp_path, files, capsys):
    blob = files["full"].read_bytes()
    (tmp_path / "trunc.pth").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps({"model": {}})[:-3])
    for name in ("trunc.pth", "notes.pth", "trunc.pkl", "missing.pth"):
        _one_error_line(*run([tmp_path / name, "-o", tmp_path / "o.pth", "--to", "official"], capsys)[::2])
    # the message says what the file is, not torch's internals ("KeyError: 101" for a text file)
    assert "neither a torch zip archive, a pickle nor safetensors" in _one_error_line(
        *run([tmp_path / "notes.pth", "-o", tmp_path / "o.pth", "--to", "official"], capsys)[::2])
    assert "truncated or damaged zip archive" in _one_error_line(
        *run([tmp_path / "trunc.pth", "-o", tmp_path / "o.pth", "--to", "official"], capsys)[::2])
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "the file is empty" in _one_error_line(*run([tmp_path / "empty.pth", "-o", tmp_path / "o.pth", "--to", "official"], capsys)[::2])
    hf_like = tmp_path / "emptydir"
    hf_like.mkdir()
    _one_error_line(*run([hf_like, "-o", tmp_path / "o.pth", "--to", "official"], capsys)[::2])
    _one_error_line(*run([files["full"], "-o", tmp_path / "o.pth", "--to", "caffe"], capsys)[::2])  # bad flag
    _one_error_line(*run([files["full"], "-o", tmp_path / "o.pth", "--to", "timm", "--img-size", "x"], capsys)[::2])
    assert not (tmp_path / "o.pth").exists()


class _Payload:
    """Unpickling this would create ``marker``: the file must never appear."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_code_carrying_pickles(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": {"pos_embed": torch.zeros(1, 17, 64), "x": _Payload(marker)}}, tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"x": _Payload(marker)}, "__author__": "x"}, f)
    for name in ("evil.pth", "evil.pkl"):
        line = _one_error_line(*run([tmp_path / name, "-o", tmp_path / "o.pth", "--to", "official"], capsys)[::2])
        assert "refused" in line
        with pytest.raises(UserError):
            load_backbone(VisionTransformer(**VIT), tmp_path / name)
    assert not marker.exists() and not (tmp_path / "o.pth").exists()


def test_never_overwrites_without_force(tmp_path, files, capsys):
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"precious")
    line = _one_error_line(*run([files["enc"], "-o", dst, "--to", "official"], capsys)[::2])
    assert "--force" in line and dst.read_bytes() == b"precious"
    hf_dir = tmp_path / "hfdir"
    hf_dir.mkdir()
    (hf_dir / "keep.txt").write_text("x")
    _one_error_line(*run([files["enc"], "-o", hf_dir, "--to", "hf"], capsys)[::2])
    assert run([files["enc"], "-o", dst, "--to", "official", "--force"], capsys)[0] == 0
    assert set(torch.load(dst, weights_only=True)["model"]) == set(torch.load(files["enc"], weights_only=True)["model"])


# --------------------------------------------------------------------------------------------------
# sources: official training checkpoints, safetensors, the script itself
# --------------------------------------------------------------------------------------------------
def test_sources_official_training_ckpt_and_safetensors(tmp_path, mae, files, capsys):
    import argparse

    sd = mae.state_dict()
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny_patch16", norm_pix_loss=True)},
               tmp_path / "checkpoint-799.pth")  # the official main_pretrain.py layout
    src = load_source(tmp_path / "checkpoint-799.pth")
    assert src.hints["num_heads"] == 3 and src.hints["norm_pix_loss"] is True
    st = tmp_path / "mae.safetensors"
    assert run([files["full"], "-o", st, "--to", "safetensors"], capsys)[0] == 0
    back = read_state(st)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    conv = convert(load_source(st), "timm")
    assert "decoder_embed.weight" in conv.report.dropped and "pos_embed" in conv.state


def test_script_runs_from_repo_root(tmp_path, files):
    dst = tmp_path / "vitdet.pth"
    r = subprocess.run([sys.executable, "tools/convert.py", str(files["full"]), "-o", str(dst), "--to", "detectron2"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backbone.net.*" in r.stdout and "MAE decoder" in r.stdout and dst.exists()


def test_patch_size_resampling_for_vitdet_h(tmp_path, files, capsys):
    dst = tmp_path / "p16.pth"
    code, out, _ = run([files["enc"], "-o", dst, "--to", "detectron2", "--patch-size", "16"], capsys)
    assert code == 0 and "(64, 3, 8, 8) -> (64, 3, 16, 16)" in out and "(1, 17, 64) -> (1, 5, 64)" in out
    sd = torch.load(dst, weights_only=True)["model"]
    trunk = VisionTransformer(**{**VIT, "patch_size": 16}, class_token=False, pos_embed_cls_slot=True, final_norm=False)
    load_backbone(trunk, {"model": {k.removeprefix("backbone.net."): v for k, v in sd.items()}})
    code, _, err = run([files["full"], "-o", tmp_path / "x.pth", "--to", "official", "--patch-size", "16"], capsys)
    assert code == 2 and "decoder" in err


# --------------------------------------------------------------------------------------------------
# the format registry: one module per format, found by listing maecore/convert/formats/
# --------------------------------------------------------------------------------------------------
def test_every_format_name_has_a_record():
    from maecore.convert import SOURCES, TARGETS, registry

    reg = registry()
    assert len(TARGETS) == 10 and all(reg[n].is_target and reg[n].write for n in TARGETS)
    assert SOURCES[0] == "auto" and len(SOURCES) == 10 and all(reg[n].is_source for n in SOURCES[1:])
    assert set(reg) == set(TARGETS) | set(SOURCES[1:])  # no record the CLI cannot reach


def test_a_new_format_is_one_module(tmp_path, monkeypatch, files, capsys):
    from maecore.convert import formats

    (tmp_path / "toy.py").write_text(textwrap.dedent("""
        from maecore.checkpoint import save_atomic
        from maecore.convert.formats import Format


        def write(conv, source, dst, force):
            save_atomic({"toy": conv.state}, dst)
            return [dst]


        FORMATS = (Format("toy", order=99, keep=frozenset({"cls_token", "norm"}), write=write,
                          from_canonical=lambda state, arch: ({"toy." + k: v for k, v in state.items()},
                                                              {k: "toy." + k for k in state})),)
    """))
    monkeypatch.setattr(formats, "__path__", [*formats.__path__, str(tmp_path)])  # as if dropped into formats/
    formats.registry.cache_clear()
    try:
        assert formats.targets()[-1] == "toy"
        code, out, _ = run([files["full"], "-o", tmp_path / "toy.pth", "--to", "toy"], capsys)
        assert code == 0 and "-> toy.*" in out and "MAE decoder (pretraining only)" in out
        sd = torch.load(tmp_path / "toy.pth", weights_only=True)["toy"]
        assert {"toy.cls_token", "toy.norm.weight", "toy.blocks.1.mlp.fc2.bias"} <= set(sd)
        assert not any("decoder" in k or "mask_token" in k for k in sd)
    finally:
        monkeypatch.undo()
        formats.registry.cache_clear()
        sys.modules.pop("maecore.convert.formats.toy", None)
    assert "toy" not in formats.targets()


# --------------------------------------------------------------------------------------------------
# recipes for the other frameworks
# --------------------------------------------------------------------------------------------------
D2_RECIPES = ROOT / "detection" / "configs" / "detectron2"
MMSEG_RECIPE = ROOT / "segmentation" / "configs" / "mmseg" / "mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"


def _assignments(path: Path) -> dict[str, object]:
    """``a.b.c = <literal>`` lines of a LazyConfig, read without importing detectron2."""
    import ast

    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            try:
                out[ast.unparse(node.targets[0])] = ast.literal_eval(node.value)
            except ValueError:
                out[ast.unparse(node.targets[0])] = ast.unparse(node.value)
    return out


def test_recipes_point_at_converted_files_and_stay_out_of_the_packages():
    for d in (D2_RECIPES, MMSEG_RECIPE.parent):
        assert not (d / "__init__.py").exists() and not (d.parent / "__init__.py").exists()
    b, l_, h = (_assignments(D2_RECIPES / f"mask_rcnn_vitdet_{n}.py") for n in ("b_100ep", "l_100ep", "h_75ep"))
    for cfg in (b, l_, h):
        ckpt = cfg["train.init_checkpoint"]
        assert ckpt.endswith("_detectron2.pth") and "matching_heuristics" not in ckpt
    assert b["optimizer.lr"] == 1e-4 and b["optimizer.weight_decay"] == 0.1 and b["train.max_iter"] == 184375
    assert "lr_decay_rate=0.7" in b["optimizer.params.lr_factor_func"] and b["model.backbone.net.drop_path_rate"] == 0.1
    assert "lr_decay_rate=0.8" in l_["optimizer.params.lr_factor_func"] and l_["model.backbone.net.drop_path_rate"] == 0.4
    assert "lr_decay_rate=0.9" in h["optimizer.params.lr_factor_func"] and h["model.backbone.net.drop_path_rate"] == 0.5
    assert h["train.max_iter"] == "train.max_iter * 3 // 4"
    import runpy

    m = runpy.run_path(str(MMSEG_RECIPE))  # plain dicts: readable without mmseg
    assert m["model"]["pretrained"].endswith("_mmseg.pth") and m["model"]["backbone"]["init_values"] == 1.0
    assert m["model"]["neck"]["rescales"] == [4, 2, 1, 0.5] and m["model"]["auxiliary_head"]["loss_decode"]["loss_weight"] == 0.4
    ow = m["optim_wrapper"]
    assert ow["type"] == "AmpOptimWrapper" and ow["optimizer"]["lr"] == 1e-4 and ow["optimizer"]["weight_decay"] == 0.05
    assert ow["paramwise_cfg"] == dict(num_layers=12, layer_decay_rate=0.65) and m["train_cfg"]["max_iters"] == 160000
    assert m["data_preprocessor"]["test_cfg"]["size"] == (512, 512)


def test_detectron2_recipes_load():
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    from detectron2.config import LazyConfig

    for name, depth in (("b_100ep", 12), ("l_100ep", 24), ("h_75ep", 32)):
        cfg = LazyConfig.load(str(D2_RECIPES / f"mask_rcnn_vitdet_{name}.py"))
        assert cfg.model.backbone.net.depth == depth and "matching_heuristics" not in cfg.train.init_checkpoint
