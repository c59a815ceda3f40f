"""History tab: the persistent gallery of this user's results (search, filters), the full parameters of a chosen
image, reproduce / send to a tab / delete / share; and PNG info for any PNG, ours or A1111's."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from ...engine.metadata import read_png_text, request_from_png
from ...requests import Mode
from ...studio import Studio
from ..panels import hires_values, panel_values
from ..runs import user_error

PERIODS = {"any time": None, "today": 1, "last 7 days": 7, "last 30 days": 30}
MODES = ["any", *(mode.value for mode in Mode)]


def generate_inputs(generate: dict) -> dict[str, gr.components.Component]:
    """The Generate tab's prompt, negative prompt and parameter components by name (`generate_values`' names)."""
    return {"prompt": generate["prompt"], "negative": generate["negative"], **generate["params"].named(),
            **generate["hires"].named()}


def generate_values(parameters: dict) -> dict[str, object]:
    """Values by `generate_inputs` name, from a request's parameters."""
    return {"prompt": parameters.get("prompt", ""), "negative": parameters.get("negative_prompt", ""),
            **panel_values(parameters), **hires_values(parameters)}


def build(studio: Studio, tabs: gr.Tabs, generate: dict, image_targets: dict[str, gr.components.Component]) -> None:
    with gr.Tab("History", id="history", elem_id="tab-history") as tab:
        with gr.Row():
            search = gr.Textbox(label="Search prompts", scale=3)
            mode = gr.Dropdown(MODES, value="any", label="Mode")
            model = gr.Dropdown(["any", *studio.base_model_names()], value="any", label="Model",
                                allow_custom_value=True)
            period = gr.Dropdown(list(PERIODS), value="any time", label="Date")
            refresh = gr.Button("Search", variant="primary")
        with gr.Row():
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Your images, newest first", columns=6, height=420, preview=False,
                                     allow_preview=False, interactive=False)
            with gr.Column(scale=2):
                details = gr.JSON(label="Parameters of the selected image")
                with gr.Row():
                    reproduce = gr.Button("Reproduce in Generate")
                    delete = gr.Button("Delete job", variant="stop")
                with gr.Row():
                    send_to = gr.Dropdown(list(image_targets), value=next(iter(image_targets)), label="Send image to",
                                          scale=2)
                    send = gr.Button("Send", scale=1)
                share = gr.Button("Share link")
                message = gr.Markdown()
        entries = gr.State([])  # gallery index -> {"job_id", "image_id", "path", "parameters"}
        selected = gr.State(None)

        with gr.Accordion("PNG info: read the parameters of any PNG (ours or AUTOMATIC1111's)", open=False):
            with gr.Row():
                png = gr.Image(label="Drop a PNG", type="pil", sources=["upload"], image_mode=None, height=220)
                with gr.Column():
                    png_parameters = gr.JSON(label="Parameters")
                    png_text = gr.Textbox(label="Raw text chunks", lines=4)
                    load_png = gr.Button("Load into Generate")

        def search_history(request: gr.Request, text, mode, model, period):
            days = PERIODS[period]
            jobs = studio.history(request.username or "local", prompt=text or None,
                                     mode=None if mode == "any" else mode, model=None if model == "any" else model,
                                     since=time.time() - days * 86400 if days else None, limit=200)
            rows, items = [], []
            for job in jobs:
                for image_id, path in zip(job.result.get("image_ids", []),
                                          studio.image_paths(job.result.get("image_ids", []))):
                    if Path(path).exists():
                        rows.append({"job_id": job.id, "image_id": image_id, "path": str(path)})
                        items.append((str(path), job.request.get("prompt", "")[:60]))
            return items, rows, f"{len(rows)} image(s) in {len(jobs)} job(s)"

        def select(entries, event: gr.SelectData):
            entry = entries[event.index]
            parameters = request_from_png(Image.open(entry["path"])).parameters()
            return parameters, {**entry, "parameters": parameters}

        def need(selected):
            if not selected:
                raise gr.Error("gallery: select an image first", title="Nothing selected")
            return selected

        generate_targets = generate_inputs(generate)

        def fill_generate(parameters: dict) -> dict:
            """Switch to Generate with its inputs set from a request's parameters, each to its component by name."""
            values = generate_values(parameters)
            return {tabs: gr.Tabs(selected="generate"),
                    **{component: values[name] for name, component in generate_targets.items()}}

        def reproduce_selected(selected):
            return fill_generate(need(selected)["parameters"])

        def send_selected(selected, target):
            image = Image.open(need(selected)["path"]).convert("RGB")
            component = image_targets[target]
            if isinstance(component, gr.ImageEditor):
                value = {"background": np.asarray(image.convert("RGBA")), "layers": [], "composite": None}
            else:
                value = image
            return {tabs: gr.Tabs(selected=target), component: value}  # the other targets stay as they are

        def delete_selected(request: gr.Request, selected, **filters):
            try:
                files = studio.delete_job(need(selected)["job_id"], request.username or "local")
            except Exception as exc:
                raise user_error(exc) from None
            items, rows, _ = search_history(request, **filters)
            return items, rows, None, None, f"Deleted the job and its {files} file(s)."

        def share_selected(request: gr.Request, selected):
            try:
                path = studio.share_link(need(selected)["image_id"], request.username or "local")
            except Exception as exc:
                raise user_error(exc) from None
            link = f"{str(request.request.base_url).rstrip('/')}{path}" if request.request else path
            return f"Anyone with this link sees this one image: [{link}]({link})"

        def read_png(image):
            if image is None:
                return None, ""
            text = "\n\n".join(f"{key}: {value}" for key, value in read_png_text(image).items())
            try:
                # A gradio worker thread, not the event loop: the lookup may list the models folders.
                return request_from_png(image, studio.hash_lookup()).parameters(), text
            except ValueError as exc:
                return {"error": str(exc)}, text

        def load_png_into_generate(parameters):
            if not parameters or "error" in parameters:
                raise gr.Error("image: drop a PNG with generation parameters first", title="Nothing to load")
            return fill_generate(parameters)

        filters = {"text": search, "mode": mode, "model": model, "period": period}
        generate_outputs = [tabs, *generate_targets.values()]
        found = [gallery, entries, message]
        refresh.click(search_history, inputs_kwargs=filters, outputs=found, api_name="history")
        search.submit(search_history, inputs_kwargs=filters, outputs=found, api_visibility="private")
        gallery.select(select, entries, [details, selected], api_visibility="private")
        reproduce.click(reproduce_selected, selected, generate_outputs, api_visibility="private")
        send.click(send_selected, inputs_kwargs={"selected": selected, "target": send_to},
                   outputs=[tabs, *image_targets.values()], api_visibility="private")
        delete.click(delete_selected, inputs_kwargs={"selected": selected, **filters},
                     outputs=[gallery, entries, selected, details, message], api_visibility="private")
        share.click(share_selected, selected, message, api_visibility="private")
        png.upload(read_png, png, [png_parameters, png_text], api_name="png_info")
        load_png.click(load_png_into_generate, png_parameters, generate_outputs, api_visibility="private")
        tab.select(search_history, inputs_kwargs=filters, outputs=found, api_visibility="private")
