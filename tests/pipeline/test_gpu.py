"""GPU acceptance (issue #17): the ``cuda``-marked tests need a CUDA device and skip elsewhere with a reason;
``tools/gpu_check.sh`` runs them (``pytest -m cuda``) with the pretraining benchmark and writes one JSON + a table.
The unmarked tests at the end check the CPU side of that script: which tests it selects, the JSON and the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import ROOT, forkserver

CUDA = torch.cuda.is_available()
CUDA_TESTS = {"test_bf16_autocast_step", "test_fp16_gradscaler_step", "test_fused_adamw", "test_sdpa_takes_the_flash_path",
              "test_compile_step", "test_nccl_one_process", "test_fsdp_one_process"}
TINY = ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32", "--decoder_depth", "1",
        "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--no_progress", "--vis_every", "0",
        "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "1", "--device", "cuda", "--num_workers", "0", "--epochs", "1"]


def gpu(test):
    """Mark a test ``cuda``; without a CUDA device it is skipped, saying why."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (tools/gpu_check.sh runs these on one)")(test))


def tiny_step(amp: str, compile_model: bool = False, seed: int = 0):
    """A 2-block ViT-tiny/8 MAE on 32 px, its AdamW and the engine's TrainStep on the GPU, and a batch of 8."""
    from maecore.engine import TrainStep
    from maecore.optim import adamw, param_groups
    from pretrain.model import build_mae
    from pretrain.train import make_step_fn

    dev = torch.device("cuda")
    torch.manual_seed(seed)
    model = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_depth=1, decoder_embed_dim=64,
                      decoder_num_heads=4).to(dev)
    opt = adamw(param_groups(model, 0.05, no_weight_decay=model.no_weight_decay()), 1e-3, (0.9, 0.95), dev)
    runner = torch.compile(model) if compile_model else model
    step = TrainStep(model, opt, make_step_fn(0.75), dev, amp=amp, runner=runner)
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randn(8, 3, 32, 32, generator=g).to(dev), torch.zeros(8, dtype=torch.long, device=dev),
             torch.zeros(8, dtype=torch.long, device=dev))
    return model, opt, step, batch


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun1(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *map(str, args)]
    p = forkserver.run(cmd, cwd=ROOT, env=env(), timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


# ---- on a GPU ------------------------------------------------------------------------------------------
@gpu
def test_bf16_autocast_step():
    from maecore.engine import resolve_amp

    assert resolve_amp("auto", torch.device("cuda")) == ("bf16" if torch.cuda.is_bf16_supported() else "none")
    model, _, step, batch = tiny_step("bf16")
    dtypes = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    before = snapshot(model)
    loss = step(batch)
    assert dtypes == [torch.bfloat16]  # the matmuls run in bf16 ...
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # ... the loss is taken in fp32
    assert next(model.parameters()).dtype == torch.float32 and changed(before, model)
    assert not bool(step.nonfinite)


@gpu
def test_fp16_gradscaler_step():
    model, _, step, batch = tiny_step("fp16")
    assert step.scaler is not None
    before = snapshot(model)
    losses = [step(batch) for _ in range(5)]  # the first steps may be skipped while the scale settles
    assert all(torch.isfinite(x) for x in losses) and changed(before, model)
    scale = step.scaler.get_scale()
    assert 0 < scale < float("inf")


@gpu
def test_fused_adamw():
    model, opt, step, batch = tiny_step("bf16")
    assert opt.defaults.get("fused") is True  # one fused kernel over all parameters, not foreach / for-loop
    before = snapshot(model)
    step(batch)
    assert changed(before, model)
    assert all(s["exp_avg"].is_cuda for s in opt.state.values())


@gpu
def test_sdpa_takes_the_flash_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    model, _, step, batch = tiny_step("bf16")
    # left to choose, SDPA dispatches to a flash-attention kernel (head dim 64 and 16, bf16): FlashAttention, or
    # cuDNN's where torch prefers it on this GPU; not the memory-efficient or the math fallback ...
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    taken = sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name})
    assert any(k in n for n in taken for k in ("_flash_attention", "_cudnn_attention")), taken
    # ... and with flash as the only allowed kernel the step still runs (no fallback needed)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        assert torch.isfinite(step(batch))


