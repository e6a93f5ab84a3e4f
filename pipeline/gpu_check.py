"""GPU acceptance run (``tools/gpu_check.sh [OUT]``, which picks the interpreter and installs the carried wheels,
then runs ``python -m pipeline.gpu_check --out OUT``): on one GPU, in under 8 minutes on an H100/H200,

1. the CUDA-marked tests (``pytest -m cuda``: bf16 autocast step, fp16 + GradScaler step, fused AdamW, the SDPA
   flash path, a ``--compile`` step, nccl with one process, FSDP with one process), with a junit report;
2. the pretraining benchmark against the official recipe (``tools/benchmark.py --bench pretrain --baseline``, ours
   in bf16: img/s, peak memory, TFLOP/s and MFU);

then one JSON (``OUT/gpu_check.json``: the verdict, every test, the benchmark's numbers and what failed, with the
end of its log) and a short table (``OUT/gpu_check.txt``).  The run is accepted (exit status 0) when every CUDA
test ran and passed and the benchmark finished; a skipped CUDA test means the machine could not run it, which is
not accepted either.  Each stage has its own time limit inside the whole run's, so a hung stage is reported, not
waited for; a stage runs in its own process group, which is killed with it.  Before any of it, a missing
requirement or a missing GPU stops the run with one ``error:`` line (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from maecore.cli import OneLineParser, positive_int
from maecore.errors import UserError
from pipeline.gpu_wheels import check_requirements, project_requirements

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 2
TIME_LIMIT_S = 470  # tools/gpu_check.sh allows 480 s for everything, its set-up included
TESTS_TIMEOUT_S = 300
BENCH_TIMEOUT_S = 150
SUMMARY_S = 10  # kept back from the stages for the summary
# everything the run leaves in OUT (the device machine returns at most 8 files); setup.log is tools/gpu_check.sh's
OUTPUT_FILES = ("gpu_check.json", "gpu_check.txt", "pytest.xml", "benchmark.json", "setup.log", "tests.log", "benchmark.log")
LOG_TAIL_LINES = 40


def pytest_command(out: Path, tests: str = "tests") -> list[str]:
    """The CUDA tests, selected by their marker, with a junit report in ``out``."""
    return [sys.executable, "-m", "pytest", tests, "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
            f"--junitxml={Path(out) / 'pytest.xml'}"]


def benchmark_command(out: Path, model: str = "mae_vit_base_patch16", batch_size: int = 64) -> list[str]:
    """The pretraining step benchmark, ours vs the official recipe on the same weights, JSON in ``out``."""
    return [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--bench", "pretrain", "--baseline", "--device", "cuda",
            "--amp", "bf16", "--model", model, "--batch_size", str(batch_size), "--json", str(Path(out) / "benchmark.json")]


class Terminated(Exception):
    """SIGTERM (the outer ``timeout``): the stage in flight is killed and the summary still written."""


def _terminate(_signum: int, _frame: Any) -> None:
    raise Terminated


def run_stage(cmd: list[str], timeout_s: float, log: Path) -> dict[str, Any]:
    """Run one stage with its output in ``log``; its exit status, seconds, and whether it ran out of time.  The
    stage is its own process group (pytest's torchrun workers too), killed whole when it runs out of time, so
    nothing of it holds the GPU afterwards; it stays in this session, which the machine ends with the call."""
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    rc, timed_out, terminated = None, False, False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, process_group=0)
        try:
            rc = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
        except Terminated:
            timed_out = terminated = True
        finally:
            if rc is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    if timed_out:
        with open(log, "a") as f:
            f.write(f"\n[gpu_check] stopped after {time.time() - t0:.0f} s (limit {timeout_s:.0f} s)\n")
    return {"rc": rc, "seconds": round(time.time() - t0, 1), "timed_out": timed_out, "terminated": terminated, "log": str(log)}


def log_tail(path: str | Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log ('' when there is none)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:]) if path else ""
    except OSError:
        return ""


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
    out["failed"] = failures(cases, stages, bench_ok)
    return out


def failures(cases: list[dict[str, Any]], stages: dict[str, dict[str, Any]], bench_ok: bool) -> list[dict[str, Any]]:
    """What kept the run from being accepted: each test that failed, errored or skipped (its message), and each
    stage that did not finish well, with the end of its log."""
    out: list[dict[str, Any]] = [{"what": f"test {c['name']}", "outcome": c["outcome"], "message": c["message"]}
                                 for c in cases if c["outcome"] != "passed"]
    for name, st in stages.items():
        bad = st.get("timed_out") or st.get("rc") != 0 or (name == "benchmark" and not bench_ok)
        if name == "tests" and not cases:
            bad = True  # no junit report: nothing was tested
        if bad:
            state = "timed out" if st.get("timed_out") else f"exit {st.get('rc')}"
            out.append({"what": f"stage {name}", "outcome": state, "log": st.get("log"), "log_tail": log_tail(st.get("log"))})
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
    for f in summary.get("failed", []):
        lines += ["", f"FAILED {f['what']}: {f['outcome']}" + (f" - {f['message']}" if f.get("message") else "")
                  + (f" (log: {f['log']})" if f.get("log") else "")]
        lines += [f"  | {line}" for line in f.get("log_tail", "").splitlines()]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    packages = {}
    for req in project_requirements():
        try:
            packages[req.name] = md.version(req.name)
        except md.PackageNotFoundError:
            packages[req.name] = None
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpu": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count() if gpu else 0, "python": sys.version.split()[0],
            "executable": sys.executable, "pythonpath": os.environ.get("PYTHONPATH", ""), "packages": packages}


def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m pipeline.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json, the junit report and the logs")
    p.add_argument("--tests", default="tests", help="where pytest looks for the cuda-marked tests")
    p.add_argument("--time_limit", type=positive_int, default=TIME_LIMIT_S, help="seconds for the whole run")
    p.add_argument("--tests_timeout", type=positive_int, default=TESTS_TIMEOUT_S, help="seconds")
    p.add_argument("--bench_timeout", type=positive_int, default=BENCH_TIMEOUT_S, help="seconds")
    p.add_argument("--model", default="mae_vit_base_patch16", help="the benchmarked MAE")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--dry_run", action="store_true", help="print the two commands and run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
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
    problems = check_requirements()
    if problems:  # checked before the GPU, so that a machine without the carried wheels says so at once
        raise UserError(f"{sys.executable} lacks what the run needs ({'; '.join(problems)}): run tools/gpu_wheels.sh before "
                        "the call and carry .whl (README, GPU acceptance)")
    if not torch.cuda.is_available():
        raise UserError("no CUDA device here: the GPU acceptance run needs one (on a CPU the cuda tests skip: pytest -m cuda)")
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a result of an earlier run in the same folder is never read as this one's
        if name != "setup.log":
            (out / name).unlink(missing_ok=True)
    junit = out / "pytest.xml"
    signal.signal(signal.SIGTERM, _terminate)
    stages: dict[str, dict[str, Any]] = {}
    for name, own_limit in (("tests", args.tests_timeout), ("benchmark", args.bench_timeout)):
        budget = min(own_limit, args.time_limit - SUMMARY_S - (time.time() - t0))
        if budget < 1 or any(st.get("terminated") for st in stages.values()):
            stages[name] = {"rc": None, "seconds": 0.0, "timed_out": True, "log": None, "note": "not run: no time left"}
            continue
        stages[name] = run_stage(commands[name], budget, out / f"{name}.log")
    try:
        cases = parse_junit(junit) if junit.is_file() else []
    except ET.ParseError:  # cut short by a kill: no cases, and the tests stage is reported with its log
        cases = []
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


__all__ = ["OUTPUT_FILES", "benchmark_command", "format_table", "main", "parse_junit", "pytest_command", "run_stage", "summarize",
           "write_summary"]

if __name__ == "__main__":
    cli()
