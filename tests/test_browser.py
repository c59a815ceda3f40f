"""The studio in a real browser: Playwright driving Debian's Chromium (browser downloads fail here, so the
system browser is used; `./studio test` installs it). Generates, paints an inpainting mask and inpaints, starts
and stops a short training run watching its plot change, opens the history, and screenshots every tab (into
$DS_SCREENSHOT_DIR when set: scripts/screenshots.py sets it to docs/screenshots)."""

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_studio.builtin.shapes import ShapeSpec, render
from diffusion_studio.engine.runner import prepare_mask

from browser import LONG, playwright, studio_page  # skips this module where there is no Chromium

TABS = {"generate": "Generate", "batch": "Batch", "img2img": "Image to image", "inpaint": "Inpaint",
        "controlnet": "ControlNet", "training": "Training", "compare": "Compare", "history": "History",
        "system": "System"}


@pytest.fixture(scope="module")
def page(server):
    with studio_page(server[0]) as page:
        yield page


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("DS_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_tab(page, tab_id):
    page.get_by_role("tab", name=TABS[tab_id], exact=True).click()
    panel = page.locator(f"#tab-{tab_id}")
    panel.wait_for(state="visible")
    return panel


def test_generate_in_the_browser(page, shots):
    tab = open_tab(page, "generate")
    tab.get_by_label("Prompt", exact=True).fill("a blue star on a black background at the top left")
    tab.get_by_label("Seed", exact=True).fill("42")
    tab.get_by_role("button", name="Generate", exact=True).click()
    tab.get_by_text("Done in").wait_for(timeout=LONG)
    assert "seed 42" in tab.get_by_text("Done in").inner_text()
    assert tab.locator("img").count() >= 1
    page.screenshot(path=str(shots / "generate.png"), full_page=True)


def test_paint_a_mask_and_inpaint(page, shots, server):
    _, studio = server
    tab = open_tab(page, "inpaint")
    tab.get_by_role("button", name="Brush", exact=True).click()
    canvas = tab.locator("canvas").first
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 30, cy - 20)
    page.mouse.down()
    for step in range(12):
        page.mouse.move(cx - 30 + 5 * step, cy - 20 + 3 * step)
    page.mouse.up()
    tab.get_by_label("Seed", exact=True).fill("3")
    tab.get_by_role("button", name="Generate", exact=True).click()
    tab.get_by_text("Done in").wait_for(timeout=LONG)
    assert "seed 3" in tab.get_by_text("Done in").inner_text()

    # The job the click made: an inpainting of the tab's own input with the mask painted above.
    job = studio.store.find(mode="inpaint", limit=1)[0]
    assert (job.status.value, job.request["seed"], job.request["prompt"]) == (
        "done", 3, "a blue star on a white background")
    [saved] = studio.image_paths(job.result["image_ids"])
    playwright.expect(tab.locator(f'img[src*="{saved.name}"]').first).to_be_visible()  # shown in the results

    def stored(name):
        return Image.open(io.BytesIO(base64.b64decode(job.request[name])))

    result = np.asarray(Image.open(saved).convert("RGB")).astype(int)
    original = np.asarray(render(ShapeSpec("red", "circle", "white", "center"))).astype(int)  # the tab's input
    received = np.asarray(stored("init_image").convert("RGB")).astype(int)  # the editor's background as sent
    assert result.shape == original.shape
    assert np.array_equal(received, original)  # the editor's round trip through the browser is lossless (PNG)
    mask = stored("mask_image").convert("L")
    painted = np.asarray(mask) > 127
    assert painted.shape == result.shape[:2] and 0 < painted.mean() < 0.5, "the stroke reaches the server as a mask"
    kept = np.asarray(prepare_mask(mask, mask.size, job.request["mask_blur"], job.request["mask_grow"])) == 0
    assert kept.mean() > 0.5
    assert np.abs(result - original)[kept].max() == 0  # outside the (feathered) mask: the input's pixels exactly
    assert np.abs(result - original)[painted].max() > 0  # inside it: repainted
    page.screenshot(path=str(shots / "inpaint.png"), full_page=True)


