"""The demo's report.html: rendered from the same data as report.md (every cell, figure and command of the one is
in the other, all text escaped), and, from a smoke run, opened in headless Chromium (the Debian package ``chromium``;
``.ci/run`` installs it), where every image must load and every row of results.json must be in the table.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands in on fd 3, replies
out on fd 4, JSON messages ended by a NUL byte): no port, no network, no Python package beyond the standard library.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


# ---- the page against report.md, without a browser ----------------------------------------------------------------
def _png(path: Path, w: int = 3, h: int = 2) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), "red").save(path)


def test_html_has_what_the_markdown_has_escaped_and_embedded(tmp_path):
    from pipeline.context import Context
    from pipeline.report import stage_report

    out = tmp_path / "run"
    for rel in ("pretrain_loss.png", "pretrain_monitor.png", "reconstruction.png", "detection/mae/predictions.png",
                "segmentation/mae/vis/a.png"):
        _png(out / rel)
    ctx = Context(out, {"inits": ["mae", "random"], "dense_inits": ["mae"], "world": {}})
    monitor = {"first": {"step": 0, "knn_top1": 14.31, "rankme": 3.0}, "last": {"step": 10, "knn_top1": 30.0, "rankme": 9.5}}
    ctx.results = {"pretrain": {"first_loss": 1.5, "last_loss": 0.5, "steps": 10, "wall_s": 3.0, "monitor": monitor}, "rows": {
        "linear probe|mae": {"metric": "top-1", "value": 40.0, "wall_s": 5.0, "n": 100},
        "linear probe|random": {"metric": "top-1", "value": 20.0, "wall_s": 6.0, "n": 100},
        "segmentation <b>(mIoU)</b>|mae": {"metric": "mIoU & co", "value": 19.6, "wall_s": 7.0, "n": 5}}}
    ctx.commands = [("pretrain", "python -m pretrain --output_dir 'a <dir>' --note \"x&y\""),
                    ("linprobe", "python -m classification --seed 0 --overwrite")]
    stage_report(ctx)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text(encoding="utf-8")
    import html

    cells = [c.strip() for line in md.splitlines() if line.startswith("| ") for c in line.strip("|").split(" | ")]
    assert "40.0 ± 4.9" in cells and "+20.0 (> 2 SE)" in cells and "19.6" in cells
    assert all(html.escape(c) in page for c in cells)
    assert 'data-row="linear probe|random">20.0 ± 4.0<' in page
    assert "<b>" not in page and "segmentation &lt;b&gt;(mIoU)&lt;/b&gt;" in page and "mIoU &amp; co" in page
    for _, cmd in ctx.commands:  # each command as run, between the page's word-wrapping spans
        words = [html.escape(w) for w in cmd.split(" ")]
        assert '<span class="w">' + '</span> <span class="w">'.join(words) + "</span>" in page
    assert page.count("<img ") == 5 == page.count('src="data:image/png;base64,') and ' href="http' not in page
    line = "weighted kNN top-1 14.3 -> 30.0, RankMe 3.0 -> 9.5 from the random-initialised network (step 0) to step 10."
    assert line in md and html.escape(line) in page and "![pretraining monitors vs step](pretrain_monitor.png)" in md
    assert "<script" not in page and "--preset study</code>" in page  # the markdown's `code` stays code
    assert next(line for line in md.splitlines() if line.startswith("Machine:")) in html.unescape(page)


# ---- the smoke run's page in Chromium -----------------------------------------------------------------------------
def find_chromium() -> str | None:
    for name in (os.environ.get("MAE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (exe := shutil.which(name)):
            return exe
    return None


# puts the pipe ends on fds 3 and 4 and becomes Chromium (a shell can't: dash redirects one-digit fds only)
LAUNCH = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); os.close(r); "
          "os.close(w); os.execv(sys.argv[3], sys.argv[3:])")


class Chromium:
    """Headless Chromium on a DevTools pipe; ``call`` sends one command and returns its result."""

    def __init__(self, exe: str, profile: Path, timeout: float = 30.0) -> None:
        self.timeout, self._id, self._buf = timeout, 0, b""
        cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads them on fd 3
        self._res_r, res_w = os.pipe()  # Chromium writes on fd 4, we read
        cmd_r, res_w = (self._high(fd) for fd in (cmd_r, res_w))  # 5 and up: see _high
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                 "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1280,2000",
                 "about:blank"]
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCH, str(cmd_r), str(res_w), exe, *flags],
                                     pass_fds=(cmd_r, res_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        os.close(cmd_r)
        os.close(res_w)
        self.events: list[dict] = []

    @staticmethod
    def _high(fd: int) -> int:
        """``fd`` moved to 5 or above: the launcher's dup2 onto 3 and 4 then clobbers neither pipe end."""
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
        os.close(fd)
        return high

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._res_r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed its DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            if hit := next((e for e in self.events if e.get("method") == method), None):
                self.events.remove(hit)
                return hit
            self.events.append(self._message(deadline))

    def close(self) -> str:
        """Stop Chromium (Browser.close, then kill); returns its stderr's first lines (a failed start's reason)."""
        try:
            self.call("Browser.close")
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        os.close(self._cmd_w)
        os.close(self._res_r)
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip() and "dbus" not in ln]
        return " / ".join(lines[:2])


