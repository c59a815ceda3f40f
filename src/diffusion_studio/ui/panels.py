"""Building blocks every generating tab shares: the parameter panel, the hires fix section, the result panel (with
its upscale action), and the handler that turns their values into a job and streams its progress. A tab adds only its
own inputs (an image, a mask, a strength).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ..requests import HiresFix, default_of
from ..samplers import SAMPLERS
from ..studio import Studio
from .runs import follow_job, user_error


def parse_loras(entries: list[str] | None) -> list[dict]:
    """'name' or 'name:weight' entries (the LoRA picker's values) as request fields."""
    loras = []
    for entry in entries or []:
        name, _, weight = entry.rpartition(":") if ":" in entry else (entry, "", "")
        try:
            loras.append({"name": name.strip(), "weight": float(weight) if weight else 1.0})
        except ValueError:
            raise gr.Error(f"loras: '{entry}' should be NAME or NAME:WEIGHT (a number)", title="Invalid input")
    return loras


def model_note_for(studio: Studio, name: str) -> str:
    """Say plainly when a built-in is still an untrained stand-in, so its noise is not mistaken for a model."""
    for row in studio.models():
        if row["name"] == name and "stand-in" in row["origin"]:
            return f"⚠️ `{name}` is an **untrained stand-in** (random weights, same architecture) until its trained " \
                   "weights are committed: it produces noise."
        if row["name"] == name and "partly trained" in row["origin"]:
            return f"ℹ️ `{name}` is {row['origin'].removeprefix('built-in (').rstrip(')')}; its training continues."
    return ""


AUTOMATIC_VAE = "Automatic"  # A1111's word for the model's own VAE


class Section:
    """A group of components that a handler takes by name: a dataclass whose fields are the components."""

    def named(self) -> dict[str, gr.components.Component]:
        """The components by name, in field order: an event's `inputs_kwargs` (with `named_inputs`) or the
        targets of a handler that fills the section (with `panel_values` / `hires_values`)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclass
class Params(Section):
    """The shared generation parameters of a tab. The order of these fields is the one order of the panel: of
    `named()` (the components by name), so of each generating endpoint's arguments after the tab's own ones."""

    model: gr.Dropdown
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Slider
    height: gr.Slider
    seed: gr.Number
    scheduler: gr.Dropdown
    batch_size: gr.Slider
    loras: gr.Dropdown
    clip_skip: gr.Slider
    vae: gr.Dropdown
    step_cache: gr.Slider

    @staticmethod
    def fields(values: dict[str, Any]) -> dict[str, Any]:
        """Request fields from the panel's values by name (a handler's `**panel`); other names are ignored."""
        seed = values["seed"]
        return {"model": values["model"], "steps": int(values["steps"]), "guidance": float(values["guidance"]),
                "width": int(values["width"]) or None, "height": int(values["height"]) or None,
                "seed": None if seed in (None, "") else int(seed), "scheduler": values["scheduler"],
                "batch_size": int(values["batch_size"]), "loras": parse_loras(values["loras"]),
                "clip_skip": int(values["clip_skip"]), "vae": None if values["vae"] in (None, "", AUTOMATIC_VAE)
                else values["vae"], "step_cache": int(values["step_cache"])}


def panel_values(parameters: dict[str, Any]) -> dict[str, Any]:
    """The panel's values by name from a request's parameters (the inverse of `Params.fields`): what History and
    PNG info load into the Generate tab."""
    return {"model": parameters.get("model"), "steps": parameters.get("steps"),
            "guidance": parameters.get("guidance"), "width": parameters.get("width") or 0,
            "height": parameters.get("height") or 0, "seed": parameters.get("seed", -1),
            "scheduler": parameters.get("scheduler"), "batch_size": parameters.get("batch_size", 1),
            "loras": [f"{lora['name']}:{lora['weight']:g}" for lora in parameters.get("loras", [])],
            "clip_skip": parameters.get("clip_skip", 1), "vae": parameters.get("vae") or AUTOMATIC_VAE,
            "step_cache": parameters.get("step_cache", 1)}


def named_inputs(own: dict[str, gr.components.Component], *panels) -> dict[str, gr.components.Component]:
    """A tab's own inputs by name, then each panel's (`Params`, then sections such as `Hires`, each with
    `named()`): an event's `inputs_kwargs`. Gradio passes each value as the keyword argument of that name, and the
    endpoint takes its arguments in this dict's order (gradio_client may call it positionally or by these names);
    sections come after the parameter panel, so older positional calls keep working. A name twice is a mistake,
    not an override."""
    inputs = dict(own)
    for panel in panels:
        named = panel.named()
        if clash := inputs.keys() & named.keys():
            raise ValueError(f"inputs named like another panel's: {sorted(clash)}")
        inputs.update(named)
    return inputs


def prompt_boxes(value: str = "", placeholder: str = "a red circle on a white background"):
    """The prompt and negative prompt boxes every generating tab starts with."""
    prompt = gr.Textbox(label="Prompt", lines=2, value=value, placeholder=placeholder)
    negative = gr.Textbox(label="Negative prompt", lines=1)
    return prompt, negative


def params_panel(studio: Studio, batch: bool = True) -> Params:
    limits = studio.config.limits
    model = gr.Dropdown(studio.base_model_names(), value=studio.config.default_model, label="Model",
                        allow_custom_value=True, info="built-ins first; admins may also give a hub id, folder or "
                                                      "checkpoint path")
    note = gr.Markdown(model_note_for(studio, studio.config.default_model))
    model.change(lambda name: model_note_for(studio, name), model, note, api_visibility="private")
    with gr.Row():
        steps_ = gr.Slider(1, limits.max_steps, value=default_of("steps"), step=1, label="Steps")
        guidance = gr.Slider(0, 20, value=default_of("guidance"), step=0.5, label="Guidance (CFG)")
    with gr.Row():
        width = gr.Slider(0, limits.max_width, value=0, step=8, label="Width", info="0 = the model's native size")
        height = gr.Slider(0, limits.max_height, value=0, step=8, label="Height", info="0 = the model's native size")
    with gr.Row():
        seed = gr.Number(-1, precision=0, label="Seed", info="-1 = random")
        scheduler = gr.Dropdown(list(SAMPLERS), value=default_of("scheduler"), label="Scheduler")
        batch_size = gr.Slider(1, limits.max_batch_size, value=1, step=1, label="Batch size", visible=batch)
    loras = gr.Dropdown(studio.loras(), value=[], multiselect=True, allow_custom_value=True, label="LoRAs",
                        info="NAME or NAME:WEIGHT (default weight 1); LoRAs you train appear here")

    def own_loras(request: gr.Request) -> gr.Dropdown:
        """The page is built once for everyone: each user's own trained LoRAs join the list when it opens."""
        return gr.Dropdown(choices=studio.loras(request.username or "local"))

    loras.focus(own_loras, None, loras, api_visibility="private")
    with gr.Row():
        clip_skip = gr.Slider(1, 12, value=default_of("clip_skip"), step=1, label="CLIP skip",
                              info="A1111's: 1 = the text encoder's last layer, 2 = the one before")
        vae = gr.Dropdown([AUTOMATIC_VAE, *studio.vaes()], value=AUTOMATIC_VAE, allow_custom_value=True,
                          label="VAE", info="the model's own, or a VAE file or folder from the models folders")
    vae.focus(lambda: gr.Dropdown(choices=[AUTOMATIC_VAE, *studio.vaes()]), None, vae, api_visibility="private")
    step_cache = gr.Slider(1, 8, value=default_of("step_cache"), step=1, label="Step cache (faster)",
                           info="1 = off; N: the UNet's deep blocks run on 1 step in N (2: about 1.6x faster on "
                                "the built-in, same adherence; a slightly different image)")
    return Params(model, steps_, guidance, width, height, seed, scheduler, batch_size, loras, clip_skip, vae,
                  step_cache)


