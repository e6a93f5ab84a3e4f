"""The benchmark (tools/benchmark.py = pipeline.benchmark over maecore.benchmark and pretrain.benchmark)
runs end to end on a tiny model and writes the documented JSON fields.

No timed assertions: timings on a shared CPU are noise; these tests check the harness, the FLOP
counts, the explicit-attention baseline path and the error handling."""

from __future__ import annotations

import json

import pytest
import torch

from maecore.benchmark import SCHEMA_VERSION, saved_activation_bytes
from maecore.models.layers import set_fused_attention
from pipeline import benchmark as bench
from pretrain.benchmark import fvcore_macs, mae_macs
from pretrain.model import MaskedAutoencoderViT

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # fvcore traces with torch.jit

TINY = ["--model", "mae_vit_tiny_patch16", "--mt_model", "mae_vit_tiny_patch16", "--input_size", "32",
        "--batch_size", "2", "--mt_batch_size", "1", "--decoder_depth", "1", "--mt_decoder_depth", "1",
        "--warmup", "1", "--windows", "2", "--mt_windows", "1", "--threads", "1"]


def tiny_mae(**kw) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, **kw)


def test_explicit_attention_matches_sdpa():
    m = tiny_mae()
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    loss_f, pred_f, _ = m(x, 0.75, noise)
    assert set_fused_attention(m, False) == 3  # 2 encoder + 1 decoder block
    loss_e, pred_e, _ = m(x, 0.75, noise)
    torch.testing.assert_close(pred_e, pred_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_e, loss_f, atol=1e-6, rtol=1e-5)


def test_analytic_macs_match_fvcore():
    m = tiny_mae(encoder_mask_tokens=True)
    for tokens in (True, False):
        m.encoder_mask_tokens = tokens
        a = mae_macs(m, 0.75)
        f = fvcore_macs(m, 0.75, 32)
        # fvcore also counts layer norms (and the patchify permutation): a few % above the matmuls
        for part in ("encoder", "decoder"):
            assert a[part] <= f[part] <= 1.1 * a[part], (tokens, part, a, f)
    m.encoder_mask_tokens = False
    # 16 patches, 4 kept: the encoder blocks see 5 tokens instead of 17 (the patch embedding is shared)
    assert mae_macs(m, 0.75, True)["encoder"] > 2.5 * mae_macs(m, 0.75, False)["encoder"]


def test_saved_activation_estimate_sees_attention_matrix():
    m = tiny_mae()
    x = torch.randn(4, 3, 32, 32)
    fused = saved_activation_bytes(lambda: m(x, 0.0)[0])
    set_fused_attention(m, False)
    explicit = saved_activation_bytes(lambda: m(x, 0.0)[0])
    assert explicit > fused > 0  # the explicit path keeps the (B, heads, N, N) softmax for backward