def test_start_and_stop_training_while_the_plot_changes(page, shots):
    tab = open_tab(page, "training")
    tab.get_by_label("LoRA name").fill("browser-lora")
    steps = tab.get_by_label("number input for Steps", exact=True)
    steps.fill("2000")
    steps.press("Enter")
    tab.get_by_role("button", name="Start", exact=True).click()
    status = tab.get_by_text("browser-lora")
    status.wait_for(timeout=LONG)
    plot = tab.locator(".vega-embed").first

    def step_now() -> int:
        found = re.search(r"step (\d+)/", tab.inner_text())
        return int(found.group(1)) if found else 0

    page.wait_for_function("() => document.querySelector('#tab-training').innerText.match(/step [1-9]/)",
                           timeout=LONG)
    first_step, first_plot = step_now(), plot.screenshot()
    for _ in range(120):  # the loss plot redraws as steps arrive
        page.wait_for_timeout(500)
        if plot.screenshot() != first_plot:
            break
    else:
        pytest.fail("the loss plot did not change in 60 s")
    assert step_now() > first_step
    page.screenshot(path=str(shots / "training.png"), full_page=True)
    tab.get_by_role("button", name="Stop", exact=True).click()
    tab.get_by_text("stopped").wait_for(timeout=LONG)


def test_history_shows_what_was_made_and_reproduces_it(page, shots, server):
    _, studio = server
    tab = open_tab(page, "history")
    tab.get_by_text("image(s) in").wait_for(timeout=LONG)
    assert tab.locator("img").count() >= 2  # the browser's generate and inpaint results, at least
    page.screenshot(path=str(shots / "history.png"), full_page=True)
    newest = next(job for job in studio.history("local", limit=20) if job.result.get("image_ids"))
    tab.locator("img").first.click()  # the newest job's first image
    playwright.expect(tab).to_contain_text(f'"seed": {newest.result["seeds"][0]}')  # its parameters, shown
    tab.get_by_role("button", name="Reproduce in Generate", exact=True).click()
    generate = page.locator("#tab-generate")
    playwright.expect(generate).to_be_visible()
    playwright.expect(generate.get_by_label("Prompt", exact=True)).to_have_value(newest.request["prompt"])
    playwright.expect(generate.get_by_label("Seed", exact=True)).to_have_value(str(newest.result["seeds"][0]))
    playwright.expect(generate.get_by_label("number input for Steps", exact=True)).to_have_value(
        str(newest.request["steps"]))


# What each tab must show once selected: (role, accessible name) of a control only that tab has.
RENDERS = {
    "batch": [("textbox", "Prompts, one per line"), ("textbox", "Negative prompt (all)"), ("button", "Run batch")],
    "img2img": [("button", "Generate"), ("slider", "range slider for Strength"),
                ("text", "Input image (drop or paste)"), ("text", "Before / after")],
    "controlnet": [("text", "Control input"), ("text", "Control map (live)"), ("combobox", "Control type"),
                   ("slider", "range slider for Canny low threshold"),
                   ("slider", "range slider for Conditioning scale")],
    "compare": [("combobox", "X axis"), ("textbox", "X values (comma-separated)"), ("combobox", "Y axis"),
                ("button", "Make grid"), ("text", "Grid")],
    "system": [("button", "Unload"), ("button", "Refresh"), ("text", "Loaded models"), ("text", "Recent errors")],
}


@pytest.mark.parametrize("tab_id", list(RENDERS))
def test_every_other_tab_renders(page, shots, tab_id):
    tab = open_tab(page, tab_id)
    for role, name in RENDERS[tab_id]:
        control = tab.get_by_text(name, exact=True) if role == "text" else tab.get_by_role(role, name=name, exact=True)
        playwright.expect(control.first, f"{tab_id}: {role} {name!r}").to_be_visible()
    for other in TABS:  # and only that tab: the others' panels are hidden
        if other != tab_id:
            playwright.expect(page.locator(f"#tab-{other}")).to_be_hidden()
    if tab_id == "system":  # selecting the tab fills it from the server
        playwright.expect(tab).to_contain_text(re.compile(r"Device:\s*cpu"), timeout=LONG)
        playwright.expect(tab).to_contain_text(re.compile(r"Queue:.*worker\(s\)"))
    page.screenshot(path=str(shots / f"{tab_id}.png"), full_page=True)
