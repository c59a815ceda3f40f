"""Inpaint tab: paint the region to repaint in the browser; everything outside it is kept pixel for pixel."""

from __future__ import annotations

import gradio as gr
import numpy as np
from PIL import Image

from ...builtin.shapes import ShapeSpec, render
from ...engine.runner import prepare_mask
from ...studio import Studio
from ..panels import Params, named_inputs, params_panel, prompt_boxes, results_panel, run_buttons, stream_job


def split_editor(value: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """The editor's background image and the painted mask (white where any stroke is)."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"]
    background = Image.fromarray(background) if isinstance(background, np.ndarray) else background
    mask = Image.new("L", background.size, 0)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4:
            mask = Image.fromarray(np.maximum(np.asarray(mask), (layer[..., 3] > 0).astype(np.uint8) * 255))
    return background.convert("RGB"), mask


def mask_preview(value: dict | None, blur: int, grow: int) -> Image.Image | None:
    """What the engine will repaint: the image with the grown, feathered mask tinted over it."""
    image, mask = split_editor(value)
    if image is None:
        return None
    prepared = prepare_mask(mask, image.size, int(blur), int(grow))
    tint = Image.new("RGB", image.size, (255, 0, 128))
    return Image.composite(tint, image, prepared.point(lambda v: v * 0.6))


def build(studio: Studio) -> dict:
    with gr.Tab("Inpaint", id="inpaint", elem_id="tab-inpaint"):
        with gr.Row():
            with gr.Column(scale=2):
                editor = gr.ImageEditor(  # PNG to the browser: its default, WebP, is lossy and this image is kept
                    label="Image and mask: paint over what to repaint", type="numpy", image_mode="RGBA",
                    sources=["upload", "clipboard"], height=300, format="png",
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=8),
                    eraser=gr.Eraser(default_size=8), layers=gr.LayerOptions(allow_additional_layers=False),
                    value={"background": np.asarray(render(ShapeSpec("red", "circle", "white", "center")).convert(
                        "RGBA")), "layers": [], "composite": None})
                prompt, negative = prompt_boxes("a blue star on a white background")
                with gr.Row():
                    strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Strength")
                    blur = gr.Slider(0, 32, value=2, step=1, label="Mask blur (px)")
                    grow = gr.Slider(0, 32, value=0, step=1, label="Mask grow (px)")
                params = params_panel(studio)
                run, cancel = run_buttons()
            with gr.Column(scale=3):
                masked = gr.Image(label="Mask preview", type="pil", height=160, interactive=False)
                results = results_panel()
                before_after = gr.ImageSlider(label="Before / after", type="pil", height=260)
                reuse = gr.Button("Use result as input", size="sm")

        gr.Examples([["a blue star on a white background", 1.0, 2, 0],
                     ["a green circle on a white background", 0.9, 4, 2]],
                    [prompt, strength, blur, grow], label="Examples (paint a mask over the shape first)")

        mask_inputs = {"value": editor, "blur": blur, "grow": grow}
        for trigger in (editor.change, blur.change, grow.change):
            trigger(mask_preview, inputs_kwargs=mask_inputs, outputs=masked, api_visibility="private",
                    show_progress="hidden")

        async def inpaint(request: gr.Request, progress=gr.Progress(), *, editor, prompt, negative, strength, blur,
                          grow, **panel):
            image, mask = split_editor(editor)
            if image is None:
                raise gr.Error("init_image: upload an image first", title="Invalid input")
            if not np.asarray(mask).any():
                raise gr.Error("mask_image: paint over the region to repaint first", title="Invalid input")
            fields = {"mode": "inpaint", "init_image": image, "mask_image": mask, "prompt": prompt,
                      "negative_prompt": negative, "strength": float(strength), "mask_blur": int(blur),
                      "mask_grow": int(grow), **Params.fields(panel)}
            async for preview, paths, status, seed in stream_job(studio, fields, request, progress):
                after = (image, paths[0]) if isinstance(paths, list) else gr.skip()
                yield preview, paths, status, seed, after

        inputs = named_inputs({"editor": editor, "prompt": prompt, "negative": negative, "strength": strength,
                               "blur": blur, "grow": grow}, params)
        event = run.click(inpaint, inputs_kwargs=inputs, outputs=[*results.outputs(), before_after],
                          api_name="inpaint")
        cancel.click(None, None, None, cancels=[event])

        def use_result(gallery):
            if not gallery:
                raise gr.Error("gallery: generate something first", title="Nothing to reuse")
            first = gallery[0][0] if isinstance(gallery[0], (list, tuple)) else gallery[0]
            path = first["image"]["path"] if isinstance(first, dict) else first
            return {"background": np.asarray(Image.open(path).convert("RGBA")), "layers": [], "composite": None}

        reuse.click(use_result, results.gallery, editor, api_visibility="private")
    return {"editor": editor}
