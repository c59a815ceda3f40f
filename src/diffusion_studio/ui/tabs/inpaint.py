"""Inpaint tab: paint the region to repaint in the browser; everything outside it is kept pixel for pixel. Also
A1111's inpaint options (only-masked area, masked content, mask mode) and outpainting (extend the canvas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from ...builtin.shapes import ShapeSpec, render
from ...engine.inpaint_area import plan_inpaint
from ...requests import INPAINT_FILLS, GenerationRequest
from ...studio import Studio
from ..panels import Params, Section, named_inputs, params_panel, prompt_boxes, results_panel, run_buttons, stream_job

AREAS = [("Whole picture", "whole"), ("Only masked", "masked")]  # A1111's labels, the request's values
MASK_MODES = ["Inpaint masked", "Inpaint not masked"]
PREVIEW_MAX = 2**15  # the preview draws any canvas; the size limit is the request's, checked when it runs
SIDES = ("left", "right", "top", "bottom")
DEFAULTS = GenerationRequest.model_fields


@dataclass
class InpaintOptions(Section):
    """The tab's A1111 inpaint options and the Outpaint section; in the endpoint's arguments after the parameter
    panel (so older positional calls keep working). `fields` gives the request's fields."""

    inpaint_area: gr.Radio
    inpaint_padding: gr.Slider
    inpaint_fill: gr.Radio
    mask_mode: gr.Radio
    outpaint_left: gr.Slider
    outpaint_right: gr.Slider
    outpaint_top: gr.Slider
    outpaint_bottom: gr.Slider

    @staticmethod
    def fields(values: dict[str, Any]) -> dict[str, Any]:
        """Request fields from the options' values by name (a handler's `**panel`); other names are ignored."""
        sides = {side: int(values[f"outpaint_{side}"] or 0) for side in SIDES}
        return {"inpaint_area": values["inpaint_area"], "inpaint_padding": int(values["inpaint_padding"]),
                "inpaint_fill": values["inpaint_fill"], "mask_invert": values["mask_mode"] == MASK_MODES[1],
                "outpaint": sides if any(sides.values()) else None}


def inpaint_options() -> InpaintOptions:
    with gr.Row():
        area = gr.Radio(AREAS, value=DEFAULTS["inpaint_area"].default, label="Inpaint area",
                        info="only masked: repaint the mask's box (plus padding) at the model's size, paste it back")
        padding = gr.Slider(0, 256, value=DEFAULTS["inpaint_padding"].default, step=4,
                            label="Only masked padding (px)")
    with gr.Row():
        fill = gr.Radio(list(INPAINT_FILLS), value=DEFAULTS["inpaint_fill"].default, label="Masked content",
                        info="what the masked area starts from")
        mask_mode = gr.Radio(MASK_MODES, value=MASK_MODES[0], label="Mask mode")
    with gr.Accordion("Outpaint", open=False, elem_classes=["outpaint"]):
        gr.Markdown("Extend the canvas: the new area is filled from the edges and painted; the mask may stay empty.")
        with gr.Row():
            sides = [gr.Slider(0, 256, value=0, step=8, label=f"{side.capitalize()} (px)") for side in SIDES]
    return InpaintOptions(area, padding, fill, mask_mode, *sides)


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


def mask_preview(value: dict | None, blur: int, grow: int, invert: bool = False, area: str = "whole",
                 padding: int = 0, outpaint: dict | None = None) -> Image.Image | None:
    """What the engine will repaint, from the engine's own plan (`plan_inpaint`): the canvas (extended and
    pre-filled when outpainting) with the feathered mask tinted over it, and the box an only-masked run crops
    outlined. Drawn at the picture's own size."""
    image, mask = split_editor(value)
    if image is None:
        return None
    extends = bool(outpaint) and any(outpaint.values())
    if not extends and not invert and (mask is None or mask.getbbox() is None):
        return image  # nothing painted yet
    try:
        request = GenerationRequest(mode="inpaint", init_image=image, mask_image=mask, mask_blur=int(blur),
                                    mask_grow=int(grow), mask_invert=invert, inpaint_area=area,
                                    inpaint_padding=int(padding), outpaint=outpaint if extends else None)
        plan = plan_inpaint(request, image.size, (PREVIEW_MAX, PREVIEW_MAX))
    except ValueError:  # e.g. an inverted mask that covers nothing: Generate names the field
        return image
    tint = Image.new("RGB", plan.canvas.size, (255, 0, 128))
    shown = Image.composite(tint, plan.canvas, plan.canvas_mask.point(lambda v: v * 0.6))
    if plan.box is not None:
        left, top, right, bottom = plan.box
        ImageDraw.Draw(shown).rectangle((left, top, right - 1, bottom - 1), outline=(0, 160, 255), width=1)
    return shown


def on_canvas(image: Image.Image, outpaint: dict | None) -> Image.Image:
    """The input where it sits on an outpainted result's extended canvas (the new area grey), so Before / after
    compares the same pixels."""
    if not outpaint:
        return image
    canvas = Image.new("RGB", (image.width + outpaint["left"] + outpaint["right"],
                               image.height + outpaint["top"] + outpaint["bottom"]), (128, 128, 128))
    canvas.paste(image, (outpaint["left"], outpaint["top"]))
    return canvas


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
                options = inpaint_options()
                params = params_panel(studio)
                run, cancel = run_buttons()
            with gr.Column(scale=3):
                masked = gr.Image(label="Mask preview", type="pil", height=160, interactive=False)
                results = results_panel(studio)
                before_after = gr.ImageSlider(label="Before / after", type="pil", height=260)
                reuse = gr.Button("Use result as input", size="sm")

        gr.Examples([["a blue star on a white background", 1.0, 2, 0],
                     ["a green circle on a white background", 0.9, 4, 2]],
                    [prompt, strength, blur, grow], label="Examples (paint a mask over the shape first)")

        mask_inputs = {"value": editor, "blur": blur, "grow": grow, **options.named()}

        def preview_of(value, blur, grow, **chosen):
            fields = InpaintOptions.fields(chosen)
            return mask_preview(value, blur, grow, fields["mask_invert"], fields["inpaint_area"],
                                fields["inpaint_padding"], fields["outpaint"])

        for component in mask_inputs.values():
            component.change(preview_of, inputs_kwargs=mask_inputs, outputs=masked, api_visibility="private",
                             show_progress="hidden")

        async def inpaint(request: gr.Request, progress=gr.Progress(), *, editor, prompt, negative, strength, blur,
                          grow, **panel):
            image, mask = split_editor(editor)
            if image is None:
                raise gr.Error("init_image: upload an image first", title="Invalid input")
            chosen = InpaintOptions.fields(panel)
            painted = bool(np.asarray(mask).any())
            if not painted and chosen["outpaint"] is None:
                raise gr.Error("mask_image: paint over the region to repaint first (or extend the canvas under "
                               "Outpaint)", title="Invalid input")
            fields = {"mode": "inpaint", "init_image": image, "mask_image": mask if painted else None,
                      "prompt": prompt, "negative_prompt": negative, "strength": float(strength),
                      "mask_blur": int(blur), "mask_grow": int(grow), **Params.fields(panel), **chosen}
            async for preview, paths, status, seed in stream_job(studio, fields, request, progress):
                after = (on_canvas(image, chosen["outpaint"]), paths[0][0]) if isinstance(paths, list) else gr.skip()
                yield preview, paths, status, seed, after

        inputs = named_inputs({"editor": editor, "prompt": prompt, "negative": negative, "strength": strength,
                               "blur": blur, "grow": grow}, params, options)
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
