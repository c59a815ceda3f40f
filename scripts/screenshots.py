"""Refresh docs/screenshots/ from a running studio, in Debian's Chromium (browser downloads fail here).

    ./studio serve &   then   .venv/bin/python scripts/screenshots.py [--url http://127.0.0.1:7860]
Needs `pip install playwright` and `apt-get install chromium`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUT = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(args.url)
        page.get_by_label("Prompt", exact=True).fill("a blue star on a black background at the top left")
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("Done in").wait_for(timeout=120_000)
        page.screenshot(path=str(OUT / "generate.png"), full_page=True)
        browser.close()
    print(f"wrote {OUT / 'generate.png'}")


if __name__ == "__main__":
    main()
