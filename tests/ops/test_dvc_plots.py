"""`dvc plots show` renders offline: the page DVC fills (`.dvc/config` plots.html_template, made by
flows/plots_page.py) carries Vega inline, and headless Chromium with every host unresolvable draws each
plot of the committed tables with data in it, not only its axes. The screenshot is kept in test-artifacts/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.conftest import REPO, keep_artifact
from tests.ops.test_mlflow_ui import browser  # noqa: F401  (the fixture)

pytestmark = pytest.mark.pipeline

BIN = Path(sys.executable).parent
# Per plot (a div DVC names after its file; Vega-Embed draws SVG into it): how many data marks it drew
# with a visible shape. Axes, grid lines, legends and titles have other roles than "mark".
DATA_MARKS_JS = """
const counts = [];
for (const div of document.querySelectorAll('div[id]')) {
  if (div.parentElement.closest('div[id]')) continue;
  const svg = div.querySelector('svg');
  if (!svg) { counts.push([div.id, -1]); continue; }
  let drawn = 0;
  for (const el of svg.querySelectorAll('g.role-mark path, g.role-mark rect, g.role-mark line')) {
    const box = el.getBBox();
    if ((el.getAttribute('d') || el.tagName !== 'path') && (box.width > 0 || box.height > 0)) drawn++;
  }
  counts.push([div.id, drawn]);
}
return counts;
"""


def plot_files() -> list[str]:
    """The plot tables dvc.yaml declares (foreach stages expanded by DVC itself)."""
    done = subprocess.run(
        [str(BIN / "dvc"), "plots", "show", "--json"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return sorted(json.loads(done.stdout)["data"])


def test_the_plots_page_loads_nothing_from_the_network() -> None:
    page = (REPO / ".dvc/plots/page.html").read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN tags have nowhere to go
    assert not re.findall(r"<script[^>]+src=", page)
    config = (REPO / ".dvc/config").read_text(encoding="utf-8")
    assert "html_template = plots/page.html" in config


def test_dvc_plots_show_renders_every_plot_offline(browser, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "plots"
    subprocess.run([str(BIN / "dvc"), "plots", "show", "-o", str(out)], cwd=REPO, check=True, capture_output=True)
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "cdn.jsdelivr.net" not in html
    expected = len(plot_files())
    # No host resolves: a script that tried to load from the network would leave its plot blank.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*"]})
    browser.get((out / "index.html").as_uri())
    shot = tmp_path / "dvc-plots.png"
    try:
        counts = WebDriverWait(browser, 60).until(
            lambda d: (c := d.execute_script(DATA_MARKS_JS)) and all(n >= 0 for _, n in c) and c
        )
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1600, min(int(height) + 100, 16000))
    finally:
        browser.save_screenshot(str(shot))
        kept = keep_artifact(shot, shot.name)
        print(f"screenshot: {kept}")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert len(counts) == expected, (len(counts), expected)
    empty = [div for div, drawn in counts if drawn == 0]
    assert not empty, f"plots without data marks: {empty}; screenshot {kept}"


def test_the_page_generator_inlines_vega_and_keeps_dvcs_placeholders() -> None:
    from flows.plots_page import page_html

    page = page_html()
    assert "{plot_divs}" in page and "{refresh_tag}" in page and "{scripts}" not in page
    assert "window.vegaEmbed=" in page.replace(" ", "")
    assert not re.findall(r"<script[^>]+src=", page)
