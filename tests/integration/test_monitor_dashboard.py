"""Headless Chromium (Debian ``chromium`` driven by playwright's executable_path) loads
/dashboard of a running server and sees the drift after drifted traffic. The screenshot goes
to docs/img/monitor-dashboard.png when KILN_UPDATE_SCREENSHOTS=1, else to a temp folder."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import monitor_support  # noqa: F401  (puts the unit helpers on sys.path)
import pytest
from monitor_helpers import PROSE, code_texts
from monitor_support import monitored_server, send_completions

CHROMIUM = shutil.which("chromium")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (ensure-test-services.sh)")
def test_dashboard_shows_drift_in_headless_chromium(tmp_path: Path) -> None:
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    shot = ROOT / "docs" / "img" if os.environ.get("KILN_UPDATE_SCREENSHOTS") else tmp_path
    with monitored_server(tmp_path) as url:
        send_completions(url, code_texts(60, seed=3))
        rng = random.Random(0)
        send_completions(url, [" ".join(rng.sample(PROSE, 3)) for _ in range(60)])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(url + "/dashboard")
                page.wait_for_selector("h2.drift", timeout=30_000)  # the page polls every 2 s
                heading = page.inner_text("h2.drift")
                cells = page.locator("table.features td.drift").all_inner_texts()
                page.screenshot(path=str(shot / "monitor-dashboard.png"), full_page=True)
            finally:
                browser.close()
    assert "tiny" in heading and "DRIFT" in heading
    assert "drift" in cells
