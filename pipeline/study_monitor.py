"""Issue #26 item 6: across the study's kept pretraining checkpoints and its seeds, how well do the monitor's numbers
at a checkpoint (weighted kNN, online linear classifier, RankMe) predict that checkpoint's linear-probe and fine-tune
top-1?  Nothing here trains: it joins what the runs logged (``results["checkpoints"]`` of pipeline.checkpoint_jobs,
the demo's final rows, the pretraining's ``monitor`` records at the same step) and computes Pearson and Spearman
correlations over all (seed, checkpoint) points.

:func:`monitor_study` writes ``<study>/monitor_study.json`` and ``monitor_study.png`` and returns the markdown
section that the study's ``results.md`` ends with; ``python tools/monitor_study.py <study> --docs docs/results.md``
puts the same section (and the figure) into the docs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.monitor_figure import MONITOR_KEYS, monitor_records

PREDICTORS = tuple(k for k, _, _ in MONITOR_KEYS)  # knn_top1, linear_top1, rankme
TARGETS = ("linear probe", "fine-tune")
NAMES = {"knn_top1": "weighted kNN top-1", "linear_top1": "online linear top-1", "rankme": "RankMe"}
PNG = "monitor_study.png"
BEGIN, END = "<!-- monitor-study:begin (tools/monitor_study.py writes this part) -->", "<!-- monitor-study:end -->"


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def pearson(x, y) -> float:
    """Pearson's r of two equal-length sequences; NaN for fewer than 3 points or a constant one."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"lengths differ: {len(x)} and {len(y)}")
    if len(x) < 3:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / den if den > 0 else math.nan


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of the ranks (ties: mean ranks)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return pearson(_ranks(x), _ranks(y)) if len(x) == len(y) and len(x) >= 3 else pearson(x, y)


def checkpoint_points(run: dict) -> list[dict]:
    """One point per kept checkpoint of one seed's run (``{"dir", "results", "config"}``, as pipeline.results loads
    it): seed, epochs, step, the monitor's values at that step and the probes' top-1 (None where not run)."""
    res = run.get("results", {})
    rows = res.get("rows", {})
    monitor = {int(r["step"]): r for r in monitor_records(Path(run["dir"]) / "pretrain")}
    points = []
    for c in sorted(res.get("checkpoints", {}).values(), key=lambda c: c["step"]):
        p = {"seed": run.get("config", {}).get("seed", 0), "epochs": c["epochs"], "step": c["step"]}
        rec = monitor.get(c["step"], {})
        p.update({k: rec.get(k) for k in PREDICTORS})
        p["subset"] = rec.get("subset")  # {"bank": N, "queries": M}: the images the monitor measured on
        for target in TARGETS:
            p[target] = rows.get(f"{target}|mae", {}).get("value") if c.get("final") else c.get(target)
        points.append(p)
    return points


def correlations(points: list[dict]) -> list[dict]:
    """Per (monitor, target): the points where both are known, their number, Pearson r and Spearman rho."""
    out = []
    for target in TARGETS:
        for key in PREDICTORS:
            pairs = [(p[key], p[target]) for p in points if p.get(key) is not None and p.get(target) is not None]
            xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
            out.append({"monitor": key, "target": target, "n": len(pairs), "pearson": pearson(xs, ys),
                        "spearman": spearman(xs, ys)})
    return out


def _r(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:+.2f}"