def test_benchmark_all_sections_json(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main([*TINY, "--bench", "pretrain", "mask_tokens", "data", "--baseline",
                      "--data_images", "4", "--photo_sizes", "96x64", "--num_workers", "0", "--jpeg_draft",
                      "--data_batch_size", "2", "--data_batches", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["schema"] == SCHEMA_VERSION
    for k in ("torch", "device", "cpu", "torch_threads", "load_avg", "max_rss_mb"):
        assert k in saved["env"]
    p = saved["pretrain"]
    assert set(p["variants"]) == {"ours", "baseline"}
    for v in p["variants"].values():
        for k in ("img_per_s", "step_s", "step_s_windows", "peak_mem_mb", "peak_mem_kind", "tflops", "mfu",
                  "attention", "amp", "optimizer", "host_sync_per_step"):
            assert k in v
        assert len(v["step_s_windows"]) == 2 and v["img_per_s"] > 0
    assert p["variants"]["ours"]["attention"] == "sdpa"
    assert p["variants"]["baseline"]["attention"] == "explicit softmax"
    assert p["variants"]["baseline"]["host_sync_per_step"] is True
    # the explicit softmax keeps attention matrices for backward: more activation memory
    assert p["variants"]["baseline"]["activation_mb"] >= p["variants"]["ours"]["activation_mb"]
    assert p["speedup_vs_baseline"] > 0
    assert p["train_flops_per_img"] == 6 * p["forward_macs_per_img"]["total"]

    m = saved["mask_tokens"]
    for k in ("with_mask_tokens", "without_mask_tokens", "speedup_fwd_bwd", "speedup_step", "optimizer_step_s",
              "macs_analytic", "macs_fvcore"):
        assert k in m
    assert m["macs_analytic"]["ratio"] > 1 and m["macs_fvcore"]["ratio"] > 1

    d = saved["data"]
    assert d["model_img_per_s"] == pytest.approx(p["variants"]["ours"]["img_per_s"])
    assert {(r["dataset"], r["jpeg_draft"]) for r in d["runs"]} == {
        ("synthetic", False), ("synthetic", True), ("photos", False), ("photos", True)}
    assert all(r["img_per_s"] > 0 and r["vs_model"] > 0 for r in d["runs"])
    assert res["pretrain"]["model"] == "mae_vit_tiny_patch16"


@pytest.mark.slow
def test_task_steps_json(tmp_path, monkeypatch):
    """Each task's real model + optimizer, built through its package, runs one timed step at a tiny
    size (ViT-tiny/16, 64 px) and reports the documented fields."""
    out = tmp_path / "tasks.json"
    bench.main(["--bench", "finetune", "detection", "segmentation", "--task_arch", "tiny", "--task_input_size", "64",
                "--batch_size", "2", "--warmup", "1", "--windows", "1", "--steps", "1", "--threads", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    recipes = {"finetune": "finetune_vit_base", "detection": "vitdet_b", "segmentation": "base"}
    for name, module in bench.TASK_BENCHMARKS.items():
        t = saved[name]
        assert t["status"] == "ok" and t["module"] == module, t
        for k in ("img_per_s", "step_s", "step_s_windows", "amp", "arch", "input_size", "patch_size", "batch_size", "recipe"):
            assert k in t, (name, k)
        assert (t["arch"], t["input_size"], t["patch_size"], t["batch_size"]) == ("tiny", 64, 16, 2)
        assert t["amp"] == "none" and len(t["step_s_windows"]) == 1 and t["img_per_s"] > 0
        assert t["recipe"] == recipes[name]
    # a package without the hook is reported, not an error
    def no_hook():
        from classification.no_such_benchmark import benchmark_step

        return benchmark_step

    monkeypatch.setitem(bench.TASK_BENCHMARKS, "finetune", "classification.no_such_benchmark")
    monkeypatch.setitem(bench.TASK_STEPS, "finetune", no_hook)
    res = bench.main(["--bench", "finetune", "--warmup", "0", "--windows", "1"])
    assert res["finetune"] == {"status": "not available", "module": "classification.no_such_benchmark"}


def test_monitor_cost_side_by_side_json(tmp_path):
    """--bench monitor: the pretraining step without and with the monitor (interleaved), one measurement, and the
    overhead per step at the given every / bank / queries (tiny here; the CLI's defaults otherwise)."""
    out = tmp_path / "monitor.json"
    bench.main([*TINY, "--bench", "monitor", "--monitor_every", "10", "--monitor_bank", "14", "--monitor_queries", "7",
                "--measure_windows", "1", "--data_dir", str(tmp_path / "data"), "--json", str(out)])
    bench.main([*TINY, "--bench", "monitor", "--monitor_every", "10", "--monitor_bank", "14", "--monitor_queries", "7",
                "--measure_windows", "1", "--data_dir", str(tmp_path / "data"), "--json", str(out)])  # its folder again
    m = json.loads(out.read_text())["monitor"]
    assert (m["monitor_every"], m["monitor_bank"], m["monitor_queries"], m["online_classifier"]) == (10, 14, 7, True)
    for k in ("without", "with", "measure"):
        assert len(m[k]["step_s_windows"]) == (1 if k == "measure" else 2) and m[k]["step_s"] > 0
    assert m["step_s_with_amortised"] == pytest.approx(m["with"]["step_s"] + m["measure"]["step_s"] / 10)
    assert m["overhead"] == pytest.approx(m["step_ratio"] - 1 + m["measure"]["step_s"] / 10 / m["without"]["step_s"])
    assert m["step_ratio"] > 0 and m["target"] == 0.05


def test_cli_bad_input_one_line_error(tmp_path, capsys):
    for argv, msg in [(["--bench", "data", "--data_path", str(tmp_path / "missing")], "--data_path is not a directory"),
                      (["--bench", "data", "--photo_sizes", "big"], "photo size must look like 500x375"),
                      (["--mask_ratio", "1.0"], "--mask_ratio must be in [0, 1)"),
                      (["--bench", "segmentation", "--task_arch", "tiny", "--task_input_size", "60"],
                       "--bench segmentation: --input_size 60 is not a multiple of the patch size"),
                      (["--bench", "detection", "--task_input_size", "0"], "--task_input_size must be >= 1"),
                      (["--bench", "monitor", "--monitor_every", "0"], "--monitor_every must be >= 1")]:
        with pytest.raises(SystemExit) as e:
            bench.cli(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {msg}") and "\n" not in err
