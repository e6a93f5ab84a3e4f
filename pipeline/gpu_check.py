"""GPU acceptance run (``tools/gpu_check.sh [OUT]`` = ``python -m pipeline.gpu_check --out OUT``): on one GPU, in
under 8 minutes on an H100/H200,

1. the CUDA-marked tests (``pytest -m cuda``: bf16 autocast step, fp16 + GradScaler step, fused AdamW, the SDPA
   flash path, a ``--compile`` step, nccl with one process, FSDP with one process), with a junit report;
2. the pretraining benchmark against the official recipe (``tools/benchmark.py --bench pretrain --baseline``: img/s,
   peak memory, TFLOP/s and MFU);

then one JSON (``OUT/gpu_check.json``) and a short table.  The run is accepted (exit status 0) when every CUDA
test ran and passed and the benchmark finished; a skipped CUDA test means the machine could not run it, which is
not accepted either.  Each stage has its own time limit, so a hung stage is reported, not waited for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from maecore.cli import OneLineParser, positive_int
from maecore.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1
TESTS_TIMEOUT_S = 300
BENCH_TIMEOUT_S = 150


def pytest_command(out: Path, tests: str = "tests") -> list[str]:
    """The CUDA tests, selected by their marker, with a junit report in ``out``."""
    return [sys.executable, "-m", "pytest", tests, "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
            f"--junitxml={Path(out) / 'pytest.xml'}"]


def benchmark_command(out: Path, model: str = "mae_vit_base_patch16", batch_size: int = 64) -> list[str]:
    """The pretraining step benchmark, ours vs the official recipe on the same weights, JSON in ``out``."""
    return [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--bench", "pretrain", "--baseline", "--device", "cuda",
            "--model", model, "--batch_size", str(batch_size), "--json", str(Path(out) / "benchmark.json")]


def run_stage(cmd: list[str], timeout_s: float, log: Path) -> dict[str, Any]:
    """Run one stage with its output in ``log``; its exit status, seconds, and whether it ran out of time."""
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    return {"rc": rc, "seconds": round(time.time() - t0, 1), "timed_out": timed_out, "log": str(log)}


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """Every test case of a pytest junit file: name, outcome (passed/failed/error/skipped), seconds, message."""
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                raw = (el.get("message") or el.text or "").strip()
                message = raw.splitlines()[0] if raw else ""
                break
        cases.append({"name": tc.get("name", ""), "classname": tc.get("classname", ""), "outcome": outcome,
                      "seconds": float(tc.get("time") or 0), "message": message})
    return cases


def summarize(cases: list[dict[str, Any]], bench: dict[str, Any] | None, stages: dict[str, dict[str, Any]],
              env: dict[str, Any]) -> dict[str, Any]:
    """The one JSON of the run: environment, each stage, each CUDA test, the benchmark's variants, the verdict."""
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    out: dict[str, Any] = {"schema": SCHEMA, "env": env, "stages": stages,
                           "tests": {"counts": counts, "cases": cases}, "benchmark": None}
    if bench and "pretrain" in bench:
        p = bench["pretrain"]
        keep = ("img_per_s", "step_s", "peak_mem_mb", "tflops", "peak_tflops", "mfu", "amp", "attention", "optimizer")
        out["benchmark"] = {"model": p["model"], "batch_size": p["batch_size"], "input_size": p["input_size"],
                            "train_flops_per_img": p.get("train_flops_per_img"),
                            "speedup_vs_baseline": p.get("speedup_vs_baseline"),
                            "variants": {name: {k: v.get(k) for k in keep} for name, v in p["variants"].items()},
                            "gpu": (bench.get("env") or {}).get("gpu")}
    tests_ok = counts["passed"] > 0 and counts["failed"] == counts["error"] == counts["skipped"] == 0
    bench_stage = stages.get("benchmark", {})
    bench_ok = out["benchmark"] is not None and bench_stage.get("rc") == 0
    out["ok"] = bool(tests_ok and bench_ok and stages.get("tests", {}).get("rc") == 0)
    return out


