"""The main job (tools/demo.py, i.e. pipeline.demo) end to end at the smallest size, and its failure /
resume path."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests import ROOT, forkserver

DEMO = [sys.executable, str(ROOT / "tools" / "demo.py")]  # the command `make demo` runs
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's packages, not whichever copy is installed


def test_every_stage_command_has_a_main():
    """Each command line a stage shows is run in-process through its module's main()."""
    from pipeline.context import ENTRIES, entry_main

    assert {"tools/make_synthetic.py", "tools/convert.py", "tools/visualize.py", "-m pretrain"} <= set(ENTRIES)
    assert all(callable(entry_main(entry)) for entry in ENTRIES)


@pytest.mark.slow
def test_pipeline_smoke_end_to_end_then_resume_from_a_stage(smoke_demo, tmp_path):
    run, p = smoke_demo  # `tools/demo.py --preset smoke --output RUN`, shared with test_report_html
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "run"  # what follows reruns stages: on a copy
    shutil.copytree(run, out)
    report = (out / "report.md").read_text()
    for row in ("linear probe", "partial fine-tune, last MLP", "fine-tune", "detection (box AP)", "detection (mask AP)",
                "segmentation (mIoU)"):
        assert f"| {row} |" in report
    # the rows in the paper's order, whatever order the runs went in (the longest first)
    where = [report.index(f"| {row}") for row in ("linear probe", "partial", "fine-tune", "detection", "segmentation")]
    assert where == sorted(where)
    for f in ("pretrain/checkpoint-last.pth", "pretrain_loss.png", "reconstruction.png", "converted/detection.pth",
              "converted/segmentation.pth", "converted/classification.pth", "detection/mae/predictions.png"):
        assert (out / f).exists(), f
    assert "python -m pretrain" in report and "python tools/convert.py" in report and "python -m detection" in report
    rows = json.loads((out / "results.json").read_text())["results"]["rows"]
    assert {k.split("|")[1] for k in rows} == {"mae", "random"}
    assert all(r["value"] is not None for r in rows.values())

    # the pretraining monitors (#26): at step 0 (the random network) and at the last step; their figure and line in the
    # report; the study's checkpoint probes join them: the smoke run's one kept checkpoint is its last
    from pipeline.monitor_figure import monitor_records
    from pipeline.study_monitor import checkpoint_points

    saved = json.loads((out / "results.json").read_text())
    steps, recs = saved["results"]["pretrain"]["steps"], monitor_records(out / "pretrain")
    assert recs[0]["step"] == 0 and recs[-1]["step"] == steps and all("knn_top1" in r and "rankme" in r for r in recs)
    assert (out / "pretrain_monitor.png").stat().st_size > 0 and "Pretraining monitors (`--monitor`" in report
    (point,) = checkpoint_points({"dir": out, **saved})
    assert point["step"] == steps and point["knn_top1"] == recs[-1]["knn_top1"]
    assert point["linear probe"] == rows["linear probe|mae"]["value"] and point["fine-tune"] == rows["fine-tune|mae"]["value"]

    # the transfer runs went side by side (the smoke preset's "parallel": 2), as their shown commands say
    assert "OMP_NUM_THREADS=1 python -m classification" in report and "side by side" in report

    # a stage that fails names itself, keeps what came before, and the run resumes from it; in this process
    # (parallel 1) and side by side alike
    ckpt = (out / "pretrain" / "checkpoint-last.pth").read_bytes()
    bad = tmp_path / "bad.json"
    for parallel in (1, 2):
        bad.write_text(json.dumps({"segmentation": ["--recipe", "demo", "--crop_size", "-5"], "parallel": parallel}))
        p = forkserver.run([*DEMO, "--preset", "smoke", "--output", str(out), "--from-stage", "segmentation", "--to-stage",
                            "segmentation", "--config", str(bad)], cwd=ROOT, env=ENV)
        assert p.returncode == 2, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: stage 'segmentation' failed") and "--from-stage segmentation" in last, last
        assert "crop_size" in (last if parallel == 2 else p.stderr)  # side by side: the run's own error line
        assert "Traceback" not in p.stderr
        assert (out / "pretrain" / "checkpoint-last.pth").read_bytes() == ckpt
    p = forkserver.run([*DEMO, "--preset", "smoke", "--output", str(out), "--from-stage", "report"], cwd=ROOT, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| linear probe |" in (out / "report.md").read_text()

    # one stage alone (--from-stage X --to-stage X): the other stages' rows and commands are kept, in stage order
    p = forkserver.run([*DEMO, "--preset", "smoke", "--output", str(out), "--from-stage", "partial", "--to-stage", "partial"],
                       cwd=ROOT, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    stages = [c[0] for c in res["commands"]]
    from pipeline.stages import STAGES

    assert stages == sorted(stages, key=[name for name, _ in STAGES].index)
    assert {"pretrain", "partial", "detection", "segmentation"} <= set(stages) and res["done"] is False
    assert set(res["results"]["rows"]) == set(rows)
    p = forkserver.run([*DEMO, "--preset", "smoke", "--output", str(out), "--from-stage", "partial", "--to-stage", "finetune"],
                       cwd=ROOT, env=ENV)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --to-stage finetune comes before")
    p = forkserver.run([*DEMO, "--preset", "smoke", "--output", str(out), "--from-stage", "report"], cwd=ROOT, env=ENV)
    assert p.returncode == 0 and json.loads((out / "results.json").read_text())["done"] is True

    # the study preset: one pipeline per seed, a finished seed is kept (not re-run), then mean ± std + curves
    study = tmp_path / "study"
    shutil.copytree(out / "world", study / "world")
    for seed, shift in ((0, 0.0), (1, 2.0)):
        shutil.copytree(out, study / f"seed{seed}", ignore=shutil.ignore_patterns("world"))
        saved = study / f"seed{seed}" / "results.json"
        res = json.loads(saved.read_text())
        assert res["done"] is True
        res["config"]["seed"] = seed
        for r in res["results"]["rows"].values():
            r["value"] += shift
        saved.write_text(json.dumps(res))
    cfg = tmp_path / "study.json"
    cfg.write_text(json.dumps({"seeds": [0, 1]}))
    p = forkserver.run([*DEMO, "--preset", "smoke", "--config", str(cfg), "--output", str(study)], cwd=ROOT, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("finished earlier") == 2
    md = (study / "results.md").read_text()
    assert (study / "curves.png").stat().st_size > 0 and "Seeds (training" in md and ": 0, 1." in md
    assert "## Do the pretraining monitors predict" in md and (study / "monitor_study.png").stat().st_size > 0
    ft = next(line for line in md.splitlines() if line.startswith("| fine-tune |"))
    assert "± 1.4" in ft  # two seeds 2 points apart: sample std sqrt(2)


def test_study_seed_reaches_every_stage_command():
    from pipeline.context import Context, common
    from pipeline.presets import PRESETS

    assert PRESETS["study"]["seeds"] == [0, 1, 2] and PRESETS["study"]["dense_inits"] == ["mae", "random"]
    assert common(Context(Path("x"), {"seed": 2}))[1:3] == ["--seed", "2"]


def test_pipeline_modules_import_one_way_and_by_name():
    """No import circle among pipeline's modules (imports inside functions count too); the demo's and the benchmark's
    modules use no importlib: each module a stage or benchmark runs is named in a plain import where it is used."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + ([f"pipeline.{a.name}" for a in node.names] if node.module == "pipeline" else [])
            else:
                continue
            if path.stem in ("demo", "context", "jobs", "stages", "report", "plan", "presets", "results", "benchmark"):
                assert not any(n.split(".")[0] == "importlib" for n in names), path.name
            deps |= {n.split(".")[1] for n in names if n.startswith("pipeline.")}
        graph[path.stem] = deps - {path.stem}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))

    assert {"demo", "results", "plan"} <= set(graph)
    assert not [m for m in graph if reaches(m, m, set())], graph
