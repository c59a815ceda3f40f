"""Refresh docs/screenshots/: serve a studio on the built-in models in a fresh data dir, drive every tab in Debian's
Chromium (Playwright) until it shows a real result made by the built-ins at their native 64 px and default steps,
and save a full-page shot of each (1400×1000 viewport).

    .venv/bin/python scripts/screenshots.py [TAB ...]     # default: every tab, in the order below

A tab that fails is reported by name (its partial page goes to the temp dir, not to docs/) and the others are still
shot; the exit status is 1 if any failed. History and System come last: they show what the other tabs made.
About 65 s on a 2-core CPU machine (the studio process peaks near 0.8 GiB RSS, Chromium apart).
"""

from __future__ import annotations

import os

for name, value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                    "NO_PROXY": "localhost,127.0.0.1"}.items():
    os.environ.setdefault(name, value)

import contextlib
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion_studio.builtin.shapes import ShapeSpec, render
from diffusion_studio.config import StudioConfig
from diffusion_studio.server import build_app
from tests.servers import serving  # uvicorn in a thread, stopped within a second

SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # as tests/test_browser.py: no network, no GPU
VIEWPORT = {"width": 1400, "height": 1000}
LONG = 240_000  # ms for a run to finish: a busy 2-core machine is slow
TAB_NAMES = {"generate": "Generate", "batch": "Batch", "img2img": "Image to image", "inpaint": "Inpaint",
             "controlnet": "ControlNet", "training": "Training", "compare": "Compare", "history": "History",
             "system": "System"}

# Every visible image in the tab has loaded (a shot taken earlier shows an empty frame); what the page's CSS did to
# each enlarged one (PAGE_JS marks them `ds-enlarged`, the CSS draws those `image-rendering: pixelated`).
IMAGES_LOADED = """(tab) => [...document.querySelectorAll(`#tab-${tab} img`)].filter((img) => img.offsetParent)
    .every((img) => img.complete && img.naturalWidth > 0)"""
ENLARGED = """(tab) => [...document.querySelectorAll(`#tab-${tab} img`)].filter((img) => img.offsetParent)
    .filter((img) => {  // drawn larger than it is, as PAGE_JS decides it
      const sx = img.clientWidth / img.naturalWidth, sy = img.clientHeight / img.naturalHeight;
      const fit = getComputedStyle(img).objectFit;
      if (!img.naturalWidth || fit === "none" || fit === "scale-down") return false;
      return (fit === "cover" ? Math.max(sx, sy) : Math.min(sx, sy)) > 1;
    })
    .map((img) => ({natural: [img.naturalWidth, img.naturalHeight], shown: [img.clientWidth, img.clientHeight],
                    rendering: getComputedStyle(img).imageRendering}))"""


class TabFailed(Exception):
    pass


def open_tab(page: Page, tab_id: str) -> Locator:
    page.get_by_role("tab", name=TAB_NAMES[tab_id], exact=True).click()
    panel = page.locator(f"#tab-{tab_id}")
    panel.wait_for(state="visible")
    return panel


def set_number(tab: Locator, label: str, value) -> None:
    """A slider's number box (Gradio labels it 'number input for <label>'): type, then Enter to commit."""
    box = tab.get_by_label(f"number input for {label}", exact=True)
    box.fill(str(value))
    box.press("Enter")
    expect(box).to_have_value(str(value))


def choose(page: Page, tab: Locator, label: str, option: str) -> None:
    """Pick `option` in the dropdown `label` (in its own option list: another dropdown's may still be open)."""
    box = tab.get_by_role("combobox", name=label, exact=True)
    box.click()
    page.locator(f"#{box.get_attribute('aria-controls')}").get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)


def block(tab: Locator, label: str) -> Locator:
    """The innermost component block labelled `label` (its block label, not an Examples column header of that
    name; outer blocks containing it come first)."""
    exact = re.compile(rf"^\s*{re.escape(label)}\s*$")
    labelled = tab.locator("div.block").filter(has=tab.page.get_by_test_id("block-label").filter(has_text=exact))
    if not labelled.count():  # a component drawing its label otherwise
        labelled = tab.locator("div.block").filter(has=tab.page.get_by_text(label, exact=True),
                                                   has_not=tab.page.locator("table"))  # not an Examples table
    return labelled.last


def wait_for_text(page: Page, tab: Locator, pattern: str, timeout: int = LONG) -> str:
    """Wait until the tab's text matches `pattern` (a regex); an error toast fails at once with its message."""
    deadline = time.monotonic() + timeout / 1000
    while time.monotonic() < deadline:
        found = re.search(pattern, tab.inner_text())
        if found:
            return found.group(0)
        errors = page.locator(".toast-body.error")
        if errors.count():
            raise TabFailed(f"the page showed an error: {errors.first.inner_text()!r}")
        page.wait_for_timeout(250)
    raise TabFailed(f"no {pattern!r} in the tab within {timeout / 1000:.0f} s")


