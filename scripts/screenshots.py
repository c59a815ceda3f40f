"""Refresh docs/screenshots/: runs the browser tests (Playwright in Debian's Chromium), which save a screenshot
of every tab after driving it, into docs/screenshots.

    .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    os.environ["DS_SCREENSHOT_DIR"] = str(ROOT / "docs" / "screenshots")
    os.environ["DS_REQUIRE_BROWSER"] = "1"
    os.chdir(ROOT)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", "-q", "tests/test_browser.py"])
