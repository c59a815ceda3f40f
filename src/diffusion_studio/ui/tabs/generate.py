"""Generate tab: text to image (SD or SDXL, following the chosen model) with live preview and cancel."""

from __future__ import annotations

import gradio as gr

from ...samplers import SAMPLERS
from ...studio import Studio
from ..runs import follow_job, user_error

EXAMPLES = [
    ["a red circle on a white background", 20, 7.0, 42],
    ["a blue star on a black background at the top left", 20, 7.0, 7],
    ["a yellow triangle on a gray background in the center", 20, 7.0, 1234],
]


def status_line(job) -> str:
    result = job.result
    timings = result.get("timings", {})
    state = "Cancelled" if job.status.value == "cancelled" else "Done"
    return (f"{state} in {timings.get('total_s', 0):.2f}s (load {timings.get('load_s', 0):.2f}s, "
            f"{timings.get('it_per_s', 0):.1f} it/s) · seed {result['seeds'][0]} · "
            f"peak memory {result.get('peak_memory_bytes', 0) / 2**20:.0f} MiB · {result.get('device', '?')}")


def model_note_for(studio: Studio, name: str) -> str:
    """Say plainly when a built-in is still an untrained stand-in, so its noise is not mistaken for a model."""
    for row in studio.models():
        if row["name"] == name and "stand-in" in row["origin"]:
            return f"⚠️ `{name}` is an **untrained stand-in** (random weights, same architecture) until its trained " \
                   "weights are committed: it produces noise."
        if row["name"] == name and "partly trained" in row["origin"]:
            return f"ℹ️ `{name}` is {row['origin'].removeprefix('built-in (').rstrip(')')}; its training continues."
    return ""


def build(studio: Studio) -> None:
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(studio.base_model_names(), value=studio.config.default_model, label="Model",
                                    allow_custom_value=True,
                                    info="built-ins first; or type a hub id, folder or checkpoint path")
                model_note = gr.Markdown(model_note_for(studio, studio.config.default_model))
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on a white background")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    steps = gr.Slider(1, studio.config.limits.max_steps, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0, 20, value=7.0, step=0.5, label="Guidance (CFG)")
                with gr.Row():
                    width = gr.Slider(0, studio.config.limits.max_width, value=0, step=8,
                                      label="Width", info="0 = the model's native size")
                    height = gr.Slider(0, studio.config.limits.max_height, value=0, step=8,
                                       label="Height", info="0 = the model's native size")
                with gr.Row():
                    seed = gr.Number(-1, precision=0, label="Seed", info="-1 = random")
                    reuse = gr.Button("♻ Reuse last seed", size="sm")
                    scheduler = gr.Dropdown(list(SAMPLERS), value="Euler", label="Scheduler")
                    batch_size = gr.Slider(1, studio.config.limits.max_batch_size, value=1, step=1,
                                           label="Batch size")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary")
                    cancel = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=3):
                preview = gr.Image(label="Live preview", type="pil", height=160, interactive=False)
                gallery = gr.Gallery(label="Result", columns=2, height=360, format="png", object_fit="contain")
                status = gr.Markdown()
                last_seed = gr.State(None)
        gr.Examples(EXAMPLES, [prompt, steps, guidance, seed])

        async def generate(model, prompt, negative, steps, guidance, width, height, seed, scheduler, batch_size,
                           request: gr.Request, progress=gr.Progress()):
            try:
                job_request = studio.validate({
                    "mode": "txt2img", "model": model, "prompt": prompt, "negative_prompt": negative,
                    "steps": int(steps), "guidance": guidance, "width": int(width) or None,
                    "height": int(height) or None, "seed": None if seed is None else int(seed),
                    "scheduler": scheduler, "batch_size": int(batch_size),
                })
            except Exception as exc:
                raise user_error(exc) from None
            async for kind, value in follow_job(studio, job_request, request.username or "local"):
                if kind == "waiting":
                    yield gr.skip(), gr.skip(), f"Queued · position {value}", gr.skip()
                elif kind == "step":
                    progress((value["step"], value["total"]), desc="Sampling")
                    yield (value["preview"] if value["preview"] is not None else gr.skip(), gr.skip(),
                           f"Step {value['step']}/{value['total']} · about {value['eta_s']:.1f}s left", gr.skip())
                elif not value.result.get("image_ids"):  # cancelled before it started
                    yield gr.skip(), gr.skip(), "Cancelled before it started", gr.skip()
                else:
                    paths = [str(p) for p in studio.image_paths(value.result["image_ids"])]
                    yield paths[0], paths, status_line(value), value.result["seeds"][0]

        event = run.click(generate, [model, prompt, negative, steps, guidance, width, height, seed, scheduler,
                                     batch_size], [preview, gallery, status, last_seed], api_name="generate")
        prompt.submit(generate, [model, prompt, negative, steps, guidance, width, height, seed, scheduler,
                                 batch_size], [preview, gallery, status, last_seed], api_visibility="private")
        cancel.click(None, None, None, cancels=[event])
        model.change(lambda name: model_note_for(studio, name), model, model_note, api_visibility="private")
        reuse.click(lambda s: -1 if s is None else s, last_seed, seed, api_visibility="private")