@gpu
def test_compile_step():
    import torch._inductor.config as inductor_config

    model_c, _, step_c, batch = tiny_step("none", compile_model=True)
    model_e, _, step_e, _ = tiny_step("none")
    assert type(step_c.runner).__name__ == "OptimizedModule"
    before = snapshot(model_c)
    old = inductor_config.fallback_random
    inductor_config.fallback_random = True  # the compiled masks come from torch's RNG stream, as in eager mode
    try:
        torch.manual_seed(1)
        lc = [step_c(batch).item() for _ in range(2)]
    finally:
        inductor_config.fallback_random = old
    torch.manual_seed(1)
    le = [step_e(batch).item() for _ in range(2)]
    # same weights, same masks: the compiled step computes what the eager one does, to fp32 rounding (the second
    # loss follows an AdamW step, whose sign-like first update magnifies rounding differences a little)
    assert abs(lc[0] - le[0]) <= 1e-4 * abs(le[0]) + 1e-6, (lc, le)
    assert abs(lc[1] - le[1]) <= 1e-2 * abs(le[1]), (lc, le)
    assert changed(before, model_c) and all(torch.isfinite(v).all() for v in model_c.state_dict().values())


NCCL_WORKER = r"""
import json, sys, torch
import torch.distributed as dist
from maecore import distributed as du
device = du.init_distributed("cuda", 1.0)
t = torch.full((3,), 2.0, device=device)
vote = du.AnyRank(2)
answers = [vote.poll([False, i >= 1]) for i in range(3)]
vote.close()
json.dump({"backend": dist.get_backend(), "world": du.world_size(), "sum": du.all_reduce_sum(t).tolist(),
           "votes": answers, "device": str(device)}, open(sys.argv[1], "w"))
du.cleanup()
"""


@gpu
def test_nccl_one_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(NCCL_WORKER)
    torchrun1([worker, tmp_path / "res.json"])
    res = json.loads((tmp_path / "res.json").read_text())
    assert res == {"backend": "nccl", "world": 1, "sum": [2.0, 2.0, 2.0], "votes": [False, False, True], "device": "cuda:0"}
    # the engine under torchrun on the GPU: DDP over nccl, 3 steps
    out = tmp_path / "ddp"
    torchrun1(["-m", "pretrain", *TINY, "--data_path", tiny_images(tmp_path), "--output_dir", out, "--max_steps", "3"])
    from maecore.engine import read_log

    run = read_log(out, "run")[0]
    assert run["device"] == "cuda:0" and run["world_size"] == 1 and run["amp"] == "bf16"
    assert [r["step"] for r in read_log(out, "train")] == [1, 2, 3]


@gpu
def test_fsdp_one_process(tmp_path):
    from maecore.checkpoint import load_file

    data = tiny_images(tmp_path)
    args = ["-m", "pretrain", *TINY, "--data_path", data, "--amp", "none", "--max_steps", "3"]
    torchrun1([*args, "--output_dir", tmp_path / "ddp"])
    torchrun1([*args, "--output_dir", tmp_path / "fsdp", "--fsdp"])
    a, b = load_file(tmp_path / "ddp" / "checkpoint-last.pth"), load_file(tmp_path / "fsdp" / "checkpoint-last.pth")
    assert a["step"] == b["step"] == 3 and sorted(a["model"]) == sorted(b["model"])
    # FSDP over nccl with one rank computes what DDP does; GPU kernels with atomics may differ in the last bits
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k].cpu(), a["model"][k].cpu(), rtol=1e-3, atol=1e-4, msg=k)
    # and it resumes from its gathered checkpoint
    torchrun1([*args[:-2], "--max_steps", "5", "--output_dir", tmp_path / "fsdp", "--fsdp", "--resume", "auto"])
    assert load_file(tmp_path / "fsdp" / "checkpoint-last.pth")["step"] == 5


def tiny_images(tmp_path: Path) -> Path:
    from synthetic import make_imagenet

    return make_imagenet(tmp_path / "world", 8, 1, size=32, seed=0)


# ---- the CPU side of tools/gpu_check.sh -------------------------------------------------------------------
def test_gpu_check_selects_the_cuda_tests_and_they_skip_here_with_a_reason(tmp_path):
    from pipeline.gpu_check import parse_junit, pytest_command

    cmd = pytest_command(tmp_path, tests=str(ROOT / "tests" / "pipeline" / "test_gpu.py"))
    assert cmd[cmd.index("-m", 2) + 1] == "cuda"  # marker selection
    p = forkserver.run(cmd, cwd=ROOT, env=env(), timeout=300)
    cases = parse_junit(tmp_path / "pytest.xml")
    names = {c["name"].split("[")[0] for c in cases}
    assert names == CUDA_TESTS, (names, p.stdout[-2000:])
    if not CUDA:
        assert p.returncode == 0, p.stdout[-2000:]
        assert all(c["outcome"] == "skipped" and "needs a CUDA GPU" in c["message"] for c in cases), cases


