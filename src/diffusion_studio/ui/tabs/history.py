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
from ..runs import user_error

PERIODS = {"any time": None, "today": 1, "last 7 days": 7, "last 30 days": 30}
MODES = ["any", *(mode.value for mode in Mode)]


def generate_inputs(generate: dict) -> list:
    """The Generate tab's prompt, negative prompt and parameter components, in `generate_values` order."""
    return [generate["prompt"], generate["negative"], *generate["params"].inputs()]


def generate_values(parameters: dict) -> list:
    """Values for `generate_inputs`, from a request's parameters (the Params panel's order)."""
    loras = [f"{lora['name']}:{lora['weight']:g}" for lora in parameters.get("loras", [])]
    return [parameters.get("prompt", ""), parameters.get("negative_prompt", ""), parameters.get("model"),
            parameters.get("steps"), parameters.get("guidance"), parameters.get("width") or 0,
            parameters.get("height") or 0, parameters.get("seed", -1), parameters.get("scheduler"),
            parameters.get("batch_size", 1), loras]


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

        def reproduce_selected(selected):
            return [gr.Tabs(selected="generate"), *generate_values(need(selected)["parameters"])]

        def send_selected(selected, target):
            image = Image.open(need(selected)["path"]).convert("RGB")
            updates = []
            for name, component in image_targets.items():
                if name != target:
                    updates.append(gr.skip())
                elif isinstance(component, gr.ImageEditor):
                    updates.append({"background": np.asarray(image.convert("RGBA")), "layers": [], "composite": None})
                else:
                    updates.append(image)
            return [gr.Tabs(selected=target), *updates]

        def delete_selected(request: gr.Request, selected, text, mode, model, period):
            try:
                files = studio.delete_job(need(selected)["job_id"], request.username or "local")
            except Exception as exc:
                raise user_error(exc) from None
            items, rows, _ = search_history(request, text, mode, model, period)
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
                return request_from_png(image).parameters(), text
            except ValueError as exc:
                return {"error": str(exc)}, text

        def load_png_into_generate(parameters):
            if not parameters or "error" in parameters:
                raise gr.Error("image: drop a PNG with generation parameters first", title="Nothing to load")
            return [gr.Tabs(selected="generate"), *generate_values(parameters)]

        filters = [search, mode, model, period]
        generate_outputs = generate_inputs(generate)
        refresh.click(search_history, filters, [gallery, entries, message], api_name="history")
        search.submit(search_history, filters, [gallery, entries, message], api_visibility="private")
        gallery.select(select, entries, [details, selected], api_visibility="private")
        reproduce.click(reproduce_selected, selected, [tabs, *generate_outputs], api_visibility="private")
        send.click(send_selected, [selected, send_to], [tabs, *image_targets.values()], api_visibility="private")
        delete.click(delete_selected, [selected, *filters], [gallery, entries, selected, details, message],
                     api_visibility="private")
        share.click(share_selected, selected, message, api_visibility="private")
        png.upload(read_png, png, [png_parameters, png_text], api_name="png_info")
        load_png.click(load_png_into_generate, png_parameters, [tabs, *generate_outputs], api_visibility="private")
        tab.select(search_history, filters, [gallery, entries, message], api_visibility="private")
