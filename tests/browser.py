"""The browser tests' Chromium (Debian's, driven by Playwright): importing this skips the importing test module
where there is no Chromium (unless DS_REQUIRE_BROWSER is set, then it fails), and opens a studio page."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("DS_REQUIRE_BROWSER"):
        raise RuntimeError("DS_REQUIRE_BROWSER is set but Debian's chromium is not installed")
    pytest.skip("Debian's chromium is not installed (./studio test installs it)", allow_module_level=True)

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
LONG = 180_000  # ms: CPU machines are slow when busy


@contextmanager
def studio_page(url: str):
    """A 1400x1000 page on the studio at `url`, its Generate tab loaded."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        page.get_by_role("tab", name="Generate").wait_for()
        try:
            yield page
        finally:
            browser.close()