PAGE_FACTS = """(() => {
  const imgs = [...document.images].map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0,
                                              data: i.src.startsWith('data:image/')}));
  const cells = [...document.querySelectorAll('td[data-row]')].map(td => [td.dataset.row, td.textContent]);
  const linked = [...document.querySelectorAll('[src], [href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
    .filter(u => !u.startsWith('data:') && !u.startsWith('#'));
  const pres = [...document.querySelectorAll('pre')].map(p => p.textContent);
  return JSON.stringify({imgs, cells, linked, pres, text: document.body.innerText,
                         resources: performance.getEntriesByType('resource').map(e => e.name)});
})()"""


@pytest.fixture
def chromium(tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (the Debian package `chromium`; .ci/run installs it)")
    browser = Chromium(exe, tmp_path / "profile")
    try:
        browser.call("Browser.getVersion")
    except Exception as e:  # noqa: BLE001 - any failure to start is a skip with its reason
        err = browser.close()
        pytest.skip(f"chromium cannot start ({exe}): {e}" + (f"; it said: {err}" if err else ""))
    yield browser
    browser.close()


def open_page(browser: Chromium, page: Path) -> dict:
    """Load ``page`` in a fresh tab; what the loaded page shows (images, table cells, commands, links)."""
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    browser.call("Page.enable", session=session)
    browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
    browser.wait_event("Page.loadEventFired")
    res = browser.call("Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True}, session=session)
    return json.loads(res["result"]["value"])


@pytest.mark.slow
def test_smoke_report_html_in_chromium(chromium, smoke_demo):
    out, p = smoke_demo  # `tools/demo.py --preset smoke --output OUT`, shared with test_demo
    assert p.returncode == 0, p.stderr[-3000:]
    facts = open_page(chromium, out / "report.html")
    saved = json.loads((out / "results.json").read_text())

    # every figure embedded and decoded; nothing fetched from outside the page
    alts = [i["alt"] for i in facts["imgs"]]
    assert {"pretraining loss", "pretraining monitors vs step", "reconstructions", "metric vs optimizer step",
            "detection predictions (MAE init)", "segmentation predictions (MAE init)"} <= set(alts), alts
    assert all(i["loaded"] and i["data"] for i in facts["imgs"]), facts["imgs"]
    assert facts["linked"] == [] and [r for r in facts["resources"] if not r.startswith("data:")] == []

    # every row of results.json in the table, with its value
    cells = dict(facts["cells"])
    assert set(cells) == set(saved["results"]["rows"])
    for key, row in saved["results"]["rows"].items():
        assert cells[key].startswith(f"{row['value']:.1f}"), (key, cells[key])

    # every command as run, the machine and precision line, the same line as report.md
    assert [c for _, c in saved["commands"]] == facts["pres"]
    machine = next(ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("Machine:"))
    assert machine in facts["text"] and "precision:" in machine
