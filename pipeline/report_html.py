"""``report.html``: the demo report as one self-contained page, from the same ``Report`` as ``report.md``.

Every figure is embedded (a ``data:`` URI: the page opens from anywhere, mailed or copied alone, with no network);
every text is escaped; a little CSS, no script.  Each value cell of the table carries the results.json row it shows
(``data-row="task|init"``) and each task links to the commands of its stage.
"""

from __future__ import annotations

import base64
import html
import struct
from pathlib import Path

from pipeline.report_data import Report, Table

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0 auto;
       max-width: 1180px; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 12px; }
h2 { font-size: 20px; margin: 32px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 20px 0 6px; }
p.machine { background: #f4f6f8; border-left: 4px solid #8aa4c0; padding: 8px 12px; font-size: 14px; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d0d4d9; padding: 5px 10px; text-align: right; white-space: nowrap; }
th { background: #eef1f4; }
th:first-child, td:first-child, td:nth-child(2) { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { font-size: 13px; color: #555; }
p.missing { color: #a33; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 8px 10px; white-space: pre-wrap; overflow-x: auto;
      margin: 4px 0 10px; }
pre span.w { white-space: nowrap; }
"""


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def inline(text: str) -> str:
    """Escaped text, with `backticked` spans as <code> (the one markup the report's prose uses)."""
    parts = str(text).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: plain text
        return _e(text)
    return "".join(f"<code>{_e(p)}</code>" if i % 2 else _e(p) for i, p in enumerate(parts))


def stage_anchor(stage: str) -> str:
    return "stage-" + "".join(c if c.isalnum() else "-" for c in stage)


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def embed(path: Path, alt: str) -> str:
    """``<img>`` with the file inlined as a data: URI (its pixel size given, so the page does not reflow)."""
    data = path.read_bytes()
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    size = _png_size(data)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return f'<img src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}" alt="{_e(alt)}"{dims}>'


def html_table(table: Table, stages: set[str]) -> list[str]:
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in table.header) + "</tr></thead>", "<tbody>"]
    for row, keys, stage in zip(table.rows, table.keys, table.stages):
        cells = []
        for c, (text, key) in enumerate(zip(row, keys)):
            body = _e(text)
            if c == 0 and stage in stages:
                body = f'<a href="#{stage_anchor(stage)}">{body}</a>'
            attr = f' data-row="{_e(key)}"' if key else ""
            cells.append(f"<td{attr}>{body}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return [*out, "</tbody>", "</table>"]


def command_block(cmd: str) -> str:
    """A command in ``<pre>``, wrapped between words only (``--overwrite`` never splits at its dashes); the text, and
    so a copy of it, is the command as run."""
    return "<pre>" + " ".join(f'<span class="w">{_e(w)}</span>' for w in cmd.split(" ")) + "</pre>"


def render_html(rep: Report, run_dir: Path) -> str:
    """The page; figures are read from ``run_dir`` (a missing one is named, not linked)."""
    stages = list(dict.fromkeys(stage for stage, _ in rep.commands))
    body = [f"<h1>{_e(rep.title)}</h1>", "<p>" + "".join(inline(line) for line in rep.intro) + "</p>",
            f'<p class="machine">{inline(rep.machine)}</p>', "<h2>Results</h2>", *html_table(rep.table, set(stages)),
            "<h2>Figures</h2>"]
    for group in rep.figures:
        if group.title is not None:
            body.append(f"<h3>{_e(group.title)}</h3>")
        for alt, rel in group.images:
            path = run_dir / rel
            if path.is_file():
                body.append(f"<figure>{embed(path, alt)}<figcaption>{_e(alt)} ({_e(rel)})</figcaption></figure>")
            else:
                body.append(f'<p class="missing">figure missing: {_e(rel)}</p>')
    body += ["<h2>Commands</h2>", "<p>Each row's exact command (run from the repository root):</p>"]
    for stage in stages:
        body.append(f'<h3 id="{stage_anchor(stage)}">{_e(stage)}</h3>')
        body += [command_block(cmd) for s, cmd in rep.commands if s == stage]
    head = ['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{_e(rep.title)}</title>",
            f"<style>{CSS}</style>", "</head>", "<body>"]
    return "\n".join([*head, *body, "</body>", "</html>"]) + "\n"
