"""/sdapi/v1: the AUTOMATIC1111-compatible subset, so existing clients work unchanged. Same field names and
response shapes (`images` as base64 PNG, `parameters`, `info` as a JSON string); A1111's many other fields are
accepted and ignored, as A1111 itself ignores what a script doesn't use. Work goes through the same job service.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.hashes import autov2
from ..engine.library import TITLE_HASH
from ..engine.metadata import a1111_fields, find_hashes, hash_report, read_png_text
from ..engine.resources import listed_files
from ..requests import GenerationRequest, Mode, RequestError, decode_image, image_to_base64
from ..samplers import KARRAS_SUFFIX, SAMPLERS
from ..service.outcomes import JobError, StudioError, classify
from ..studio import Studio
from .access import current_user
from .bodies import ERROR_RESPONSES, json_body, json_object


class OverrideSettings(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(None, description="the model for this request")
    CLIP_stop_at_last_layers: int | None = Field(None, description="A1111's CLIP skip (1: last layer)")
    sd_vae: str | None = Field(None, description="the VAE for this request ('Automatic'/'None': the model's)")


class Txt2ImgBody(BaseModel):
    """A1111's txt2img fields as its clients send them; other A1111 fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0  # A1111's own default (the studio's is 5)
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = Field(None, description="A1111 1.9+: 'Karras' picks the sampler's Karras variant")
    batch_size: int = 1
    n_iter: int = Field(1, ge=1, description="batch count: successive batches, seeds continuing")
    width: int | None = None
    height: int | None = None
    override_settings: OverrideSettings = OverrideSettings()


class Img2ImgBody(Txt2ImgBody):
    """A1111's img2img; with `mask`, inpainting (white = repaint)."""

    init_images: list[str] = Field(default_factory=list, description="base64 images (or data URLs)")
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = 4


class A1111PngInfoBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    image: str = Field(description="base64 PNG (or a data URL)")


def to_request_fields(body: Txt2ImgBody, default_model: str) -> dict[str, Any]:
    """A1111 payload -> GenerationRequest fields."""
    sampler = body.sampler_name or body.sampler_index or "Euler"
    if body.scheduler == "Karras" and sampler + KARRAS_SUFFIX in SAMPLERS:
        sampler += KARRAS_SUFFIX
    fields: dict[str, Any] = {
        "model": checkpoint_name(body.override_settings.sd_model_checkpoint) or default_model,
        "prompt": body.prompt, "negative_prompt": body.negative_prompt, "steps": body.steps,
        "guidance": body.cfg_scale, "seed": body.seed, "scheduler": sampler, "batch_size": body.batch_size,
        "width": body.width, "height": body.height,
        "clip_skip": body.override_settings.CLIP_stop_at_last_layers,
    }
    if body.override_settings.sd_vae not in (None, "Automatic", "None"):
        fields["vae"] = body.override_settings.sd_vae
    if isinstance(body, Img2ImgBody):
        if not body.init_images:
            raise RequestError("init_images", "needs one base64 image for img2img")
        fields.update(init_image=body.init_images[0], strength=body.denoising_strength)
        fields["mode"] = Mode.inpaint.value if body.mask else Mode.img2img.value
        if body.mask:
            fields.update(mask_image=body.mask, mask_blur=body.mask_blur)
    return {k: v for k, v in fields.items() if v is not None}


def checkpoint_name(title: str | None) -> str | None:
    """A1111 clients name a checkpoint by its sd-models title, "name.safetensors [abcdef1234]": the name part."""
    return TITLE_HASH.sub("", title).strip() if title else title


def sd_model(row: dict, file: Path | None, sha256: str | None) -> dict[str, Any]:
    """One checkpoint as A1111's sd-models lists it. A1111's title is the file name relative to its folder plus
    the AUTOV2 hash once known; `filename` is relative to its models folder here (A1111 gives the absolute path,
    which is the server's business)."""
    name = row["name"] + file.suffix if file else row["name"]
    short = autov2(sha256) if sha256 else None
    return {"title": f"{name} [{short}]" if short else name,
            "model_name": os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0] if file else name,
            "hash": short, "sha256": sha256, "filename": row.get("path") or name, "config": None}


