"""The report renders in a real browser: headless Chromium screenshots it without console errors.

index.html is a static page with embedded PNGs; what can break is the markup (an unclosed tag
swallowing the plots, a broken data URI) or a resource the page tries to load. Chromium's own
console log and DOM dump catch both. Needs Debian's ``chromium`` package
(``apt-get install -y chromium``); without it the test is skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from osref.report import build_report

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "config" / "reference"
CHROMIUM = "/usr/bin/chromium"
WINDOW = (1200, 2000)
# Lines of Chromium's log (--enable-logging=stderr) that mean the page itself is broken; console
# messages and uncaught exceptions appear as `INFO:CONSOLE(..)] "Uncaught ReferenceError: ..."`.
PAGE_ERROR_MARKERS = ("CONSOLE", "Uncaught", "Failed to load resource", "net::ERR_")


def _chromium() -> str:
    path = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if path is None:
        reason = "chromium not installed (CI: apt-get update && apt-get install -y chromium); browser test skipped"
        print(reason)
        pytest.skip(reason)
    return path


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "scripts" / "bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> tuple[Path, dict]:
    """A demo-sized report: two synthetic runs (three checkpoints each) next to their real reference runs."""
    _chromium()
    base = tmp_path_factory.mktemp("browser")
    bench = _bench_module()
    manifest, pending = bench.write_synthetic_grid(base, n_runs=2, n_checkpoints=3)
    bench.write_pending(pending)
    summary = build_report(manifest, REFERENCE, base / "report")
    return base / "report" / "index.html", summary


def _run_chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *extra, page.resolve().as_uri(),
    ]  # fmt: skip
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def _page_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(marker in line for marker in PAGE_ERROR_MARKERS)]


def test_screenshot_is_a_rendered_page(report_page, tmp_path: Path):
    page, _ = report_page
    screenshot = tmp_path / "report.png"
    result = _run_chromium(page, tmp_path / "profile", f"--screenshot={screenshot}")
    assert screenshot.is_file(), f"no screenshot; chromium exit {result.returncode}, stderr:\n{result.stderr[-3000:]}"
    assert _page_errors(result.stderr) == []
    header = screenshot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == WINDOW
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot)[:, :, :3]
    colours = {tuple(p) for p in (pixels[::8, ::8].reshape(-1, 3) * 255).round().astype(int).tolist()}
    assert len(colours) > 20, "screenshot is (nearly) blank"
    assert pixels.std() > 0.05


def test_dom_has_every_section_and_plot(report_page, tmp_path: Path):
    page, summary = report_page
    result = _run_chromium(page, tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _page_errors(result.stderr) == []
    dom = result.stdout
    for section in ("runs", "protocol", "final", "missing", "overview-plots", "loss-plots", "run-plots"):
        assert f'id="{section}"' in dom, section
    n_plots = sum(1 for path in summary["files"] if "/plots/" in path)
    assert n_plots >= 6  # per scale: datasets + losses; avg_vs_flops; per run: scores + loss
    assert dom.count("<img ") == dom.count('src="data:image/png;base64,') == n_plots  # nothing loaded from elsewhere
    assert dom.count('<details class="run">') == 2
    assert dom.rstrip().endswith("</html>")
