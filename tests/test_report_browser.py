"""The report renders in a real browser: headless Chromium draws every plotly figure without errors.

index.html is one static page: plotly.js inlined once, every figure as JSON drawn by
``Plotly.newPlot``. What can break is the markup (an unclosed tag swallowing the plots), a figure
plotly refuses (a JavaScript error), or a resource the page tries to load. Chromium's console log
and its DOM dump after the scripts ran catch all three: each figure must have become plotly's
``<svg class="main-svg">``, and the comparison must be the first table. Two pages: the demo scale
(two tiny runs on local tasks) and a full synthetic grid (36 runs × 37 checkpoints × 12 tasks,
scripts/bench_report.py). Needs Debian's ``chromium`` package (``apt-get install -y chromium``);
without it the tests are skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import re
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


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory) -> tuple[Path, dict]:
    """The demo scale: two tiny runs on local tasks, compared with each other; references c4, dclm."""
    _chromium()
    base = tmp_path_factory.mktemp("browser_demo")
    manifest = _module(REPO / "tests" / "test_report_comparison.py", "report_comparison_cases").write_demo_scale(base)
    summary = build_report(manifest, REFERENCE, base / "report")
    return base / "report" / "index.html", summary


@pytest.fixture(scope="module")
def full_grid_page(tmp_path_factory) -> tuple[Path, dict]:
    """The release grid's shape: 36 runs × 37 checkpoints × 12 tasks next to the published runs."""
    _chromium()
    base = tmp_path_factory.mktemp("browser_full")
    bench = _module(REPO / "scripts" / "bench_report.py", "bench_report")
    manifest, pending = bench.write_synthetic_grid(base)
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
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)


def _page_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(marker in line for marker in PAGE_ERROR_MARKERS)]


def _check_screenshot(page: Path, tmp_path: Path) -> None:
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


def _check_dom(page: Path, summary: dict, tmp_path: Path) -> str:
    result = _run_chromium(page, tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _page_errors(result.stderr) == []
    dom = result.stdout
    assert dom.rstrip().endswith("</html>")
    for section in ("comparison", "references", "overview-plots", "runs", "protocol", "final", "missing",
                    "loss-plots", "run-plots"):  # fmt: skip
        assert f'id="{section}"' in dom, section
    body = dom.split("<body>", 1)[1]
    assert body.index("<table") > body.index('id="comparison"') and body.index("<table") < body.index('id="references"')
    # every figure was drawn by plotly: its div holds plotly's svg
    plots = re.findall(r'<div class="plot[^"]*" id="plot-([^"]+)"', dom)
    assert sorted(plots) == sorted(summary["plots"]) and len(plots) >= 5
    drawn = re.findall(r'id="plot-[^"]+"[^>]*>\s*<div class="plot-container plotly"', dom)
    assert len(drawn) == len(plots), f"{len(plots) - len(drawn)} figure(s) not drawn"
    assert dom.count('class="main-svg"') >= 2 * len(plots)  # plotly draws two svg layers per figure
    assert "<img" not in dom and "http://" not in dom.split("<body>", 1)[1].replace("http://www.w3.org", "")
    return dom


def test_demo_scale_screenshot(demo_page, tmp_path: Path):
    _check_screenshot(demo_page[0], tmp_path)


def test_demo_scale_dom(demo_page, tmp_path: Path):
    dom = _check_dom(*demo_page, tmp_path)
    assert dom.count('<details class="run">') == 2
    assert "better" in dom.split('id="references"', 1)[0]  # the verdict is in the first table


@pytest.mark.slow
def test_full_grid_screenshot(full_grid_page, tmp_path: Path):
    _check_screenshot(full_grid_page[0], tmp_path)


@pytest.mark.slow
def test_full_grid_dom(full_grid_page, tmp_path: Path):
    page, summary = full_grid_page
    dom = _check_dom(page, summary, tmp_path)
    assert dom.count('<details class="run">') == 36
    assert page.stat().st_size < 30_000_000  # one plotly.js (4.8 MB) and the figures' JSON