def set_file(tab: Locator, label: str, path: Path) -> None:
    """Upload `path` into the image component `label` (clearing the image it shows first, if it has no upload
    input while it shows one)."""
    component = block(tab, label)
    upload = component.locator("input[type=file]")
    if not upload.count():
        component.get_by_role("button", name=re.compile("clear|remove|empty", re.IGNORECASE)).first.click()
    upload.first.set_input_files(str(path))


def shape_png(folder: Path, spec: ShapeSpec) -> Path:
    path = folder / f"{spec.colour}-{spec.shape}-{spec.background}.png"
    render(spec).save(path)
    return path


def generate_tab(page: Page, work: Path) -> None:
    tab = open_tab(page, "generate")
    tab.get_by_label("Prompt", exact=True).fill("a blue star on a black background at the top left")
    tab.get_by_label("Seed", exact=True).fill("42")
    tab.get_by_text("Hires fix", exact=True).click()  # open the section
    tab.get_by_role("checkbox", name="Enable hires fix").check()
    expect(tab.get_by_role("combobox", name="Upscaler", exact=True).first).to_have_value("Latent")
    set_number(tab, "Upscale by", 2)
    set_number(tab, "Denoising strength", 0.3)
    tab.get_by_role("button", name="Generate", exact=True).click()
    wait_for_text(page, tab, r"Done in .* seed 42")
    wait_for_text(page, tab, r"128×128 px", timeout=30_000)  # the hires result, captioned with its size


def batch_tab(page: Page, work: Path) -> None:
    tab = open_tab(page, "batch")
    prompts = ["a red circle on a white background in the center", "a blue star on a black background at the top left",
               "a green square on a gray background at the bottom right", "a yellow triangle on a black background"]
    tab.get_by_label("Prompts, one per line", exact=True).fill("\n".join(prompts))
    tab.get_by_label("Seed", exact=True).fill("7")
    tab.get_by_role("button", name="Run batch", exact=True).click()
    wait_for_text(page, tab, rf"{len(prompts)}/{len(prompts)} prompts finished · {len(prompts)} images")


def img2img_tab(page: Page, work: Path) -> None:
    tab = open_tab(page, "img2img")
    set_file(tab, "Input image (drop or paste)", shape_png(work, ShapeSpec("red", "circle", "white", "center")))
    expect(block(tab, "Input image (drop or paste)").locator("img").first).to_be_visible()
    set_number(tab, "Strength", 0.5)
    generate_before_after(page, tab, "a blue circle on a white background in the center", 42)


def generate_before_after(page: Page, tab, prompt: str, seed: int) -> None:
    """Generate with this prompt and seed, and wait for the tab's before/after comparison."""
    tab.get_by_label("Prompt", exact=True).fill(prompt)
    tab.get_by_label("Seed", exact=True).fill(str(seed))
    tab.get_by_role("button", name="Generate", exact=True).click()
    wait_for_text(page, tab, rf"Done in .* seed {seed}")
    expect(block(tab, "Before / after").locator("img").first).to_be_visible()