HIRES_DEFAULTS = HiresFix()  # the request's defaults are the section's


@dataclass
class Hires(Section):
    """The "Hires fix" section (A1111's): generate at the base size, upscale, then a second pass. Its values by
    name follow the parameter panel's in an endpoint's arguments; `fields` gives the request's `hires` (None while
    the section is off)."""

    hires_enable: gr.Checkbox
    hires_upscaler: gr.Dropdown
    hires_scale: gr.Slider
    hires_width: gr.Slider
    hires_height: gr.Slider
    hires_steps: gr.Slider
    hires_denoising_strength: gr.Slider

    @staticmethod
    def fields(values: dict[str, Any]) -> dict[str, Any]:
        """The request's `hires` from the section's values by name (a handler's `**panel`); others are ignored."""
        if not values.get("hires_enable"):
            return {"hires": None}
        return {"hires": {"upscaler": values["hires_upscaler"], "scale": float(values["hires_scale"]),
                          "width": int(values["hires_width"] or 0) or None,
                          "height": int(values["hires_height"] or 0) or None,
                          "steps": int(values["hires_steps"] or 0),
                          "denoising_strength": float(values["hires_denoising_strength"])}}


def hires_values(parameters: dict[str, Any]) -> dict[str, Any]:
    """The section's values by name from a request's parameters (the inverse of `Hires.fields`); without hires,
    the section off at its defaults. Every name has a value, as for `panel_values`."""
    hires = parameters.get("hires")
    chosen = HiresFix.model_validate(hires) if hires else HIRES_DEFAULTS
    return {"hires_enable": bool(hires), "hires_upscaler": chosen.upscaler, "hires_scale": chosen.scale,
            "hires_width": chosen.width or 0, "hires_height": chosen.height or 0, "hires_steps": chosen.steps,
            "hires_denoising_strength": chosen.denoising_strength}


