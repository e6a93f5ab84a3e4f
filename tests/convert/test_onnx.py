"""``python -m pipeline.convert CKPT --to onnx``: the classifier, one segmentation window and the detection backbone
as ONNX graphs with a dynamic batch, run in onnxruntime against PyTorch (1e-4) on inputs of two batch sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pipeline.convert as CLI
from maecore.engine import dump_args

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'mae-toolkit[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("onnxscript", reason="onnxscript is not installed")

TOL = 1e-4


def run(argv: list, capsys) -> tuple[int, str, str]:
    try:
        CLI.cli([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def save(model, args, path: Path) -> Path:
    torch.save({"model": model.state_dict(), "optimizer": {}, "args": dump_args(args)}, path)
    return path


def check(path: Path, model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """The graph in onnxruntime = the PyTorch model, for two batch sizes (the batch axis is dynamic)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
        got = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref = model(x)
        refs = list(ref.values()) if isinstance(ref, dict) else [ref]
        assert len(got) == len(refs)
        for g, r in zip(got, refs):
            assert g.shape == tuple(r.shape) and (torch.from_numpy(g) - r).abs().max() <= TOL


def test_classifier_onnx(tmp_path, capsys):
    from classification.train import build_model, parse_config

    torch.manual_seed(0)
    cfg = parse_config(["--data_path", "-", "--model", "vit_tiny_patch16", "--patch_size", "8", "--embed_dim", "64", "--depth", "2",
                        "--num_heads", "4", "--input_size", "32"])
    model = perturbed(build_model(cfg, 3))
    saved = save(model, cfg.saved_args({"classes": ["a", "b", "c"]}), tmp_path / "c.pth")
    code, out, err = run([saved, "-o", tmp_path / "cls.onnx", "--to", "onnx"], capsys)
    assert code == 0, err
    assert "onnxruntime vs PyTorch" in out and "dynamic batch" in out
    check(tmp_path / "cls.onnx", model, (3, 32, 32))
    code, _, err = run([tmp_path / "c.pth", "-o", tmp_path / "cls.onnx", "--to", "onnx"], capsys)
    assert code == 2 and "--force" in err


def test_segmentation_window_onnx(tmp_path, capsys):
    from segmentation.train import build_model, parse_config

    torch.manual_seed(0)
    args = parse_config(["--recipe", "demo", "--data_path", "-", "--model", "tiny", "--embed_dim", "32", "--depth", "2",
                       "--num_heads", "2", "--patch_size", "8", "--input_size", "32", "--channels", "16", "--aux_channels", "8",
                       "--num_classes", "4"])
    model = build_model(args)
    with torch.no_grad():  # trained-looking relative position bias and BatchNorm statistics
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    model = perturbed(model)
    code, out, err = run([save(model, args.saved_args(), tmp_path / "s.pth"), "-o", tmp_path / "seg.onnx", "--to", "onnx"], capsys)
    assert code == 0, err
    assert "one window" in out
    check(tmp_path / "seg.onnx", model, (3, 32, 32))


def test_detection_backbone_onnx(tmp_path, capsys):
    from detection.train import build_model, parse_config

    torch.manual_seed(0)
    cfg = parse_config(["--model", "tiny", "--embed_dim", "64", "--depth", "2", "--num_heads", "2", "--patch_size", "16",
                        "--input_size", "64", "--pretrain_img_size", "64", "--window_size", "2", "--global_blocks", "1",
                        "--out_channels", "32", "--fc_dim", "64"])
    model = perturbed(build_model(cfg, 3))
    code, out, err = run([save(model, cfg.saved_args({"num_classes": 3}), tmp_path / "d.pth"), "-o", tmp_path / "det.onnx", "--to",
                          "onnx"], capsys)
    assert code == 0, err
    assert "p2..p6" in out
    check(tmp_path / "det.onnx", model.backbone, (3, 64, 64))


def test_onnx_refusals(tmp_path, capsys, monkeypatch):
    mae = tmp_path / "mae.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(8, 3, 8, 8), "decoder_embed.weight": torch.zeros(4, 8)}}, mae)
    code, _, err = run([mae, "-o", tmp_path / "x.onnx", "--to", "onnx"], capsys)
    assert code == 2 and "MAE pretraining checkpoint" in err and len(err.strip().splitlines()) == 1
    import maecore.convert.onnx_export as ox

    monkeypatch.setattr(ox, "_importable", lambda name: name != "onnxruntime")
    code, _, err = run([mae, "-o", tmp_path / "x.onnx", "--to", "onnx"], capsys)
    assert code == 2 and "mae-toolkit[onnx]" in err and not (tmp_path / "x.onnx").exists()