def inpaint_tab(page: Page, work: Path) -> None:
    """Paint over the tab's red circle (strokes across its middle, as tests/test_browser.py does) and repaint it."""
    tab = open_tab(page, "inpaint")
    tab.get_by_role("button", name="Brush", exact=True).click()
    box = tab.locator("canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for dy in range(-40, 41, 10):  # a filled patch over the circle, row by row
        page.mouse.move(cx - 45, cy + dy)
        page.mouse.down()
        for step in range(10):
            page.mouse.move(cx - 45 + 9 * (step + 1), cy + dy)
        page.mouse.up()
    expect(block(tab, "Mask preview").locator("img").first).to_be_visible(timeout=30_000)
    generate_before_after(page, tab, "a blue star on a white background in the center", 3)


def controlnet_tab(page: Page, work: Path) -> None:
    tab = open_tab(page, "controlnet")
    # Canny needs a brightness step at the outline: red on white has one (green on gray has none: an empty map).
    set_file(tab, "Control input", shape_png(work, ShapeSpec("red", "triangle", "white", "top left")))
    expect(block(tab, "Control map (live)").locator("img").first).to_be_visible(timeout=60_000)
    tab.get_by_label("Prompt", exact=True).fill("a yellow triangle on a black background at the top left")
    tab.get_by_label("Seed", exact=True).fill("5")
    tab.get_by_role("button", name="Generate", exact=True).click()
    wait_for_text(page, tab, r"Done in .* seed 5")


def training_tab(page: Page, work: Path) -> None:
    """A LoRA run on the shapes world, shot once its plots have some points and a sample, then stopped."""
    tab = open_tab(page, "training")
    tab.get_by_label("LoRA name").fill("shapes-demo")
    set_number(tab, "Steps", 2000)  # more than it will run: it is stopped after the shot
    set_number(tab, "Sample every N steps", 10)
    tab.get_by_role("button", name="Start", exact=True).click()
    try:
        wait_for_text(page, tab, r"shapes-demo")
        page.wait_for_function("() => { const m = document.querySelector('#tab-training').innerText"
                               ".match(/step (\\d+)\\//); return m && Number(m[1]) >= 25; }", timeout=LONG)
        expect(block(tab, "Samples while training").locator("img").first).to_be_visible(timeout=LONG)
        page.wait_for_timeout(1500)  # a tick more, so the plots have redrawn with the latest points
        page.wait_for_function(IMAGES_LOADED, arg="training")
        page.screenshot(path=str(SHOTS / "training.png"), full_page=True)
    finally:
        tab.get_by_role("button", name="Stop", exact=True).click()
        wait_for_text(page, tab, r"stopped")


def compare_tab(page: Page, work: Path) -> None:
    tab = open_tab(page, "compare")
    tab.get_by_label("Prompt", exact=True).fill("a red circle on a white background in the center")
    choose(page, tab, "X axis", "guidance")
    tab.get_by_label("X values (comma-separated)", exact=True).fill("3, 5, 9")
    choose(page, tab, "Y axis", "seed")
    tab.get_by_label("Y values").fill("1, 2")  # not exact: its info line is part of its label
    tab.get_by_role("button", name="Make grid", exact=True).click()
    wait_for_text(page, tab, r"6 cells · seed")
    expect(block(tab, "Grid").locator("img").first).to_be_visible()


def history_tab(page: Page, work: Path) -> None:
    tab = open_tab(page, "history")
    wait_for_text(page, tab, r"\d+ image\(s\) in \d+ job\(s\)")
    tab.locator("img").first.click()  # the newest image: its parameters show beside the gallery
    wait_for_text(page, tab, r'"seed"', timeout=30_000)


def system_tab(page: Page, work: Path) -> None:
    tab = open_tab(page, "system")
    wait_for_text(page, tab, r"Queue:.*worker\(s\)")
    expect(page.locator("#system-chart-jobs .vega-embed").first).to_be_visible(timeout=30_000)
    page.wait_for_timeout(3000)  # the charts' first redraw after the tab opens


STEPS = {"generate": generate_tab, "batch": batch_tab, "img2img": img2img_tab, "inpaint": inpaint_tab,
         "controlnet": controlnet_tab, "training": training_tab, "compare": compare_tab, "history": history_tab,
         "system": system_tab}
SHOOTS_ITSELF = {"training"}  # shot while the run is live, before it is stopped


def main(chosen: list[str]) -> int:
    unknown = [name for name in chosen if name not in STEPS]
    if unknown:
        print(f"unknown tab(s) {unknown}; choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print("Debian's chromium is not installed (./studio test installs it)", file=sys.stderr)
        return 2
    SHOTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ds-screenshots-"))
    (work / "models").mkdir()
    config = StudioConfig(data_dir=work / "data", models_dir=work / "models")
    failed: list[str] = []
    started = time.monotonic()
    with serving(build_app(config)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        page.get_by_role("tab", name="Generate").wait_for()
        for name in chosen or list(STEPS):
            began = time.monotonic()
            try:
                STEPS[name](page, work)
                if name not in SHOOTS_ITSELF:
                    page.wait_for_function(IMAGES_LOADED, arg=name)
                    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
                enlarged = page.evaluate(ENLARGED, name)
                blurred = [img for img in enlarged if img["rendering"] != "pixelated"]
                print(f"{name}: ok in {time.monotonic() - began:.0f} s · {len(enlarged)} enlarged image(s), "
                      f"{len(enlarged) - len(blurred)} drawn pixelated"
                      + (f" · NOT pixelated: {blurred}" if blurred else ""), flush=True)
            except Exception as exc:  # noqa: BLE001 -- any failure: name the tab, go on with the next
                failed.append(name)
                partial = work / f"failed-{name}.png"
                try:
                    page.screenshot(path=str(partial), full_page=True)
                except PlaywrightError:
                    partial = None
                print(f"{name}: FAILED after {time.monotonic() - began:.0f} s: {exc}\n"
                      f"{traceback.format_exc(limit=3)}   partial page: {partial or 'none'}", flush=True)
            # Leave no toast from this tab over the next tab's shot.
            for close in page.locator(".toast-close").all():
                with contextlib.suppress(PlaywrightError):  # gone by itself meanwhile
                    close.click(timeout=2000)
        browser.close()
    print(f"{len(chosen or STEPS) - len(failed)} shot(s) in {SHOTS.relative_to(ROOT)} in "
          f"{time.monotonic() - started:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        return 1
    shutil.rmtree(work, ignore_errors=True)  # kept when a tab failed: its partial page is there
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