def upscaler_names(studio: Studio, kinds: tuple[str, ...] = ("latent", "pixel", "model")) -> list[str]:
    """The studio's upscalers of these kinds, in its order (latent ones first, then pixel, then model files)."""
    return [row["name"] for row in studio.upscalers() if row["kind"] in kinds]


def hires_panel(studio: Studio) -> Hires:
    limits = studio.config.limits
    with gr.Accordion("Hires fix", open=False, elem_classes=["hires-fix"]):
        enable = gr.Checkbox(False, label="Enable hires fix",
                             info="generate at the base size, upscale, then repaint the details in a second pass")
        with gr.Row():
            upscaler = gr.Dropdown(upscaler_names(studio), value=HIRES_DEFAULTS.upscaler, label="Upscaler",
                                   info="latent ones resize the latents; others the decoded image")
            scale = gr.Slider(1, 4, value=HIRES_DEFAULTS.scale, step=0.05, label="Upscale by")
        with gr.Row():
            width = gr.Slider(0, limits.max_width, value=0, step=8, label="Resize width to", info="0 = from the scale")
            height = gr.Slider(0, limits.max_height, value=0, step=8, label="Resize height to",
                               info="0 = from the scale")
        with gr.Row():
            steps = gr.Slider(0, limits.max_steps, value=0, step=1, label="Hires steps", info="0 = same as Steps")
            denoising = gr.Slider(0.05, 1.0, value=HIRES_DEFAULTS.denoising_strength, step=0.05,
                                  label="Denoising strength", info="how much the second pass repaints")
    upscaler.focus(lambda: gr.Dropdown(choices=upscaler_names(studio)), None, upscaler, api_visibility="private")
    return Hires(enable, upscaler, scale, width, height, steps, denoising)


@dataclass
class Results:
    preview: gr.Image
    gallery: gr.Gallery
    status: gr.Markdown
    last_seed: gr.State

    def outputs(self) -> list[gr.components.Component]:
        return [self.preview, self.gallery, self.status, self.last_seed]


def results_panel(studio: Studio, label: str = "Result", upscale_api: str | None = None) -> Results:
    """The live preview, the gallery (each image captioned with its real size) and the status line, with the
    Upscale section under them; `upscale_api`: the upscale action's public endpoint name (one tab has it)."""
    preview = gr.Image(label="Live preview", type="pil", height=160, interactive=False)
    gallery = gr.Gallery(label=label, columns=4, height="auto", format="png", object_fit="contain", preview=False,
                         interactive=False, elem_classes=["ds-results"])
    status = gr.Markdown()
    upscale_panel(studio, gallery, upscale_api)
    return Results(preview, gallery, status, gr.State(None))


def size_caption(path: str | Path) -> str:
    """An image's real size (a small one is shown enlarged, pixel for pixel, so the frame does not tell it)."""
    with Image.open(path) as image:  # reads the header only
        return f"{image.width}×{image.height} px"


