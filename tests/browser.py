"""A real headless Chromium for the report tests: installed from Debian when missing (as
root, like tests/cluster/slurm.py installs SLURM), then run once per page.

``render`` loads a copy of the page with a probe appended that, on load, writes what the
tests check (page and window widths, every image's load state) as JSON into an element;
``--dump-dom`` prints the document after that script ran, so the JSON comes back in it.
"""

from __future__ import annotations

import fcntl
import html as html_lib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BINARY = "chromium"
_INSTALL_LOCK = Path("/tmp/trd-hpc-chromium-install.lock")
WINDOW = (1280, 900)
# No network, no profile state, nothing a fresh container lacks (GPU, sandbox namespaces).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)

PROBE = """
<script>
window.addEventListener("load", function () {
  var d = document.documentElement;
  var cells = function (row) {
    return Array.from(row.cells).map(function (c) { return {tag: c.tagName.toLowerCase(), text: c.textContent}; });
  };
  var summary = document.querySelector("table[data-table=summary]");
  var figure = document.querySelector("figure");
  var out = document.createElement("pre");
  out.id = "probe-result";
  out.textContent = JSON.stringify({
    scrollWidth: d.scrollWidth,
    innerWidth: window.innerWidth,
    images: Array.from(document.images).map(function (i) {
      return {complete: i.complete, naturalWidth: i.naturalWidth, width: i.getBoundingClientRect().width};
    }),
    tables: Array.from(document.querySelectorAll("table[data-table]")).map(function (t) {
      return {
        kind: t.dataset.table,
        caption: t.caption ? t.caption.textContent : "",
        header: t.tHead ? cells(t.tHead.rows[0]) : [],
        rows: Array.from(t.tBodies[0].rows).map(cells)
      };
    }),
    summaryBeforeFigures: !!(summary && figure &&
      (summary.compareDocumentPosition(figure) & Node.DOCUMENT_POSITION_FOLLOWING))
  });
  document.body.appendChild(out);
});
</script>
"""


class BrowserError(RuntimeError):
    pass


def chromium_path() -> str | None:
    return shutil.which(BINARY)


def ensure_installed(timeout: float = 600.0) -> str:
    """Chromium's path, after ``apt-get install -y chromium`` when it is missing (root only;
    ~1-2 min on a fresh Debian 12). BrowserError says why it could not be had."""
    found = chromium_path()
    if found:
        return found
    if os.geteuid() != 0:
        raise BrowserError("chromium is not installed and this is not root: cannot apt-get install it")
    if shutil.which("apt-get") is None:
        raise BrowserError("chromium is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + timeout
    with open(_INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes must not run apt at once
        try:
            if chromium_path():  # another process installed it meanwhile
                return chromium_path()
            for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", BINARY]):
                left = max(1.0, deadline - time.monotonic())
                try:
                    res = subprocess.run(
                        cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=left
                    )
                except subprocess.TimeoutExpired:
                    raise BrowserError(f"{' '.join(cmd)} timed out after {left:.0f}s") from None
                if res.returncode != 0:
                    raise BrowserError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr[-1500:]}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    found = chromium_path()
    if not found:
        raise BrowserError("chromium still missing after apt-get install")
    return found


@dataclass
class Rendered:
    screenshot: Path
    scroll_width: int
    inner_width: int
    images: list[dict]
    tables: list[dict]  # {kind, caption, header: [cell], rows: [[cell]]}, cell {tag, text}
    summary_before_figures: bool


def _run(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    # a fresh profile per call: no state carried from another test or an earlier run
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        try:
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"chromium timed out after {timeout:.0f}s: {' '.join(cmd[-2:])}") from None
    if res.returncode != 0:
        raise BrowserError(f"chromium failed ({res.returncode}): {res.stderr[-2000:]}")
    return res


def render(binary: str, page: Path, out_dir: Path, timeout: float = 120.0) -> Rendered:
    """Screenshot ``page`` at 1280 px, and measure it with the probe (on a copy of the page)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / f"{page.stem}.png"
    _run(binary, [f"--screenshot={shot}", page.resolve().as_uri()], timeout)
    probed = out_dir / f"{page.stem}.probe.html"
    html = page.read_text()
    probed.write_text(html.replace("</body>", PROBE + "</body>", 1) if "</body>" in html else html + PROBE)
    res = _run(binary, ["--dump-dom", "--virtual-time-budget=10000", probed.resolve().as_uri()], timeout)
    m = re.search(r'<pre id="probe-result">(.*?)</pre>', res.stdout, re.S)
    if not m:
        raise BrowserError(f"the probe wrote nothing into the page: {res.stdout[-500:]!r} {res.stderr[-1000:]}")
    info = json.loads(html_lib.unescape(m.group(1)))
    return Rendered(
        shot,
        info["scrollWidth"],
        info["innerWidth"],
        info["images"],
        info["tables"],
        info["summaryBeforeFigures"],
    )
