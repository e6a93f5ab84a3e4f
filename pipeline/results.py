"""The study preset's aggregate report: every row's mean ± std over seeds, and metric-vs-steps curves.

Reads the per-seed demo runs (``<study>/seed<N>/results.json`` and each stage's ``log.jsonl``) and writes
``<study>/results.md`` + ``<study>/curves.png``: the reference logs users of the official code ask for
(``docs/results.md`` is a committed copy).  Nothing here trains; it only reads what the runs logged.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from maecore.engine import read_log
from pipeline.plan import STAGE_NAMES, machine_line, partial_label  # the demo's own line: same machine facts

AXIS_LABELS = {"acc1": "top-1 (%)", "bbox/AP": "box AP (%)", "segm/AP": "mask AP (%)", "mIoU": "mIoU (%)",
               "loss": "training loss"}


def curve_panels(cfg: dict) -> list[tuple[str, str, str]]:
    """(row label as in results.json, stage directory pattern, log key): where each row's curve is logged; the
    partial fine-tuning rows as the run's config has them."""
    partial = [(partial_label(k), f"partial/tune{k:g}-{{init}}", "acc1") for k in cfg.get("partial_blocks", [1.0])]
    return [
        ("linear probe", "linprobe/linprobe-{init}", "acc1"),
        *partial,
        ("fine-tune", "finetune/finetune-{init}", "acc1"),
        ("detection (box AP)", "detection/{init}", "bbox/AP"),
        ("detection (mask AP)", "detection/{init}", "segm/AP"),
        ("segmentation (mIoU)", "segmentation/{init}", "mIoU"),
    ]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(m: float, s: float) -> str:
    return "–" if math.isnan(m) else f"{m:.1f} ± {s:.1f}"


def load_runs(run_dirs: list[Path]) -> list[dict]:
    runs = []
    for d in run_dirs:
        f = d / "results.json"
        if f.exists():
            runs.append({"dir": d, **json.loads(f.read_text())})
    return runs


def aggregate(runs: list[dict]) -> list[dict]:
    """One record per row label: per-init values over seeds, mean/std, and the per-seed MAE − random."""
    labels = list(dict.fromkeys(k.split("|")[0] for r in runs for k in r["results"].get("rows", {})))
    out = []
    for label in labels:
        rec: dict = {"label": label, "inits": {}}
        for init in ("mae", "random"):
            vals = [r["results"]["rows"].get(f"{label}|{init}", {}).get("value") for r in runs]
            vals = [float(v) for v in vals if v is not None]
            if vals:
                rec["inits"][init] = {"values": vals, "mean_std": _mean_std(vals)}
            cells = [r["results"]["rows"].get(f"{label}|{init}", {}) for r in runs]
            rec.setdefault("metric", next((c["metric"] for c in cells if c.get("metric")), ""))
        diffs = []
        for r in runs:
            rows = r["results"]["rows"]
            a, b = rows.get(f"{label}|mae", {}).get("value"), rows.get(f"{label}|random", {}).get("value")
            if a is not None and b is not None:
                diffs.append(float(a) - float(b))
        rec["diff"] = _mean_std(diffs) if diffs else (math.nan, math.nan)
        out.append(rec)
    return out


def curves_png(runs: list[dict], png: Path, title: str | None = None) -> bool:
    """Metric vs optimizer steps per row: the mean over seeds, a band from the lowest to the highest seed (``title``
    above them; by default the number of seeds).  Returns whether any run logged a step (else nothing is written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maecore.figures import save_figure

    panels = [("pretraining loss", "pretrain", "loss", "train")] + [
        (lab, pat, key, "eval") for lab, pat, key in curve_panels(runs[0].get("config", {}) if runs else {})]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(len(panels) / cols)),
                             dpi=100, squeeze=False)
    for ax, (label, pattern, key, kind) in zip(axes.flat, panels):
        for init, style in (("mae", "-"), ("random", "--")):
            series = []
            for r in runs:
                log = [x for x in read_log(Path(r["dir"]) / pattern.format(init=init), kind) if key in x]
                if log:
                    series.append({x["step"]: float(x[key]) for x in log})
            if not series or (kind == "train" and init == "random"):
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            ys = [[s[t] for s in series] for t in steps]
            ax.plot(steps, [statistics.fmean(y) for y in ys], style, marker="o", markersize=2.5,
                    label=f"{init} init" if kind == "eval" else None)
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(AXIS_LABELS.get(key, key))
        ax.grid(alpha=0.3)
        if kind == "eval" and ax.get_lines():
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not any(ax.get_lines() for ax in axes.flat):
        plt.close(fig)
        return False
    fig.suptitle(title or f"mean over {len(runs)} seeds (band: lowest to highest seed)", fontsize=10)
    save_figure(fig, png)
    return True


def write_results(out: Path, run_dirs: list[Path], command: str | None = None) -> Path:
    """``<out>/results.md`` + ``<out>/curves.png`` from the finished per-seed runs; returns the .md path."""
    runs = [r for r in load_runs(run_dirs) if r.get("results", {}).get("rows")]
    recs = aggregate(runs)
    seeds = [r["config"].get("seed", 0) for r in runs]
    command = command or f"python tools/demo.py --preset study --output {out}"
    lines = [
        "# Reference results: the demo pipeline over seeds",
        "",
        f"Command: `{command}` (each seed's full run is under `{out}/seed<N>/`; its report.md has the per-stage commands).",
        "",
        f"Seeds (training; the synthetic world is the same for all): {', '.join(map(str, seeds))}. "
        "Values are the final-epoch numbers on the val split, mean ± sample std over the seeds; MAE − random is the "
        "mean ± std of the per-seed differences.  Top-1, AP and mIoU in %.",
        "",
        machine_line(runs[0].get("config", {}) if runs else {}),
        "",
        "| task | metric | MAE init | random init | MAE − random | per seed (MAE / random) |",
        "|---|---|---|---|---|---|",
    ]
    for rec in recs:
        mae, rnd = rec["inits"].get("mae"), rec["inits"].get("random")
        per_seed = " · ".join(
            f"{a:.1f} / {b:.1f}" if b is not None else f"{a:.1f}"
            for a, b in zip(mae["values"] if mae else [], (rnd["values"] if rnd else []) + [None] * len(runs))
        )
        lines.append(f"| {rec['label']} | {rec['metric']} | {_fmt(*mae['mean_std']) if mae else '–'} | "
                     f"{_fmt(*rnd['mean_std']) if rnd else '–'} | {_fmt(*rec['diff'])} | {per_seed} |")
    # a seed's wall time only where every stage's time is on record (a rerun of some stages keeps the others')
    walls = [sum(r["stage_wall_s"].values()) for r in runs if set(r.get("stage_wall_s", {})) >= set(STAGE_NAMES)]
    pre = [r["results"].get("pretrain", {}) for r in runs]
    lines += [
        "",
        f"Pretraining: {pre[0].get('steps', '?') if pre else '?'} steps per seed; last logged loss "
        + ("{:.3f} ± {:.3f}".format(*_mean_std([p.get("last_loss") for p in pre])) if pre else "–") + ".  "
        + (f"Wall time per seed: {', '.join(f'{w / 60:.1f}' for w in walls)} min." if len(walls) == len(runs) else ""),
        "",
        "![metric vs steps](curves.png)",
        "",
    ]
    if runs:
        curves_png(runs, out / "curves.png")
    md = out / "results.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[8:8 + 2 + len(recs)]), flush=True)
    print(f"\nstudy: {md}", file=sys.stderr)
    return md