def test_gpu_check_writes_one_json_and_a_table(tmp_path, capsys):
    from pipeline.benchmark import main as bench_main
    from pipeline.gpu_check import OUTPUT_FILES, format_table, parse_junit, summarize, write_summary

    # a real benchmark JSON (the tiny model on the CPU: its schema is what the GPU run writes)
    bench_json = tmp_path / "benchmark.json"
    bench_main(["--bench", "pretrain", "--baseline", "--device", "cpu", "--model", "mae_vit_tiny_patch16", "--input_size", "32",
                "--batch_size", "2", "--decoder_depth", "1", "--warmup", "0", "--windows", "1", "--steps", "1", "--json",
                str(bench_json)])
    capsys.readouterr()
    junit = tmp_path / "pytest.xml"
    junit.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3">'
        '<testcase classname="tests.test_gpu" name="test_fused_adamw" time="0.51"/>'
        '<testcase classname="tests.test_gpu" name="test_compile_step" time="31.2"><failure message="AssertionError: boom">'
        'trace</failure></testcase>'
        '<testcase classname="tests.test_gpu" name="test_fsdp_one_process" time="0.01"><skipped type="pytest.skip" '
        'message="needs a CUDA GPU">skip</skipped></testcase></testsuite></testsuites>')
    cases = parse_junit(junit)
    assert [(c["name"], c["outcome"]) for c in cases] == [("test_fused_adamw", "passed"), ("test_compile_step", "failed"),
                                                           ("test_fsdp_one_process", "skipped")]
    stages = {"tests": {"rc": 1, "seconds": 40.0, "timed_out": False}, "benchmark": {"rc": 0, "seconds": 20.0, "timed_out": False}}
    summary = summarize(cases, json.loads(bench_json.read_text()), stages, {"gpu": "NVIDIA H200", "torch": "2.14"})
    assert summary["ok"] is False  # a failure and a skip: not accepted
    assert summary["tests"]["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    bench = summary["benchmark"]
    assert set(bench["variants"]) == {"ours", "baseline"} and bench["model"] == "mae_vit_tiny_patch16"
    assert {"img_per_s", "step_s", "mfu", "tflops", "peak_mem_mb"} <= set(bench["variants"]["ours"])
    path = write_summary(summary, tmp_path / "out")
    assert json.loads(path.read_text()) == json.loads(json.dumps(summary))
    table = format_table(summary)
    assert "FAILED" in table and "test_compile_step" in table and "ours" in table and "MFU" in table
    # what failed: the failed and the skipped test, with their messages (the tests stage exited 1: its log's end)
    assert [(f["what"], f["outcome"]) for f in summary["failed"]] == [
        ("test test_compile_step", "failed"), ("test test_fsdp_one_process", "skipped"), ("stage tests", "exit 1")]
    assert summary["failed"][0]["message"] == "AssertionError: boom" and "FAILED test test_compile_step: failed" in table
    all_good = summarize(cases[:1], json.loads(bench_json.read_text()), {**stages, "tests": {**stages["tests"], "rc": 0}}, {})
    assert all_good["ok"] is True and "ACCEPTED" in format_table(all_good)
    bench_log = tmp_path / "benchmark.log"
    bench_log.write_text("".join(f"line {i}\n" for i in range(100)) + "RuntimeError: CUDA out of memory\n")
    failed = summarize(cases[:1], None, {**stages, "benchmark": {"rc": 1, "seconds": 1.0, "timed_out": False, "log": str(bench_log)}}, {})
    assert failed["ok"] is False and [f["what"] for f in failed["failed"]] == ["stage tests", "stage benchmark"]
    tail = failed["failed"][1]["log_tail"].splitlines()
    assert len(tail) == 40 and tail[-1] == "RuntimeError: CUDA out of memory"  # the end of its log, in the JSON
    assert "  | RuntimeError: CUDA out of memory" in format_table(failed)
    assert len(OUTPUT_FILES) <= 8 and {"gpu_check.json", "gpu_check.txt", "pytest.xml", "benchmark.json"} <= set(OUTPUT_FILES)


def test_gpu_check_stage_is_killed_whole_when_it_runs_out_of_time(tmp_path):
    """A stage past its limit is killed with its children (pytest's torchrun workers would hold the GPU)."""
    from pipeline.gpu_check import run_stage

    child_pid = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(child_pid)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    st = run_stage([sys.executable, "-c", code], 3, tmp_path / "stage.log")
    assert st["timed_out"] and st["rc"] is None and st["seconds"] < 30
    assert "started" in (tmp_path / "stage.log").read_text() and "stopped after" in (tmp_path / "stage.log").read_text()
    stat = Path(f"/proc/{int(child_pid.read_text())}/stat")
    for _ in range(50):  # the grandchild is gone too (a zombie until whoever adopted it reaps it)
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the stage's child outlived the stage")
    ok = run_stage([sys.executable, "-c", "print('fine')"], 30, tmp_path / "ok.log")
    assert ok["rc"] == 0 and not ok["timed_out"] and (tmp_path / "ok.log").read_text() == "fine\n"