# GenerationRequest fields -> the A1111 fields they came from, so a refusal names what the client sent.
A1111_NAMES = {"init_image": "init_images", "mask_image": "mask", "guidance": "cfg_scale",
               "scheduler": "sampler_name", "strength": "denoising_strength", "model": "sd_model_checkpoint",
               "clip_skip": "CLIP_stop_at_last_layers", "vae": "sd_vae"}


def in_a1111_names(error: JobError) -> JobError:
    name = A1111_NAMES.get(error.field or "")
    if name is None:
        return error
    message = error.message
    if message.startswith(f"{error.field}:"):
        message = name + message[len(error.field):]
    return dataclasses.replace(error, field=name, message=message)


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], responses=ERROR_RESPONSES)
    # A1111 has one progress bar for the whole server; here each user has their own.
    progress_by_user: dict[str, dict[str, Any]] = {}
    limits = studio.config.limits

    def progress_of(user: str) -> dict[str, Any]:
        return progress_by_user.setdefault(user, {"job_id": None, "step": 0, "total": 0, "eta_s": 0.0,
                                                  "preview": None})

    async def generate(request: Request, body_model: type[Txt2ImgBody], user: str) -> dict[str, Any]:
        raw = await json_object(request)
        body = body_model.model_validate(raw)
        try:
            job_request = studio.validate(to_request_fields(body, studio.config.default_model))
        except (ValidationError, RequestError) as exc:
            raise StudioError(in_a1111_names(classify(exc))) from None
        if body.n_iter * job_request.batch_size > limits.max_images_per_request:
            raise RequestError("n_iter", f"n_iter x batch_size is {body.n_iter * job_request.batch_size} images; at "
                                         f"most {limits.max_images_per_request} per request "
                                         "(limits.max_images_per_request)")
        images, infotexts, seeds = [], [], []
        for index in range(body.n_iter):  # A1111's batch count: successive batches, seeds continuing
            if index and job_request.seed is not None:
                job_request = job_request.model_copy(update={"seed": job_request.seed + job_request.batch_size})
            outcome = await _run(job_request, user)
            paths = studio.image_paths(outcome.result.get("image_ids", []))
            images += [base64.b64encode(path.read_bytes()).decode() for path in paths]
            seeds += outcome.result.get("seeds", [])
            infotexts += [_infotext(path) for path in paths]  # as the PNG has it, hashes included
            if not outcome.ok:  # interrupted: A1111 returns what was made so far
                break
        info = {"prompt": job_request.prompt, "negative_prompt": job_request.negative_prompt,
                "seed": seeds[0] if seeds else None, "all_seeds": seeds, "steps": job_request.steps,
                "cfg_scale": job_request.guidance, "sampler_name": job_request.scheduler,
                "sd_model_name": job_request.model, "infotexts": infotexts}
        return {"images": images, "parameters": raw, "info": json.dumps(info)}

    async def _run(request: GenerationRequest, user: str):
        """One job, followed to its outcome; a failure is raised with its kind (HTTP status from the table)."""
        progress = progress_of(user)
        progress.update(step=0, total=request.steps, eta_s=0.0, preview=None)
        try:
            async for event in studio.jobs.follow(request, user):
                progress["job_id"] = event.job_id
                if event.kind == "step":
                    progress.update(step=event.data["step"], total=event.data["total"], eta_s=event.data["eta_s"],
                                    preview=event.data["preview"])
                if event.final:
                    outcome = event.outcome
        finally:
            progress["job_id"] = None
        if not outcome.ok and outcome.status != "cancelled":
            raise StudioError(outcome.error)
        return outcome

    @router.post("/txt2img", operation_id="a1111_txt2img", openapi_extra=json_body(Txt2ImgBody))
    async def txt2img(request: Request, user: str = Depends(current_user)) -> dict:
        return await generate(request, Txt2ImgBody, user)

    @router.post("/img2img", operation_id="a1111_img2img", openapi_extra=json_body(Img2ImgBody))
    async def img2img(request: Request, user: str = Depends(current_user)) -> dict:
        """img2img; with `mask`, inpainting (white = repaint)."""
        return await generate(request, Img2ImgBody, user)

    @router.get("/progress", operation_id="a1111_progress")
    def get_progress(user: str = Depends(current_user)) -> dict:
        progress = progress_of(user)
        active = progress["job_id"] is not None
        done = progress["step"] / progress["total"] if active and progress["total"] else 0.0
        preview = progress["preview"]
        return {"progress": done, "eta_relative": progress["eta_s"] if active else 0.0,
                "state": {"job": progress["job_id"] or "", "job_count": studio.jobs.queue_length() + active,
                          "sampling_step": progress["step"] if active else 0,
                          "sampling_steps": progress["total"] if active else 0, "interrupted": False},
                "current_image": image_to_base64(preview) if active and preview is not None else None,
                "textinfo": None}

    @router.post("/interrupt", operation_id="a1111_interrupt")
    async def interrupt(user: str = Depends(current_user)) -> dict:
        progress = progress_of(user)
        if progress["job_id"]:
            await studio.jobs.cancel(progress["job_id"], user)
        return {}

    @router.post("/png-info", operation_id="a1111_png_info", openapi_extra=json_body(A1111PngInfoBody))
    async def png_info(request: Request) -> dict:
        body = A1111PngInfoBody.model_validate(await json_object(request))
        try:
            image = decode_image(body.image, limits.max_input_pixels)
        except ValueError as exc:
            raise RequestError("image", str(exc)) from None
        text = read_png_text(image)
        info = text.get("parameters", "")
        # The hashes it names are looked up among the listed models' known hashes (reads folders: off the loop).
        matches = await asyncio.to_thread(find_hashes, info, studio.hash_lookup()) if info else []
        parameters = a1111_fields(info) if info else {}
        found = next((match.local for match in matches if match.kind == "checkpoint" and match.local), None)
        if found:
            parameters["Model"] = found
        return {"info": info, "items": text, "parameters": parameters, **hash_report(matches)}

    @router.get("/sd-models", operation_id="a1111_sd_models")
    def sd_models() -> list[dict]:
        """Checkpoints as A1111 lists them; a file not hashed yet shows hash null and is queued (never hashed on
        the request)."""
        rows = [row for row in studio.models("checkpoint") if row["usable"]]  # as A1111: the ones it can load
        files = listed_files(studio.config, "checkpoint")
        models = []
        for row in rows:
            file = files.get(("checkpoint", row["name"]))
            models.append(sd_model(row, file, studio.hasher.known(file) if file else None))
        return models

    @router.get("/loras", operation_id="a1111_loras")
    def loras() -> list[dict]:
        """LoRAs as A1111's Lora extension lists them (`metadata`: the file's kohya training notes); `path` is
        relative to its models folder."""
        return [{"name": entry.name, "alias": entry.details.get("metadata", {}).get("ss_output_name") or entry.stem,
                 "path": entry.relative, "metadata": entry.details.get("metadata", {})}
                for entry in studio.model_entries("lora") if entry.usable]

    @router.get("/sd-vae", operation_id="a1111_sd_vae")
    def sd_vae() -> list[dict]:
        return [{"model_name": entry.name, "filename": entry.relative}
                for entry in studio.model_entries("vae") if entry.usable]

    @router.get("/embeddings", operation_id="a1111_embeddings")
    def embeddings() -> dict:
        """Textual-inversion embeddings as A1111 reports them; unusable files are `skipped`."""
        found: dict[str, dict] = {"loaded": {}, "skipped": {}}
        for entry in studio.model_entries("embedding"):
            details = {key: entry.details.get(key) for key in ("step", "sd_checkpoint", "sd_checkpoint_name",
                                                                 "shape", "vectors")}
            found["loaded" if entry.usable else "skipped"][entry.name] = details
        return found

    def refresh() -> None:
        studio.refresh_models()

    for route, operation in (("/refresh-checkpoints", "a1111_refresh_checkpoints"),
                             ("/refresh-loras", "a1111_refresh_loras"), ("/refresh-vae", "a1111_refresh_vae"),
                             ("/refresh-embeddings", "a1111_refresh_embeddings")):
        router.add_api_route(route, refresh, methods=["POST"], operation_id=operation,
                             summary="Read the models folders again")

    @router.get("/samplers", operation_id="a1111_samplers")
    def samplers() -> list[dict]:
        return [{"name": name, "aliases": [], "options": options} for name, (_, options) in SAMPLERS.items()]

    return router


def _infotext(path) -> str:
    with Image.open(path) as image:
        return read_png_text(image).get("parameters", "")
