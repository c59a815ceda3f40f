"""Image to image tab: drop an image, describe the change, choose how strongly to depart from it."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ...builtin.shapes import ShapeSpec, render
from ...studio import Studio
from ..panels import (Hires, Params, hires_panel, named_inputs, params_panel, prompt_boxes, results_panel, run_buttons,
                      stream_job)


def example_images() -> list[list]:
    red_circle = render(ShapeSpec("red", "circle", "white", "center"))
    return [[red_circle, "a blue circle on a white background in the center", 0.5],
            [red_circle, "a red square on a black background in the center", 0.7]]


def at_size_of(source: Image.Image, result_path: str) -> Image.Image:
    """The input at the result's size (hires fix enlarges the result), so Before / after lines up."""
    with Image.open(result_path) as result:  # the header only
        size = result.size
    return source if source.size == size else source.resize(size, Image.LANCZOS)


def build(studio: Studio) -> dict:
    with gr.Tab("Image to image", id="img2img", elem_id="tab-img2img"):
        with gr.Row():
            with gr.Column(scale=2):
                source = gr.Image(label="Input image (drop or paste)", type="pil", sources=["upload", "clipboard"],
                                  height=220, format="png")  # what the server sets goes out lossless (not WebP)
                prompt, negative = prompt_boxes()
                strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Strength",
                                     info="how far to depart from the input: 0 keeps it, 1 ignores it")
                params = params_panel(studio)
                hires = hires_panel(studio)
                run, cancel = run_buttons()
            with gr.Column(scale=3):
                results = results_panel(studio)
                before_after = gr.ImageSlider(label="Before / after", type="pil", height=260)
        gr.Examples(example_images(), [source, prompt, strength])

        async def transform(request: gr.Request, progress=gr.Progress(), *, source, prompt, negative, strength,
                            **panel):
            if source is None:
                raise gr.Error("init_image: drop an input image first", title="Invalid input")
            fields = {"mode": "img2img", "init_image": source, "prompt": prompt, "negative_prompt": negative,
                      "strength": float(strength), **Params.fields(panel), **Hires.fields(panel)}
            async for preview, paths, status, seed in stream_job(studio, fields, request, progress):
                after = (at_size_of(source, paths[0][0]), paths[0][0]) if isinstance(paths, list) else gr.skip()
                yield preview, paths, status, seed, after

        inputs = named_inputs({"source": source, "prompt": prompt, "negative": negative, "strength": strength}, params,
                              hires)
        event = run.click(transform, inputs_kwargs=inputs, outputs=[*results.outputs(), before_after],
                          api_name="img2img")
        cancel.click(None, None, None, cancels=[event])
    return {"image": source}
