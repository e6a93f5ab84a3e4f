"""Issue #26 item 6: the study's checkpoint probes (pipeline.checkpoint_jobs) and the correlations of the monitors with
them (pipeline.study_monitor).  Seconds: no training here; the smoke demo's real logs are checked in test_demo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.study_monitor import BEGIN, END, checkpoint_points, correlations, monitor_study, pearson, put_section, section, spearman


def test_pearson_and_spearman_against_scipy_and_at_the_edges():
    x = [1.0, 2.0, 2.0, 4.0, 7.0, 3.5]
    y = [0.5, 2.5, 1.0, 4.0, 9.0, 3.0]
    stats = pytest.importorskip("scipy.stats")
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)  # a tie: mean ranks
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0) and pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert math.isnan(pearson([1, 2], [3, 4])) and math.isnan(spearman([1, 2], [3, 4]))  # fewer than 3 points
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # a constant: undefined, not 0
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])


def _run(tmp_path: Path, seed: int, knn: list[float], lp: list[float], ft_mid: float | None) -> dict:
    """A seed's run as pipeline.results loads it: three kept checkpoints (the last the final), monitor records."""
    d = tmp_path / f"seed{seed}"
    (d / "pretrain").mkdir(parents=True)
    steps = [10, 20, 30]
    recs = [{"type": "monitor", "step": 0, "knn_top1": 14.0, "rankme": 3.0}]
    recs += [{"type": "monitor", "step": s, "knn_top1": k, "linear_top1": k + 1, "rankme": 5.0 + i,
              "subset": {"bank": 50, "queries": 20}}
             for i, (s, k) in enumerate(zip(steps, knn))]
    (d / "pretrain" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ck = {str(e): {"epochs": e, "step": s, "final": s == 30} for e, s in zip((1, 2, 3), steps)}
    ck["1"]["linear probe"], ck["2"]["linear probe"] = lp[0], lp[1]
    ck["2"]["fine-tune"] = ft_mid
    rows = {"linear probe|mae": {"value": lp[2]}, "fine-tune|mae": {"value": 50.0 + seed}}
    return {"dir": d, "config": {"seed": seed}, "results": {"rows": rows, "checkpoints": ck}}


def test_points_join_probes_with_the_monitor_at_their_step_then_correlate(tmp_path):
    runs = [_run(tmp_path, 0, [20.0, 30.0, 35.0], [25.0, 33.0, 39.0], 45.0),
            _run(tmp_path, 1, [22.0, 28.0, 36.0], [26.0, 31.0, 40.0], None)]
    points = [p for r in runs for p in checkpoint_points(r)]
    assert [(p["seed"], p["step"]) for p in points] == [(0, 10), (0, 20), (0, 30), (1, 10), (1, 20), (1, 30)]
    assert points[2] == {"seed": 0, "epochs": 3, "step": 30, "knn_top1": 35.0, "linear_top1": 36.0, "rankme": 7.0,
                         "linear probe": 39.0, "fine-tune": 50.0,  # the final checkpoint: the demo's own rows
                         "subset": {"bank": 50, "queries": 20}}
    assert points[4]["fine-tune"] is None and points[1]["fine-tune"] == 45.0
    corr = {(c["monitor"], c["target"]): c for c in correlations(points)}
    lp = corr[("knn_top1", "linear probe")]
    assert lp["n"] == 6 and lp["pearson"] == pytest.approx(pearson([p["knn_top1"] for p in points],
                                                                   [p["linear probe"] for p in points]))
    assert lp["spearman"] == pytest.approx(1.0)  # kNN ranks the six checkpoints as the linear probe does
    assert corr[("knn_top1", "fine-tune")]["n"] == 3  # seed 1 fine-tuned its final checkpoint only

    md = section(points, correlations(points), "fig.png")
    assert "| weighted kNN top-1 | 6 | " in "\n".join(md) and "features of 50 training images" in md[2]
    assert "![monitors and probes vs step](fig.png)" in md
    assert monitor_study(tmp_path, runs, "fig.png") == md  # and its json and figure
    assert json.loads((tmp_path / "monitor_study.json").read_text())["points"][2]["knn_top1"] == 35.0
    assert (tmp_path / "fig.png").stat().st_size > 0
    doc = tmp_path / "results.md"
    doc.write_text("# results\n\ntext\n")
    put_section(doc, ["one"])
    put_section(doc, ["two"])  # replaced, not appended twice
    assert doc.read_text() == f"# results\n\ntext\n\n{BEGIN}\ntwo\n{END}\n"


def test_checkpoint_jobs_probe_the_kept_checkpoints_before_the_final(tmp_path):
    from pipeline.checkpoint_jobs import jobs_checkpoints, kept_checkpoints
    from pipeline.context import Context
    from pipeline.presets import PRESETS

    for name in ("checkpoint-3.pth", "checkpoint-1.pth", "checkpoint-last.pth", "checkpoint-best.pth"):
        (tmp_path / name).touch()
    assert kept_checkpoints(tmp_path) == [(2, tmp_path / "checkpoint-1.pth"), (4, tmp_path / "checkpoint-3.pth")]

    cfg = json.loads(json.dumps(PRESETS["study"]))
    assert "--keep_every" in cfg["pretrain"] and "--monitor" in cfg["pretrain"]
    ctx = Context(tmp_path, cfg)
    ctx.results["checkpoints"] = {str(e): {"epochs": e, "step": 87 * e, "final": e == 10} for e in (2, 4, 6, 8, 10)}
    jobs = jobs_checkpoints(ctx)
    assert [j.label for j in jobs] == ["finetune ep4", "linprobe ep2", "linprobe ep4", "linprobe ep6", "linprobe ep8"]
    ft = jobs[0]
    assert ft.args[ft.args.index("--finetune") + 1] == str(tmp_path / "converted" / "classification-ep4.pth")
    assert all(a in ft.args for a in cfg["finetune"]) and all(a in jobs[1].args for a in cfg["linprobe"])
    ft.record({"acc1": 47.5})
    assert ctx.results["checkpoints"]["4"]["fine-tune"] == 47.5
    assert jobs_checkpoints(Context(tmp_path, PRESETS["demo"])) == []  # the demo preset probes no checkpoint


def test_the_generator_puts_the_section_into_the_docs(tmp_path):
    """``tools/monitor_study.py STUDY --docs FILE``: the section between the markers of FILE, its figure beside it."""
    from maecore.errors import UserError
    from pipeline.study_monitor import main

    study = tmp_path / "study"
    for seed, lp in ((0, [25.0, 33.0, 39.0]), (1, [26.0, 31.0, 40.0])):
        run = _run(study, seed, [20.0 + seed, 30.0, 35.0], lp, 45.0)
        (run["dir"] / "results.json").write_text(json.dumps({k: run[k] for k in ("config", "results")}))
    docs = tmp_path / "docs" / "results.md"
    docs.parent.mkdir()
    docs.write_text(f"# results\n\n{BEGIN}\nnot measured yet\n{END}\n\n## after\n")
    main([str(study), "--docs", str(docs)])
    text = docs.read_text()
    assert "not measured yet" not in text and text.endswith(f"{END}\n\n## after\n")
    assert "| weighted kNN top-1 | 6 | " in text and "](results_monitor.png)" in text
    assert (docs.parent / "results_monitor.png").read_bytes() == (study / "monitor_study.png").read_bytes()
    assert BEGIN in (study / "results.md").read_text()
    with pytest.raises(UserError, match="no seed under"):
        main([str(tmp_path / "docs")])
