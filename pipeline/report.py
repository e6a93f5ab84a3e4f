"""The demo's report: ``report.md`` with the results table (each init's value ± its standard error, the
MAE − random difference), the figures and every row's command; rows in the paper's order."""

from __future__ import annotations

import math

from pipeline.context import Context, dense_inits
from pipeline.plan import machine_line


def _fmt(v: float | None) -> str:
    """Every task reports percentages (top-1, AP, mIoU); NaN/None shows as a dash."""
    return "–" if v is None or v != v else f"{v:.1f}"


def top1_se(pct: float, n: int) -> float:
    """Standard error, in points, of a top-1 accuracy ``pct`` measured on ``n`` images (binomial)."""
    p = min(max(pct / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def results_table(rows: dict[str, dict], inits: list[str]) -> list[str]:
    """The report's table: each init's value (± its standard error where one is known: top-1 on n images), the
    MAE − random difference (with '(> 2 SE)' when it is beyond two standard errors of the difference), the
    number of val images, wall times.  AP and mIoU have no closed-form error: their noise is the seed spread of
    the study preset."""
    tasks = list(dict.fromkeys(k.split("|")[0] for k in rows))
    head = "| task | metric | " + " | ".join(f"{i} init" for i in inits) + " | MAE − random | val images | wall time (s) |"
    lines = [head, "|" + "---|" * (len(inits) + 5)]
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
        lines.append(f"| {t} | {metric} | " + " | ".join(vals) + f" | {delta} | {int(n) if n else '–'} | {walls} |")
    return lines


def stage_report(ctx: Context) -> None:
    pre = ctx.results.get("pretrain", {})
    rows = ctx.results.get("rows", {})
    table = results_table(rows, ctx.cfg["inits"])
    train_dir = ctx.world / "imagenet" / "train"
    n_cls = sum(1 for d in train_dir.iterdir() if d.is_dir()) if train_dir.is_dir() else 0
    chance = f" Chance level: {100 / n_cls:.1f} % top-1 ({n_cls} classes)." if n_cls else ""
    figs = []
    for title, rel in [("detection predictions (MAE init)", "detection/mae/predictions.png"),
                       ("segmentation predictions (MAE init)", "segmentation/mae/vis")]:
        p = ctx.out / rel
        if p.is_dir():
            pngs = sorted(p.glob("*.png"))[:4]
            figs += [f"**{title}**", ""] + [f"![{title}]({x.relative_to(ctx.out)})" for x in pngs] + [""]
        elif p.exists():
            figs += [f"**{title}**", "", f"![{title}]({rel})", ""]
    lines = [
        "# MAE toolkit demo report",
        "",
        f"Pretraining: loss {pre.get('first_loss', float('nan')):.4f} -> {pre.get('last_loss', float('nan')):.4f} over "
        f"{pre.get('steps', '?')} steps ({pre.get('wall_s', 0):.0f} s). Transfer, each from the converted MAE "
        "checkpoint and from random initialisation with the same budget (final-epoch numbers, val split; "
        f"AP and mIoU in %).{chance} ± is one standard error of a top-1 number (binomial over the val images);"
        " AP and mIoU carry no closed-form error: the study preset's seed spread is their noise.",
        *([f" Detection and segmentation ran from {' and '.join(dense_inits(ctx))} init only: both inits do not fit"
           " the preset's budget (`--preset study` runs them, docs/results.md has its numbers)."]
          if set(dense_inits(ctx)) != set(ctx.cfg["inits"]) else []),
        "",
        machine_line(ctx.cfg),
        "",
        *table,
        "",
        "![pretraining loss](pretrain_loss.png)",
        "",
        "![reconstructions](reconstruction.png)",
        "",
        *figs,
        "## Commands",
        "",
        "Each row's exact command (run from the repository root):",
        "",
        "```",
        *[c for _, c in ctx.commands],
        "```",
    ]
    (ctx.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(table))


ROW_STAGES = (("linear probe", "linprobe"), ("partial", "partial"), ("fine-tune", "finetune"), ("detection", "detection"),
              ("segmentation", "segmentation"))


def row_order(key: str, inits: list[str]) -> tuple[int, int]:
    """Sort key of a results row ``"<task>|<init>"``: its task in the paper's order (``ROW_STAGES``, not the order the
    stages run in), then its init (the sort is stable within)."""
    task, init = key.split("|")
    row = next((i for i, (prefix, _) in enumerate(ROW_STAGES) if task.startswith(prefix)), len(ROW_STAGES))
    return row, inits.index(init) if init in inits else len(inits)