def write_summary(summary: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(path)
    return path


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_table(summary: dict[str, Any]) -> str:
    env, t = summary.get("env", {}), summary["tests"]
    lines = [f"# GPU acceptance: {'ACCEPTED' if summary['ok'] else 'NOT ACCEPTED'}"
             + (f" on {env['gpu']}" if env.get("gpu") else "") + (f", torch {env['torch']}" if env.get("torch") else "")]
    for name, st in summary["stages"].items():
        state = "timed out" if st.get("timed_out") else f"exit {st.get('rc')}"
        lines.append(f"stage {name:<10} {state:<10} {st.get('seconds', 0):7.1f} s")
    c = t["counts"]
    lines += ["", f"CUDA tests: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped",
              f"{'test':<36} {'outcome':<8} {'s':>7}  note"]
    for case in t["cases"]:
        flag = case["outcome"].upper() if case["outcome"] in ("failed", "error") else case["outcome"]
        lines.append(f"{case['name'][:36]:<36} {flag:<8} {case['seconds']:7.2f}  {case['message'][:80]}")
    b = summary.get("benchmark")
    if b:
        lines += ["", f"pretraining step: {b['model']}, batch {b['batch_size']}, {b['input_size']} px"
                  + (f"; ours vs baseline {b['speedup_vs_baseline']:.2f}x" if b.get("speedup_vs_baseline") else ""),
                  f"{'variant':<10} {'img/s':>9} {'step s':>8} {'peak MB':>9} {'TFLOP/s':>8} {'MFU':>6}"]
        for name, v in b["variants"].items():
            lines.append(f"{name:<10} {_fmt(v['img_per_s']):>9} {_fmt(v['step_s'], 3):>8} {_fmt(v['peak_mem_mb'], 0):>9} "
                         f"{_fmt(v['tflops'], 1):>8} {_fmt(v['mfu'], 3):>6}")
    else:
        lines += ["", "pretraining benchmark: no result (see its log)"]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpu": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count() if gpu else 0, "python": sys.version.split()[0]}


def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m pipeline.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json, the junit report and the logs")
    p.add_argument("--tests", default="tests", help="where pytest looks for the cuda-marked tests")
    p.add_argument("--tests_timeout", type=positive_int, default=TESTS_TIMEOUT_S, help="seconds")
    p.add_argument("--bench_timeout", type=positive_int, default=BENCH_TIMEOUT_S, help="seconds")
    p.add_argument("--model", default="mae_vit_base_patch16", help="the benchmarked MAE")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--dry_run", action="store_true", help="print the two commands and run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    out = Path(args.out).resolve()
    commands = {"tests": pytest_command(out, args.tests), "benchmark": benchmark_command(out, args.model, args.batch_size)}
    if args.dry_run:
        for name, cmd in commands.items():
            print(f"{name}: {' '.join(cmd)}")
        return 0
    try:
        import torch
    except ImportError:
        raise UserError(f"torch is not installed for {sys.executable}: set PYTHON to the project's interpreter") from None
    if not torch.cuda.is_available():
        raise UserError("no CUDA device here: the GPU acceptance run needs one (on a CPU the cuda tests skip: pytest -m cuda)")
    out.mkdir(parents=True, exist_ok=True)
    junit = out / "pytest.xml"
    junit.unlink(missing_ok=True)
    stages = {"tests": run_stage(commands["tests"], args.tests_timeout, out / "tests.log")}
    stages["benchmark"] = run_stage(commands["benchmark"], args.bench_timeout, out / "benchmark.log")
    cases = parse_junit(junit) if junit.is_file() else []
    bench_path = out / "benchmark.json"
    bench = json.loads(bench_path.read_text()) if stages["benchmark"]["rc"] == 0 and bench_path.is_file() else None
    summary = summarize(cases, bench, stages, environment())
    path = write_summary(summary, out)
    table = format_table(summary)
    (out / "gpu_check.txt").write_text(table + "\n")
    print(table)
    print(f"\nwrote {path}")
    return 0 if summary["ok"] else 1


def cli(argv: list[str] | None = None) -> None:
    code = 1
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


__all__ = ["benchmark_command", "format_table", "main", "parse_junit", "pytest_command", "summarize", "write_summary"]

if __name__ == "__main__":
    cli()
