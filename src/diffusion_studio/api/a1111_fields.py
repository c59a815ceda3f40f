"""A1111's txt2img/img2img bodies as its clients send them, and their translation into GenerationRequest fields.

Every A1111 field is declared (with A1111's defaults), so an A1111 client's body validates as it would there. What
the studio does with each: honoured fields become request fields; fields it cannot honour (face restoration,
tiling, variation seeds, scripts it doesn't have, ...) are reported by name in `info["unhonoured"]` with what was
done instead, never silently dropped; keys that are not A1111 fields at all are reported the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine.library import TITLE_HASH
from ..requests import RequestError
from ..samplers import KARRAS_SUFFIX, SAMPLERS
from ..service.outcomes import JobError

# A1111 1.9+ schedule types: name -> (label, aliases, default_rho, need_inner_model). The studio runs Automatic
# (each sampler's own schedule) and Karras (for the samplers that have a Karras variant); the others are accepted
# and reported as unhonoured, since A1111 clients keep sending them from saved settings.
A1111_SCHEDULES: dict[str, tuple[str, list[str], float | None, bool]] = {
    "automatic": ("Automatic", [], None, False),
    "uniform": ("Uniform", [], None, True),
    "karras": ("Karras", [], 7.0, False),
    "exponential": ("Exponential", [], None, False),
    "polyexponential": ("Polyexponential", [], 1.0, False),
    "sgm_uniform": ("SGM Uniform", ["SGMUniform"], None, True),
    "kl_optimal": ("KL Optimal", [], None, False),
    "align_your_steps": ("Align Your Steps", [], None, False),
    "simple": ("Simple", [], None, True),
    "normal": ("Normal", [], None, True),
    "ddim": ("DDIM", [], None, True),
    "beta": ("Beta", [], None, True),
}
HONOURED_SCHEDULES = ("automatic", "karras")
# A1111's old sampler aliases (k-diffusion names), as scripts still send them.
SAMPLER_ALIASES = {"k_euler": "Euler", "k_euler_a": "Euler a", "k_heun": "Heun", "k_lms": "LMS",
                   "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_ka": "DPM++ 2M Karras", "k_dpmpp_sde": "DPM++ SDE",
                   "ddim": "DDIM", "plms": "PNDM", "unipc": "UniPC", "lcm": "LCM"}
SAME = ("", "Use same checkpoint", "Use same sampler", "Use same scheduler")  # A1111's "as the first pass"
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


class OverrideSettings(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(None, description="the model for this request (an sd-models title)")
    CLIP_stop_at_last_layers: int | None = Field(None, description="A1111's CLIP skip (1: last layer)")
    sd_vae: str | None = Field(None, description="the VAE for this request ('Automatic'/'None': the model's)")


class A1111Body(BaseModel):
    """The fields txt2img and img2img share, with A1111's defaults."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = Field(None, description="A1111 1.9+ schedule type: Automatic or Karras here")
    batch_size: int | None = 1
    n_iter: int | None = Field(1, ge=1, description="batch count: successive batches, seeds continuing")
    steps: int | None = 20
    cfg_scale: float | None = 7.0  # A1111's own default (the studio's is 5)
    width: int | None = Field(None, description="default: the model's native size")
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: OverrideSettings | None = None
    override_settings_restore_afterwards: bool | None = Field(
        True, description="False: the override settings become this user's options, as in A1111")
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    infotext: str | None = None
    script_name: str | None = None
    script_args: list[Any] | None = None
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = None


class Txt2ImgBody(A1111Body):
    """A1111's txt2img; `enable_hr` runs hires fix (the hr_* fields and denoising_strength)."""

    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    firstpass_image: str | None = None