def _v(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def section(points: list[dict], corr: list[dict], png: str) -> list[str]:
    """The markdown section: the correlations, every point, the figure."""
    seeds = sorted({p["seed"] for p in points})
    sub = next((p["subset"] for p in points if p.get("subset")), {})
    lines = [
        "## Do the pretraining monitors predict the transfer rows? (issue #26)",
        "",
        f"Every kept pretraining checkpoint of seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}: the "
        "monitor's numbers at its step "
        f"(`--monitor`: unmasked features of {sub.get('bank', '?')} training images as the kNN bank and "
        f"{sub.get('queries', '?')} val images as queries) "
        "against the demo's linear probe and fine-tune from that checkpoint (val top-1). One correlation over all "
        "(seed, checkpoint) points: it mixes progress along training with differences between seeds; n is the "
        "number of points (– where fewer than 3, or one side constant).",
        "",
        "| monitor | → linear probe: n | Pearson r | Spearman ρ | → fine-tune: n | Pearson r | Spearman ρ |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in PREDICTORS:
        lp, ft = (next(c for c in corr if c["monitor"] == key and c["target"] == t) for t in TARGETS)
        lines.append(f"| {NAMES[key]} | {lp['n']} | {_r(lp['pearson'])} | {_r(lp['spearman'])} | {ft['n']} | "
                     f"{_r(ft['pearson'])} | {_r(ft['spearman'])} |")
    lines += ["", "| seed | epochs | step | kNN top-1 | online linear top-1 | RankMe | linear probe | fine-tune |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['seed']} | {p['epochs']} | {p['step']} | {_v(p['knn_top1'])} | {_v(p['linear_top1'])} | "
              f"{_v(p['rankme'])} | {_v(p['linear probe'])} | {_v(p['fine-tune'])} |" for p in points]
    return [*lines, "", f"![monitors and probes vs step]({png})", ""]


def study_png(runs: list[dict], points: list[dict], corr: list[dict], png: Path) -> None:
    """Top: each seed's monitor curves (every measurement) with the probes at the kept checkpoints; bottom: each
    monitor against each probe, one dot per (seed, checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maecore.figures import save_figure

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        seed, c = run.get("config", {}).get("seed", 0), colors[i % len(colors)]
        recs = monitor_records(Path(run["dir"]) / "pretrain")
        mine = [p for p in points if p["seed"] == seed]
        for ax, key in zip(axes[0], PREDICTORS):
            ax.plot([r["step"] for r in recs if key in r], [r[key] for r in recs if key in r], "-o", ms=3, color=c,
                    label=f"seed {seed}")
        for target, mark in zip(TARGETS, ("s", "^")):
            pts = [(p["step"], p[target]) for p in mine if p[target] is not None]
            if pts:
                axes[0][0].plot(*zip(*pts), mark + "--", ms=5, color=c, alpha=0.7,
                                label=f"{target} from the checkpoint" if i == 0 else None)
    for ax, key in zip(axes[0], PREDICTORS):
        ax.set_title(NAMES[key] + (" · probes from the checkpoints" if key == PREDICTORS[0] else ""), fontsize=9)
        ax.set_xlabel("pretraining step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    scatter = [("knn_top1", "linear probe"), ("linear_top1", "linear probe"), ("knn_top1", "fine-tune")]
    for ax, (key, target) in zip(axes[1], scatter):
        c = next(x for x in corr if x["monitor"] == key and x["target"] == target)
        for i, run in enumerate(runs):
            seed = run.get("config", {}).get("seed", 0)
            pts = [(p[key], p[target]) for p in points if p["seed"] == seed and p[key] is not None and p[target] is not None]
            if pts:
                ax.scatter(*zip(*pts), s=18, color=colors[i % len(colors)], label=f"seed {seed}")
        ax.set_title(f"{target} vs {NAMES[key]}: r {_r(c['pearson'])}, ρ {_r(c['spearman'])} (n {c['n']})", fontsize=9)
        ax.set_xlabel(NAMES[key] + " (%)")
        ax.set_ylabel(target + " top-1 (%)")
        ax.grid(alpha=0.3)
    save_figure(fig, png)


def monitor_study(out: Path, runs: list[dict], png_name: str = PNG) -> list[str]:
    """``out/monitor_study.json`` and ``out/<png_name>`` from the seeds' runs; the markdown section (empty when no
    run probed its checkpoints: a study preset without ``checkpoint_study``)."""
    points = [p for run in runs for p in checkpoint_points(run)]
    if not points:
        return []
    corr = correlations(points)
    (out / "monitor_study.json").write_text(json.dumps({"points": points, "correlations": corr}, indent=1))
    study_png(runs, points, corr, out / png_name)
    return section(points, corr, png_name)


def put_section(md: Path, lines: list[str]) -> None:
    """Replace the part of ``md`` between the markers (or append it, markers and all) with ``lines``."""
    text = md.read_text() if md.exists() else ""
    block = "\n".join([BEGIN, *lines, END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    md.write_text(text)


def write_monitor_study(study: Path, run_dirs: list[Path]) -> list[str]:
    """The section from the seeds' runs, put at the end of ``study/results.md`` (written by pipeline.results first);
    returns its lines (none when no run probed its checkpoints)."""
    from pipeline.results import load_runs

    runs = [r for r in load_runs(run_dirs) if r.get("results", {}).get("checkpoints")]
    lines = monitor_study(study, runs)
    if lines:
        put_section(study / "results.md", lines)
    return lines


def main(argv: list[str] | None = None) -> Path:
    """``python tools/monitor_study.py STUDY [--docs docs/results.md]``: the section from a finished study's seeds
    (``STUDY/seed<N>``), into ``STUDY/results.md`` and, with ``--docs``, into that file (its figure beside it as
    ``results_monitor.png``): the numbers are never typed by hand."""
    from maecore.cli import OneLineParser
    from maecore.errors import UserError

    p = OneLineParser(prog="python tools/monitor_study.py", description=main.__doc__)
    p.add_argument("study", type=Path, help="the study's --output folder (runs/study)")
    p.add_argument("--docs", type=Path, help="also put the section into this markdown file (docs/results.md)")
    args = p.parse_args(argv)
    lines = write_monitor_study(args.study, sorted(args.study.glob("seed*"), key=lambda d: d.name))
    if not lines:
        raise UserError(f"no seed under {args.study} probed its pretraining checkpoints (run the study preset: "
                        "python tools/demo.py --preset study --output DIR)")
    print("\n".join(lines))
    if args.docs:
        docs_png = args.docs.parent / "results_monitor.png"
        docs_png.write_bytes((args.study / PNG).read_bytes())
        put_section(args.docs, [ln.replace(f"]({PNG})", f"]({docs_png.name})") for ln in lines])
        print(f"monitor study: {args.docs} and {docs_png}")
    return args.study / "results.md"


def cli(argv: list[str] | None = None) -> None:
    from maecore.cli import run_cli

    run_cli(main, argv)
