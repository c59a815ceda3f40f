"""ControlNet tab: an input image becomes a control map (previewed live as settings change) that steers the
shape of what is generated."""

from __future__ import annotations

import gradio as gr

from ...builtin.shapes import ShapeSpec, render
from ...studio import Studio
from ..panels import (Hires, Params, hires_panel, named_inputs, params_panel, prompt_boxes, results_panel, run_buttons,
                      stream_job)
from ..runs import user_error


def build(studio: Studio) -> dict:
    with gr.Tab("ControlNet", id="controlnet", elem_id="tab-controlnet"):
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    source = gr.Image(label="Control input", type="pil", sources=["upload", "clipboard"], height=200,
                                      value=render(ShapeSpec("red", "star", "white", "center")),
                                      format="png")  # what the server sets goes out lossless (not WebP)
                    control_map = gr.Image(label="Control map (live)", type="pil", height=200, interactive=False)
                with gr.Row():
                    control_type = gr.Dropdown(["canny", "depth", "pose"], value="canny", label="Control type",
                                               info="depth/pose need a local estimator (see Configuration)")
                    preprocess = gr.Checkbox(True, label="Run the preprocessor",
                                             info="off: the input already is a control map")
                with gr.Row():
                    low = gr.Slider(0, 255, value=100, step=1, label="Canny low threshold")
                    high = gr.Slider(0, 255, value=200, step=1, label="Canny high threshold")
                prompt, negative = prompt_boxes("a blue star on a black background")
                with gr.Row():
                    scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Conditioning scale")
                    start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start")
                    end = gr.Slider(0, 1, value=1.0, step=0.05, label="End")
                params = params_panel(studio)
                hires = hires_panel(studio)
                run, cancel = run_buttons()
            with gr.Column(scale=3):
                results = results_panel(studio)

        gr.Examples([[render(ShapeSpec("red", "star", "white", "center")), "a blue star on a black background"],
                     [render(ShapeSpec("orange", "triangle", "black", "top left")),
                      "a yellow triangle on a white background at the top left"]], [source, prompt])

        def control_fields(source, control_type, preprocess, low, high) -> dict:
            return {"mode": "controlnet", "control_image": source, "control_type": control_type,
                    "control_preprocess": bool(preprocess), "canny_low": int(low), "canny_high": int(high)}

        def preview_map(source, control_type, preprocess, low, high):
            if source is None:
                return None
            try:
                return studio.control_preview(control_fields(source, control_type, preprocess, low, high))
            except Exception as exc:
                raise user_error(exc) from None

        control_inputs = {"source": source, "control_type": control_type, "preprocess": preprocess, "low": low,
                          "high": high}
        for component in control_inputs.values():
            component.change(preview_map, inputs_kwargs=control_inputs, outputs=control_map, api_visibility="private",
                             show_progress="hidden")

        async def generate(request: gr.Request, progress=gr.Progress(), *, source, control_type, preprocess, low, high,
                           prompt, negative, scale, start, end, **panel):
            if source is None:
                raise gr.Error("control_image: add a control input first", title="Invalid input")
            fields = {**control_fields(source, control_type, preprocess, low, high), "prompt": prompt,
                      "negative_prompt": negative, "control_scale": float(scale), "control_start": float(start),
                      "control_end": float(end), **Params.fields(panel), **Hires.fields(panel)}
            async for update in stream_job(studio, fields, request, progress):
                yield update

        inputs = named_inputs({**control_inputs, "prompt": prompt, "negative": negative, "scale": scale, "start": start,
                               "end": end}, params, hires)
        event = run.click(generate, inputs_kwargs=inputs, outputs=results.outputs(), api_name="controlnet")
        cancel.click(None, None, None, cancels=[event])
    return {"image": source}