class Img2ImgBody(A1111Body):
    """A1111's img2img; with `mask`, inpainting (white = repaint)."""

    init_images: list[str] | None = Field(None, description="base64 images (or data URLs); the first is used")
    resize_mode: int | None = Field(0, description="0: just resize (others are reported; the image is resized)")
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = Field(0, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool | None = Field(True, description="only masked: inpaint the mask's box at full size")
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = Field(False, description="echo init_images and mask in `parameters`")


@dataclass
class Defaults:
    """A user's A1111 options: what a request without override_settings runs on."""

    model: str
    vae: str | None = None  # an A1111 sd_vae value: None, "Automatic", "None" or a VAE's name
    clip_skip: int = 1


@dataclass
class Names:
    """How A1111's names become the studio's: checkpoint titles and VAE names (the router's catalog checks them
    against what exists; by default a title's hash is dropped and names pass as they are)."""

    checkpoint: Callable[[str], str] = lambda title: TITLE_HASH.sub("", title).strip()
    vae: Callable[[str], str] = lambda name: name


@dataclass
class Translation:
    fields: dict[str, Any]  # GenerationRequest fields
    unhonoured: dict[str, str] = field(default_factory=dict)  # A1111 field -> what was done instead
    kept: dict[str, Any] = field(default_factory=dict)  # override settings that become the user's options


def to_request_fields(body: A1111Body, default_model: str) -> dict[str, Any]:
    """A1111 payload -> GenerationRequest fields, with `default_model` and no other user options."""
    return translate(body, Defaults(default_model)).fields


def translate(body: A1111Body, defaults: Defaults, names: Names | None = None) -> Translation:
    names = names or Names()
    overrides = body.override_settings or OverrideSettings()
    unhonoured: dict[str, str] = {}
    model = names.checkpoint(overrides.sd_model_checkpoint) if overrides.sd_model_checkpoint else defaults.model
    vae_option = names.vae(overrides.sd_vae) if overrides.sd_vae else defaults.vae
    clip_skip = overrides.CLIP_stop_at_last_layers or defaults.clip_skip
    sampler = pick_sampler(body.sampler_name or body.sampler_index or "Euler", body.scheduler, unhonoured)
    fields: dict[str, Any] = {
        "model": model, "prompt": body.prompt or "", "negative_prompt": body.negative_prompt or "",
        "steps": body.steps if body.steps is not None else 20,
        "guidance": body.cfg_scale if body.cfg_scale is not None else 7.0,
        "seed": body.seed if body.seed is not None else -1, "scheduler": sampler,
        "batch_size": body.batch_size if body.batch_size is not None else 1,
        "width": body.width, "height": body.height, "clip_skip": clip_skip,
        "vae": None if vae_option in (None, "Automatic", "None") else vae_option,
    }
    for key in overrides.model_extra or {}:
        unhonoured[f"override_settings.{key}"] = "not a setting this studio has; ignored"
    if isinstance(body, Txt2ImgBody) and body.enable_hr:
        fields["hires"] = _hires(body, sampler, unhonoured)
    if isinstance(body, Img2ImgBody):
        fields.update(_img2img(body, unhonoured))
    _report_unhonoured(body, unhonoured)
    kept = {}
    if body.override_settings_restore_afterwards is False:
        kept = {key: value for key, value in overrides.model_dump(exclude_none=True).items()
                if key in OverrideSettings.model_fields}
    return Translation({k: v for k, v in fields.items() if v is not None}, unhonoured, kept)


def pick_sampler(name: str, schedule: str | None, unhonoured: dict[str, str]) -> str:
    """A1111's sampler + schedule type -> one of the studio's samplers (a Karras schedule is a sampler variant)."""
    sampler = SAMPLER_ALIASES.get(name.lower(), next((s for s in SAMPLERS if s.lower() == name.lower()), name))
    wanted = schedule_name(schedule)
    if wanted == "karras" and not sampler.endswith(KARRAS_SUFFIX):
        if sampler + KARRAS_SUFFIX in SAMPLERS:
            return sampler + KARRAS_SUFFIX
        unhonoured["scheduler"] = f"{sampler} has no Karras schedule here; it ran its own"
    elif wanted not in (None, "automatic", "karras"):
        unhonoured["scheduler"] = f"the {A1111_SCHEDULES[wanted][0]} schedule is not available here; {sampler} ran " \
                                  "its own"
    return sampler


def schedule_name(value: str | None) -> str | None:
    """An A1111 schedule type by name, label or alias (any case); an unknown one is refused."""
    if not value:
        return None
    wanted = value.strip().lower()
    for name, (label, aliases, _, _) in A1111_SCHEDULES.items():
        if wanted in (name, label.lower(), *(alias.lower() for alias in aliases)):
            return name
    raise RequestError("scheduler", f"unknown schedule type '{value}'; here: "
                                    f"{', '.join(A1111_SCHEDULES[n][0] for n in HONOURED_SCHEDULES)} (A1111's "
                                    f"others are accepted and run each sampler's own schedule)")


def _hires(body: Txt2ImgBody, sampler: str, unhonoured: dict[str, str]) -> dict[str, Any]:
    if body.hr_checkpoint_name not in (None, *SAME):
        unhonoured["hr_checkpoint_name"] = "the second pass ran on the first pass's model"
    if body.hr_sampler_name not in (None, *SAME) and body.hr_sampler_name != sampler:
        unhonoured["hr_sampler_name"] = f"the second pass ran with {sampler}"
    if body.hr_scheduler not in (None, *SAME) and schedule_name(body.hr_scheduler) != schedule_name(body.scheduler):
        unhonoured["hr_scheduler"] = "the second pass ran the first pass's schedule"
    for name, main in (("hr_prompt", body.prompt), ("hr_negative_prompt", body.negative_prompt)):
        if getattr(body, name) and getattr(body, name) != main:
            unhonoured[name] = "the second pass used the first pass's prompts"
    if (body.firstphase_width or 0) > 0 or (body.firstphase_height or 0) > 0:
        unhonoured["firstphase_width"] = "the old hires fix size fields are not used: send hr_scale or hr_resize_x/y"
    hires = {"scale": body.hr_scale if body.hr_scale is not None else 2.0,
             "upscaler": body.hr_upscaler or "Latent", "steps": body.hr_second_pass_steps or 0,
             "denoising_strength": body.denoising_strength if body.denoising_strength is not None else 0.7}
    if body.hr_resize_x:
        hires["width"] = body.hr_resize_x
    if body.hr_resize_y:
        hires["height"] = body.hr_resize_y
    return hires


def _img2img(body: Img2ImgBody, unhonoured: dict[str, str]) -> dict[str, Any]:
    if not body.init_images:
        raise RequestError("init_images", "needs one base64 image for img2img")
    if len(body.init_images) > 1:
        unhonoured["init_images"] = f"only the first of {len(body.init_images)} images was used"
    fields: dict[str, Any] = {"init_image": body.init_images[0],
                              "strength": body.denoising_strength if body.denoising_strength is not None else 0.75,
                              "mode": "img2img"}
    if body.initial_noise_multiplier not in (None, 1.0):
        unhonoured["initial_noise_multiplier"] = "the noise was not scaled"
    if body.latent_mask:
        unhonoured["latent_mask"] = "the mask was used for the latents too"
    if not body.mask:
        return fields
    fill = body.inpainting_fill if body.inpainting_fill is not None else 0
    if fill not in INPAINTING_FILL:
        raise RequestError("inpainting_fill", "must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent "
                                              f"nothing); got {fill}")
    blur = body.mask_blur
    if blur is None:
        blur_x, blur_y = body.mask_blur_x or 0, body.mask_blur_y or 0
        blur = max(blur_x, blur_y)
        if blur_x != blur_y:
            unhonoured["mask_blur_x"] = f"one blur radius for both directions here: {blur}"
    fields.update(mode="inpaint", mask_image=body.mask, mask_blur=blur, inpaint_fill=INPAINTING_FILL[fill],
                  mask_invert=bool(body.inpainting_mask_invert),
                  inpaint_area="masked" if body.inpaint_full_res is not False else "whole",
                  inpaint_padding=body.inpaint_full_res_padding or 0)
    return fields


def _report_unhonoured(body: A1111Body, unhonoured: dict[str, str]) -> None:
    checks = {
        "restore_faces": (body.restore_faces, "no face restoration here"),
        "tiling": (body.tiling, "no seamless tiling here"),
        "subseed_strength": ((body.subseed_strength or 0) != 0, "no variation seeds here; the seed alone was used"),
        "seed_resize_from_w": ((body.seed_resize_from_w or 0) > 0 or (body.seed_resize_from_h or 0) > 0,
                               "no seed resizing here"),
        "styles": (bool(body.styles), "no stored prompt styles here; put their text into the prompt"),
        "eta": (body.eta not in (None, 0.0, 1.0), "eta is each sampler's default here"),
        "s_churn": (any((value or 0) > 0 for value in (body.s_churn, body.s_tmin, body.s_tmax, body.s_min_uncond))
                    or body.s_noise not in (None, 1.0), "the sampler noise settings are each sampler's default here"),
        "refiner_checkpoint": (bool(body.refiner_checkpoint), "no refiner switch here; the model ran every step"),
        "do_not_save_samples": (body.do_not_save_samples, "every image is kept in your history here"),
        "disable_extra_networks": (body.disable_extra_networks, "<lora:...> tags in the prompts were applied"),
        "firstpass_image": (bool(getattr(body, "firstpass_image", None)), "the first pass was generated"),
    }
    for name, (applies, reason) in checks.items():
        if applies:
            unhonoured[name] = reason
    if body.script_name:
        raise RequestError("script_name", f"no script '{body.script_name}' here (/sdapi/v1/scripts lists none)")
    for name, spec in (body.alwayson_scripts or {}).items():
        args = spec.get("args") if isinstance(spec, dict) else spec
        if args not in (None, [], [False], [{}]):  # what clients send for a script they leave off
            unhonoured[f"alwayson_scripts.{name}"] = "no such script here; the image was made without it"
    for key in body.model_extra or {}:
        unhonoured[key] = "not an A1111 field; ignored"


# GenerationRequest fields -> the A1111 fields they came from, so a refusal names what the client sent.
A1111_NAMES = {"init_image": "init_images", "mask_image": "mask", "guidance": "cfg_scale",
               "scheduler": "sampler_name", "strength": "denoising_strength", "model": "sd_model_checkpoint",
               "clip_skip": "CLIP_stop_at_last_layers", "vae": "sd_vae", "hires": "enable_hr",
               "hires.scale": "hr_scale", "hires.upscaler": "hr_upscaler", "hires.steps": "hr_second_pass_steps",
               "hires.width": "hr_resize_x", "hires.height": "hr_resize_y",
               "hires.denoising_strength": "denoising_strength", "mask_invert": "inpainting_mask_invert",
               "inpaint_area": "inpaint_full_res", "inpaint_padding": "inpaint_full_res_padding",
               "inpaint_fill": "inpainting_fill", "upscaler": "upscaler_1"}


def in_a1111_names(error: JobError) -> JobError:
    name = A1111_NAMES.get(error.field or "")
    if name is None:
        return error
    message = error.message
    if message.startswith(f"{error.field}:"):
        message = name + message[len(error.field):]
    return dataclasses.replace(error, field=name, message=message)