def sized(paths: list) -> list[tuple[str, str]]:
    """Gallery items: each image path with its size as the caption."""
    return [(str(path), size_caption(path)) for path in paths]


def gallery_path(item) -> str:
    """The file of a gallery item as Gradio hands it over: (path, caption), or a path."""
    return str(item[0] if isinstance(item, (list, tuple)) else item)


def upscale_selected(studio: Studio, gallery: list | None, index: int | None, upscaler: str, scale: float):
    """The selected gallery image upscaled (blocking: Gradio runs this sync handler in a worker thread, off the
    event loop) and a line with its size."""
    if not gallery:
        raise gr.Error("gallery: generate something first", title="Nothing to upscale")
    path = gallery_path(gallery[min(max(int(index or 0), 0), len(gallery) - 1)])
    with Image.open(path) as opened:
        source = opened.convert("RGB")
    try:
        result = studio.upscale(source, upscaler, float(scale))
    except Exception as exc:
        raise user_error(exc) from None
    return result, (f"**{result.width}×{result.height} px** · {float(scale):g}× with {upscaler}, from "
                    f"{source.width}×{source.height} px ({Path(path).name})")


def upscale_panel(studio: Studio, gallery: gr.Gallery, api_name: str | None = None) -> None:
    """"Upscale" under a gallery: the selected image (the first until one is clicked) by a pixel upscaler or an
    upscaler model file (latent ones need the generation's latents, so they are not offered here)."""
    kinds = ("pixel", "model")
    with gr.Accordion("Upscale", open=False, elem_classes=["upscale"]):
        with gr.Row():
            upscaler = gr.Dropdown(upscaler_names(studio, kinds), value="Lanczos", label="Upscaler",
                                   info="upscaler model files (ESRGAN family) from the models folders appear here")
            scale = gr.Slider(1, 8, value=2, step=0.5, label="Scale")
        button = gr.Button("Upscale the selected image", size="sm")
        image = gr.Image(label="Upscaled", type="pil", format="png", interactive=False, height=320)
        size = gr.Markdown()
    selected = gr.State(0)

    def choose(event: gr.SelectData) -> int:
        return event.index

    gallery.select(choose, None, selected, api_visibility="private")
    gallery.change(lambda: 0, None, selected, api_visibility="private", show_progress="hidden")
    upscaler.focus(lambda: gr.Dropdown(choices=upscaler_names(studio, kinds)), None, upscaler,
                   api_visibility="private")

    def upscale(gallery, selected, upscaler, scale):
        return upscale_selected(studio, gallery, selected, upscaler, scale)

    inputs = {"gallery": gallery, "selected": selected, "upscaler": upscaler, "scale": scale}
    button.click(upscale, inputs_kwargs=inputs, outputs=[image, size], api_name=api_name or None,
                 api_visibility="public" if api_name else "private")


def status_line(outcome) -> str:
    result = outcome.result
    timings = result.get("timings", {})
    state = "Cancelled" if outcome.status == "cancelled" else "Done"
    cached = " · from the cache" if result.get("cached") else ""
    batched = f" · batched with {result['batched_with'] - 1} other job(s)" if result.get("batched_with", 1) > 1 else ""
    return (f"{state} in {timings.get('total_s', 0):.2f}s (load {timings.get('load_s', 0):.2f}s, "
            f"{timings.get('it_per_s', 0):.1f} it/s) · seed {result['seeds'][0]} · "
            f"peak memory {result.get('peak_memory_bytes', 0) / 2**20:.0f} MiB · {result.get('device', '?')}"
            f"{cached}{batched}")


async def stream_job(studio: Studio, fields: dict[str, Any], request: gr.Request, progress: gr.Progress):
    """Validate the fields, run them as a job, and yield (preview, gallery, status, seed) updates; the last
    one carries the result. Bad input raises gr.Error naming the field."""
    try:
        job_request = studio.validate(fields)
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
            paths = sized(studio.image_paths(value.result["image_ids"]))
            yield paths[0][0], paths, status_line(value), value.result["seeds"][0]


def run_buttons(label: str = "Generate") -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        run = gr.Button(label, variant="primary")
        cancel = gr.Button("Cancel", variant="stop")
    return run, cancel
