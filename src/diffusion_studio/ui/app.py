"""The studio's page: every tab, one module each, in one gr.Blocks (the server mounts it beside the API)."""

from __future__ import annotations

import gradio as gr

from ..studio import Studio
from .tabs import batch, compare, controlnet, generate, history, img2img, inpaint, system, training

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")


def build_blocks(studio: Studio, is_admin=lambda user: True) -> gr.Blocks:
    """Every tab, one module each; tabs that hand work to others (History) get the components they fill."""
    with gr.Blocks(title="Diffusion Studio") as blocks:
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
    blocks.queue(default_concurrency_limit=4, max_size=64)
    return blocks
