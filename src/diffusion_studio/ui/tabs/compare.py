"""Compare tab: an X/Y grid over two parameters, every cell generated for real, one labelled grid image."""

from __future__ import annotations

import time

import gradio as gr
from PIL import Image

from ...service.compare import AXES, draw_grid, plan_cells
from ...studio import Studio
from ..panels import Hires, Params, hires_panel, named_inputs, params_panel, prompt_boxes, run_buttons
from ..runs import user_error

NO_AXIS = "(none)"


def build(studio: Studio) -> None:
    with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
        with gr.Row():
            with gr.Column(scale=2):
                prompt, negative = prompt_boxes("a red circle on a white background")
                with gr.Row():
                    x_axis = gr.Dropdown(list(AXES), value="guidance", label="X axis")
                    x_values = gr.Textbox(label="X values (comma-separated)", value="1, 4, 7")
                with gr.Row():
                    y_axis = gr.Dropdown([NO_AXIS, *AXES], value="steps", label="Y axis")
                    y_values = gr.Textbox(label="Y values", value="4, 12",
                                          info="prompt S/R: the first value is searched in the prompt")
                init_image = gr.Image(label="Input image (optional: compares image to image, e.g. over strength)",
                                      type="pil", sources=["upload", "clipboard"], height=140)
                params = params_panel(studio, batch=False)
                hires = hires_panel(studio)  # every cell gets the same second pass
                run, cancel = run_buttons("Make grid")
            with gr.Column(scale=3):
                status = gr.Markdown()
                grid_image = gr.Image(label="Grid", type="pil", interactive=False, format="png",
                                      buttons=["download", "fullscreen"])
        gr.Examples([["a red circle on a white background", "scheduler", "Euler, DDIM, DPM++ 2M", "seed", "1, 2"],
                     ["a red star on a black background", "prompt S/R", "red, blue, green", NO_AXIS, ""]],
                    [prompt, x_axis, x_values, y_axis, y_values])

        async def make_grid(request: gr.Request, progress=gr.Progress(), *, prompt, negative, x_axis, x_values, y_axis,
                            y_values, init_image, **panel):
            y_axis = None if y_axis == NO_AXIS else y_axis
            if "strength" in (x_axis, y_axis) and init_image is None:
                raise gr.Error("init_image: the strength axis compares image to image; add an input image",
                               title="Invalid input")
            try:
                mode = {"mode": "img2img", "init_image": init_image} if init_image is not None else {"mode": "txt2img"}
                fields = {**mode, "prompt": prompt, "negative_prompt": negative, **Params.fields(panel),
                          **Hires.fields(panel), "batch_size": 1}
                if fields["seed"] in (None, -1):  # one seed for every cell, or the grid compares noise
                    fields["seed"] = int(time.time()) % 2**31
                x_list, y_list, rows = plan_cells(fields, x_axis, x_values, y_axis, y_values)
                requests = [studio.validate(cell) for row in rows for cell in row]
            except Exception as exc:
                raise user_error(exc) from None
            outcomes: dict[str, object] = {}
            order: list[str] = []
            async for event in studio.jobs.follow_many(requests, request.username or "local"):
                if event.job_id not in order:
                    order.append(event.job_id)
                if event.final:
                    outcomes[event.job_id] = event.outcome
                    progress((len(outcomes), len(requests)), desc="Grid cells")
                    yield f"{len(outcomes)}/{len(requests)} cells", gr.skip()
            cells = [outcomes[job_id] for job_id in order]  # each job's first event comes in submission order
            failed = [cell for cell in cells if not cell.ok]
            if failed:
                reason = failed[0].error.text() if failed[0].error else failed[0].status
                raise gr.Error(f"{len(failed)} cell(s) failed: {reason}", title="Grid incomplete")
            images = [Image.open(studio.image_paths(cell.result["image_ids"])[0]).convert("RGB") for cell in cells]
            notes = [f"{cell.result['timings']['total_s']:.2f}s" for cell in cells]
            width = len(x_list)
            grid = draw_grid([images[i:i + width] for i in range(0, len(images), width)],
                             [f"{x_axis}: {x}" for x in x_list], [f"{y_axis}: {y}" if y_axis else "" for y in y_list],
                             [notes[i:i + width] for i in range(0, len(notes), width)])
            yield f"{len(cells)} cells · seed {fields['seed']}", grid

        inputs = named_inputs({"prompt": prompt, "negative": negative, "x_axis": x_axis, "x_values": x_values,
                               "y_axis": y_axis, "y_values": y_values, "init_image": init_image}, params, hires)
        event = run.click(make_grid, inputs_kwargs=inputs, outputs=[status, grid_image], api_name="compare")
        cancel.click(None, None, None, cancels=[event])
