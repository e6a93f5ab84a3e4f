"""The demo report's content, built once from a run's results and rendered twice: ``report.md`` (pipeline.report)
and ``report.html`` (pipeline.report_html).  Every number, sentence, figure and command of the report is decided
here; the renderers only lay it out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.context import Context, dense_inits
from pipeline.monitor_figure import MONITOR_KEYS, MONITOR_PNG
from pipeline.plan import machine_line
from pipeline.results import curves_png

TITLE = "MAE toolkit demo report"
CURVES_PNG = "transfer_curves.png"  # the run's metric-vs-steps curves, beside report.md

ROW_STAGES = (("linear probe", "linprobe"), ("partial", "partial"), ("fine-tune", "finetune"), ("detection", "detection"),
              ("segmentation", "segmentation"))


def row_order(key: str, inits: list[str]) -> tuple[int, int]:
    """Sort key of a results row ``"<task>|<init>"``: its task in the paper's order (``ROW_STAGES``, not the order the
    stages run in), then its init (the sort is stable within)."""
    task, init = key.split("|")
    row = next((i for i, (prefix, _) in enumerate(ROW_STAGES) if task.startswith(prefix)), len(ROW_STAGES))
    return row, inits.index(init) if init in inits else len(inits)


def row_stage(task: str) -> str | None:
    """The stage whose commands produced a table row (``"partial fine-tune, last MLP"`` -> ``"partial"``)."""
    return next((stage for prefix, stage in ROW_STAGES if task.startswith(prefix)), None)


def _fmt(v: float | None) -> str:
    """Every task reports percentages (top-1, AP, mIoU); NaN/None shows as a dash."""
    return "–" if v is None or v != v else f"{v:.1f}"


def top1_se(pct: float, n: int) -> float:
    """Standard error, in points, of a top-1 accuracy ``pct`` measured on ``n`` images (binomial)."""
    p = min(max(pct / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


@dataclass
class Table:
    """The results table as text cells; ``keys[r][c]`` is the results.json row (``"task|init"``) behind cell ``c`` of
    row ``r`` (None for the other cells), ``stages[r]`` the stage whose commands made row ``r``."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    keys: list[list[str | None]] = field(default_factory=list)
    stages: list[str | None] = field(default_factory=list)


@dataclass
class FigureGroup:
    """Figures under one title (None: a figure on its own); ``images`` are (alt text, path relative to the run)."""

    title: str | None
    images: list[tuple[str, str]]


@dataclass
class Report:
    title: str
    intro: list[str]  # one paragraph, in lines; inline code in `backticks`
    machine: str
    table: Table
    figures: list[FigureGroup]
    commands: list[tuple[str, str]]  # (stage, exact command), in stage order


def results_table(rows: dict[str, dict], inits: list[str]) -> Table:
    """The report's table: each init's value (± its standard error where one is known: top-1 on n images), the
    MAE − random difference (with '(> 2 SE)' when it is beyond two standard errors of the difference), the
    number of val images, wall times.  AP and mIoU have no closed-form error: their noise is the seed spread of
    the study preset."""
    tasks = list(dict.fromkeys(k.split("|")[0] for k in rows))
    table = Table(["task", "metric", *(f"{i} init" for i in inits), "MAE − random", "val images", "wall time (s)"])
    for t in tasks:
        cells = [rows.get(f"{t}|{i}") for i in inits]
        metric = next(c["metric"] for c in cells if c)
        ses = [top1_se(c["value"], c["n"]) if c and metric == "top-1" and c.get("n") and c.get("value") is not None else None
               for c in cells]
        vals = [_fmt(c["value"] if c else None) + (f" ± {se:.1f}" if se is not None else "") for c, se in zip(cells, ses)]
        try:
            i_mae, i_rnd = inits.index("mae"), inits.index("random")
            diff = float(cells[i_mae]["value"]) - float(cells[i_rnd]["value"])  # type: ignore[index]
            delta = f"{diff:+.1f}"
            if ses[i_mae] is not None and ses[i_rnd] is not None:
                se_diff = math.hypot(ses[i_mae], ses[i_rnd])
                delta += " (> 2 SE)" if abs(diff) > 2 * se_diff else f" (< 2 SE = {2 * se_diff:.1f})"
        except (ValueError, IndexError, TypeError, KeyError):
            delta = "–"
        n = next((c.get("n") for c in cells if c and c.get("n")), None)
        walls = " / ".join(f"{c['wall_s']:.0f}" for c in cells if c)
        table.rows.append([t, metric, *vals, delta, str(int(n)) if n else "–", walls])
        table.keys.append([None, None, *(f"{t}|{i}" if c else None for i, c in zip(inits, cells)), None, None, None])
        table.stages.append(row_stage(t))
    return table


