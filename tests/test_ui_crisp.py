"""Small images in a real browser (Playwright in Debian's Chromium, as tests/test_browser.py): a 64 px result drawn
larger than it is shows crisp pixels (`image-rendering: pixelated`) with its real size in the caption; an image
drawn smaller than it is keeps the browser's smooth scaling (pixelated would alias it); Upscale states the size."""

import pytest

from diffusion_studio.ui.app import CSS

from browser import LONG, playwright, studio_page  # skips this module where there is no Chromium
IMAGES = """(selector) => [...document.querySelectorAll(selector)].map((img) => ({
    natural: [img.naturalWidth, img.naturalHeight], shown: [img.clientWidth, img.clientHeight],
    rendering: getComputedStyle(img).imageRendering}))"""


@pytest.fixture(scope="module")
def page(server):
    with studio_page(server[0]) as page:
        yield page


def test_the_page_carries_the_studios_css(server):
    import httpx

    config = httpx.get(f"{server[0]}/config").json()
    assert CSS.strip() in (config.get("css") or ""), "server.py should pass ui.app's CSS (and PAGE_JS) at mount"


def test_a_small_result_is_shown_crisp_with_its_size(page):
    tab = page.locator("#tab-generate")
    tab.get_by_label("Prompt", exact=True).fill("a red circle on a white background")
    tab.get_by_label("Seed", exact=True).fill("11")
    steps = tab.get_by_label("number input for Steps")
    steps.fill("2")
    steps.press("Enter")
    tab.get_by_role("button", name="Generate", exact=True).click()
    tab.get_by_text("Done in").wait_for(timeout=LONG)
    gallery = tab.locator(".ds-results .thumbnail-item img").first
    gallery.wait_for()
    page.wait_for_function("() => document.querySelector('#tab-generate .ds-results img.ds-enlarged') !== null")
    [shown] = page.evaluate(IMAGES, "#tab-generate .ds-results .thumbnail-item img")
    assert shown["natural"] == [64, 64] and min(shown["shown"]) > 64  # drawn larger than it is...
    assert shown["rendering"] == "pixelated"  # ...so pixel for pixel, not smeared
    caption = tab.locator(".ds-results .caption-label").first
    assert caption.inner_text() == "64×64 px" and caption.is_visible()  # the whole thumbnail fits: caption shows

    tab.get_by_text("Upscale", exact=True).click()
    scale = tab.get_by_label("number input for Scale")
    scale.wait_for()
    scale.fill("8")
    scale.press("Enter")
    playwright.expect(tab.get_by_role("slider", name="range slider for Scale")).to_have_value("8")
    tab.get_by_role("button", name="Upscale the selected image").click()
    tab.get_by_text("512×512 px").wait_for(timeout=LONG)
    page.wait_for_function("() => [...document.querySelectorAll('#tab-generate .upscale img')]"
                           ".some((img) => img.naturalWidth === 512 && img.clientWidth > 0)")
    [upscaled] = [img for img in page.evaluate(IMAGES, "#tab-generate .upscale img") if img["natural"][0] == 512]
    assert max(upscaled["shown"]) < 512 and upscaled["rendering"] == "auto"  # shrunk to fit: smooth, not aliased


def test_upscale_takes_the_clicked_image(page):
    tab = page.locator("#tab-generate")
    batch = tab.get_by_label("number input for Batch size")
    batch.fill("2")
    batch.press("Enter")
    steps = tab.get_by_label("number input for Steps")
    steps.fill("2")
    steps.press("Enter")
    tab.get_by_role("button", name="Generate", exact=True).click()
    thumbnails = tab.locator(".ds-results .thumbnail-item")
    playwright.expect(thumbnails).to_have_count(2, timeout=LONG)
    second = thumbnails.nth(1).locator("img").get_attribute("src").rsplit("/", 1)[-1]
    thumbnails.nth(1).click()
    button = tab.get_by_role("button", name="Upscale the selected image")
    if not button.is_visible():
        tab.get_by_text("Upscale", exact=True).click()
    page.wait_for_timeout(500)  # the selection reaches the server before the upscale asks for it
    button.click()
    line = tab.get_by_text(second)
    line.wait_for(timeout=LONG)
    assert "from 64×64 px" in line.inner_text()
