"""The demo's report stage: ``report.md`` and ``report.html`` (one self-contained page: pipeline.report_html), both
rendered from the one ``Report`` that pipeline.report_data builds from the run's results: the results table (each
init's value ± its standard error, the MAE − random difference), the figures and every row's command; rows in the
paper's order."""

from __future__ import annotations

from pipeline.context import Context
from pipeline.report_data import Report, Table, build_report, transfer_curves
from pipeline.report_html import render_html


def markdown_table(table: Table) -> list[str]:
    return ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header),
            *("| " + " | ".join(row) + " |" for row in table.rows)]


def render_markdown(rep: Report) -> str:
    figs: list[str] = []
    for group in rep.figures:
        if group.title is None:
            figs += [f"![{alt}]({rel})" for alt, rel in group.images] + [""]
        else:
            figs += [f"**{group.title}**", ""] + [f"![{alt}]({rel})" for alt, rel in group.images] + [""]
    lines = [
        f"# {rep.title}",
        "",
        *rep.intro,
        "",
        rep.machine,
        "",
        *markdown_table(rep.table),
        "",
        *figs,
        "## Commands",
        "",
        "Each row's exact command (run from the repository root):",
        "",
        "```",
        *[c for _, c in rep.commands],
        "```",
    ]
    return "\n".join(lines) + "\n"


def stage_report(ctx: Context) -> None:
    rep = build_report(ctx, transfer_curves(ctx))
    (ctx.out / "report.md").write_text(render_markdown(rep))
    (ctx.out / "report.html").write_text(render_html(rep, ctx.out), encoding="utf-8")
    print("\n" + "\n".join(markdown_table(rep.table)))
