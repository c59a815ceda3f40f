"""Generate tab: text to image (SD or SDXL, following the chosen model) with live preview and cancel."""

from __future__ import annotations

import gradio as gr

from ...requests import default_of
from ...studio import Studio
from ..panels import (Hires, Params, hires_panel, named_inputs, params_panel, prompt_boxes, results_panel, run_buttons,
                      stream_job)

EXAMPLES = [[prompt, default_of("steps"), default_of("guidance"), seed] for prompt, seed in (
    ("a red circle on a white background", 42),
    ("a blue star on a black background at the top left", 7),
    ("a yellow triangle on a gray background in the center", 1234),
)]


def build(studio: Studio) -> dict:
    with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
        with gr.Row():
            with gr.Column(scale=2):
                prompt, negative = prompt_boxes()
                params = params_panel(studio)
                hires = hires_panel(studio)
                with gr.Row():
                    batch_count = gr.Slider(1, 16, value=1, step=1, label="Batch count",
                                            info="jobs run one after another; seeds continue")
                    reuse = gr.Button("Reuse last seed", size="sm")
                run, cancel = run_buttons()
            with gr.Column(scale=3):
                results = results_panel(studio, upscale_api="upscale")
        gr.Examples(EXAMPLES, [prompt, params.steps, params.guidance, params.seed])

        async def generate(request: gr.Request, progress=gr.Progress(), *, prompt, negative, count, **panel):
            fields = {"mode": "txt2img", "prompt": prompt, "negative_prompt": negative, **Params.fields(panel),
                      **Hires.fields(panel)}
            gallery: list[str] = []
            for index in range(int(count)):
                async for update in stream_job(studio, fields, request, progress):
                    preview, paths, status, seed = update
                    if isinstance(paths, list):
                        gallery += paths
                        paths = list(gallery)
                        if int(count) > 1:
                            status = f"Job {index + 1}/{int(count)} · {status}"
                        if fields["seed"] is not None:  # the next job continues the seed sequence
                            fields = {**fields, "seed": seed + fields["batch_size"]}
                    yield preview, paths, status, seed

        inputs = named_inputs({"prompt": prompt, "negative": negative, "count": batch_count}, params, hires)
        event = run.click(generate, inputs_kwargs=inputs, outputs=results.outputs(), api_name="generate")
        prompt.submit(generate, inputs_kwargs=inputs, outputs=results.outputs(), api_visibility="private")
        cancel.click(None, None, None, cancels=[event])
        reuse.click(lambda s: -1 if s is None else s, results.last_seed, params.seed, api_visibility="private")
    return {"prompt": prompt, "negative": negative, "params": params, "hires": hires}