def transfer_curves(ctx: Context) -> str | None:
    """Draw this run's metric-vs-steps curves (every transfer run's val metric, MAE and random init, and the
    pretraining loss) into the run folder; returns their path relative to it, None where no run logged a step."""
    png = ctx.out / CURVES_PNG
    if not curves_png([{"dir": ctx.out, "config": ctx.cfg}], png,
                      title="this run: val metric vs optimizer step (pretraining: training loss)"):
        return None
    return CURVES_PNG


def monitor_sentence(monitor: dict | None) -> list[str]:
    """The intro's line on the pretraining monitors (``results["pretrain"]["monitor"]``): each value from the
    random-initialised network (step 0) to the last measurement; nothing without ``--monitor``."""
    if not monitor:
        return []
    first, last = monitor["first"], monitor["last"]
    names = {"knn_top1": "weighted kNN top-1", "linear_top1": "online linear top-1", "rankme": "RankMe"}
    parts = [f"{names[k]} {first[k]:.1f} -> {last[k]:.1f}" for k, _, _ in MONITOR_KEYS if k in first and k in last]
    if not parts:
        return []
    return [f" Pretraining monitors (`--monitor`, unmasked features): {', '.join(parts)} from the random-initialised"
            f" network (step {first['step']}) to step {last['step']}."]


def build_report(ctx: Context, curves: str | None = None) -> Report:
    """The report of the run in ``ctx`` (its results, config and commands); ``curves``: the metric-vs-steps figure
    (``transfer_curves``), relative to the run folder."""
    pre = ctx.results.get("pretrain", {})
    train_dir = ctx.world / "imagenet" / "train"
    n_cls = sum(1 for d in train_dir.iterdir() if d.is_dir()) if train_dir.is_dir() else 0
    chance = f" Chance level: {100 / n_cls:.1f} % top-1 ({n_cls} classes)." if n_cls else ""
    intro = [
        f"Pretraining: loss {pre.get('first_loss', float('nan')):.4f} -> {pre.get('last_loss', float('nan')):.4f} over "
        f"{pre.get('steps', '?')} steps ({pre.get('wall_s', 0):.0f} s). Transfer, each from the converted MAE "
        "checkpoint and from random initialisation with the same budget (final-epoch numbers, val split; "
        f"AP and mIoU in %).{chance} ± is one standard error of a top-1 number (binomial over the val images);"
        " AP and mIoU carry no closed-form error: the study preset's seed spread is their noise.",
        *([f" Detection and segmentation ran from {' and '.join(dense_inits(ctx))} init only: both inits do not fit"
           " the preset's budget (`--preset study` runs them, docs/results.md has its numbers)."]
          if set(dense_inits(ctx)) != set(ctx.cfg["inits"]) else []),
    ]
    intro += monitor_sentence(pre.get("monitor"))
    figures = [FigureGroup(None, [("pretraining loss", "pretrain_loss.png")])]
    if (ctx.out / MONITOR_PNG).is_file():
        figures.append(FigureGroup(None, [("pretraining monitors vs step", MONITOR_PNG)]))
    figures.append(FigureGroup(None, [("reconstructions", "reconstruction.png")]))
    if curves:
        figures.append(FigureGroup(None, [("metric vs optimizer step", curves)]))
    for title, rel in [("detection predictions (MAE init)", "detection/mae/predictions.png"),
                       ("segmentation predictions (MAE init)", "segmentation/mae/vis")]:
        p = ctx.out / rel
        if p.is_dir():
            pngs = sorted(p.glob("*.png"))[:4]
            figures.append(FigureGroup(title, [(title, str(x.relative_to(ctx.out))) for x in pngs]))
        elif p.exists():
            figures.append(FigureGroup(title, [(title, rel)]))
    return Report(TITLE, intro, machine_line(ctx.cfg), results_table(ctx.results.get("rows", {}), ctx.cfg["inits"]),
                  figures, [(stage, cmd) for stage, cmd in ctx.commands])
