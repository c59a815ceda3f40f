"""The studio's page: every tab, one module each, in one gr.Blocks (the server mounts it beside the API, with
THEME, CSS and PAGE_JS)."""

from __future__ import annotations

import gradio as gr

from ..studio import Studio
from .tabs import batch, compare, controlnet, generate, history, img2img, inpaint, system, training

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")

# A small image (the built-ins make 64 px ones) drawn larger than it is shows its pixels crisp, nearest neighbour,
# not smeared. Only enlarged ones: Chromium applies `pixelated` when shrinking too, which would alias big images in
# thumbnails. Which are enlarged only the page knows (frames follow the window), so PAGE_JS marks them.
CSS = """
.gradio-container img.ds-enlarged { image-rendering: pixelated; }
/* A result gallery's lone image fills the width as a square, taller than the gallery's 55vh: keep it whole, so its
   size caption (bottom right) shows. */
.gradio-container .ds-results .thumbnail-item { max-height: 50vh; }
/* An image frame (inputs, control maps, previews) shows a small image fitted to the frame, not at its 64 px; the
   before/after slider fits both images to its height instead of cutting them. */
.gradio-container .image-frame img { object-fit: contain; width: 100%; height: 100%; }
.gradio-container .slider-wrap img[data-testid="imageslider-image"] { height: 100%; }
"""

PAGE_JS = """
() => {
  const enlarged = (img) => {
    const sx = img.clientWidth / img.naturalWidth, sy = img.clientHeight / img.naturalHeight;
    const fit = getComputedStyle(img).objectFit;
    if (fit === "none" || fit === "scale-down") return false;
    return (fit === "cover" ? Math.max(sx, sy) : Math.min(sx, sy)) > 1;
  };
  const mark = (img) => {
    if (!img.isConnected) { resized.unobserve(img); return; }
    if (img.naturalWidth && img.clientWidth) img.classList.toggle("ds-enlarged", enlarged(img));
  };
  const resized = new ResizeObserver((entries) => entries.forEach((entry) => mark(entry.target)));
  const follow = (img) => { mark(img); resized.observe(img); };
  document.addEventListener("load", (event) => {
    if (event.target instanceof HTMLImageElement) follow(event.target);
  }, true);
  document.querySelectorAll("img").forEach(follow);
}
"""


QUEUE_IDLE_POLL_S = 0.02
PROGRESS_POLL_S = 0.1


def build_blocks(studio: Studio, is_admin=lambda user: True) -> gr.Blocks:
    """Every tab, one module each; tabs that hand work to others (History) get the components they fill."""
    # Gradio copies every image it shows into its cache; a day on, the copies go (the originals stay in the history).
    with gr.Blocks(title="Diffusion Studio", delete_cache=(3600, 86400)) as blocks:
        # Before the first component: queue() rebuilds Gradio's app for the Blocks, config and routes, each time it
        # is called (once more as the Blocks closes, and once more when it is mounted); on an empty Blocks that
        # costs nothing, on the whole page about half a second. The queue reads the events only when it starts.
        blocks.queue(default_concurrency_limit=4, max_size=64)
        gr.Markdown("# Diffusion Studio\nText to image, image to image, inpainting, ControlNet, batches, "
                    "comparison grids, LoRA training and a persistent history: every run goes through the shared "
                    "job queue.")
        with gr.Tabs() as tabs:
            text_tab = generate.build(studio)
            batch.build(studio)
            img2img_tab = img2img.build(studio)
            inpaint_tab = inpaint.build(studio)
            controlnet_tab = controlnet.build(studio)
            training.build(studio)
            compare.build(studio)
            history.build(studio, tabs, text_tab, {"img2img": img2img_tab["image"], "inpaint": inpaint_tab["editor"],
                                                    "controlnet": controlnet_tab["image"]})
            system.build(studio, is_admin)
    # Gradio's queue polls every 1 ms while idle (about 900 wakeups a second, 7% of a core on this 2-core machine,
    # taken from the engine running beside it): 20 ms still starts an event sooner than a person notices, and the
    # progress loop (10 ms) sends at most what a progress bar can show.
    blocks._queue.sleep_when_free = QUEUE_IDLE_POLL_S
    blocks._queue.progress_update_sleep_when_free = PROGRESS_POLL_S
    return blocks
