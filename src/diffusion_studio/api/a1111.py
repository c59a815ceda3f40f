"""/sdapi/v1: AUTOMATIC1111's API as its clients (webuiapi, SillyTavern, Open WebUI, scripts) call it. Same field
names and response shapes (`images` as base64 PNG, `parameters`, `info` as a JSON string with A1111's keys and
`infotexts`); what the studio can't honour is accepted and named in `info["unhonoured"]`. Work goes through the
same job service as every other front end.

A1111 has one model, one set of options and one progress bar for the whole server; here each user has their own:
`POST /options` sets that user's default model, VAE and CLIP skip (kept in the data dir), `/progress`,
`/interrupt` and `/skip` act on that user's current request. This module holds the generation, progress and
options routes; listings and extras are in a1111_listings.py and a1111_extras.py, the body fields and their
translation in a1111_fields.py, A1111's names for models in a1111_options.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from PIL import Image
from pydantic import ValidationError

from ..engine.metadata import hires_base_size, read_png_text
from ..requests import GenerationRequest, RequestError, image_to_base64
from ..samplers import KARRAS_SUFFIX
from ..service.outcomes import StudioError, classify
from ..service.preferences import Preferences
from ..studio import Studio
from .a1111_extras import build_extras_router
from .a1111_fields import (
    A1111Body, Img2ImgBody, Translation, Txt2ImgBody, in_a1111_names, to_request_fields, translate,
)
from .a1111_listings import build_listings_router, studio_version
from .a1111_options import Catalog, OptionsBody, defaults_of, option_changes, options_of
from .access import current_user
from .bodies import ERROR_RESPONSES, json_body, json_object

__all__ = ["Img2ImgBody", "Txt2ImgBody", "build_router", "to_request_fields"]

PREFERENCES_FILE = "preferences.json"


@dataclass
class Progress:
    """One user's A1111 progress bar: the iteration (job_no of job_count, A1111's n_iter) and its job's steps."""

    active: bool = False
    job_id: str | None = None
    job_no: int = 0
    job_count: int = 0
    step: int = 0
    total: int = 0
    eta_s: float = 0.0
    started: float = 0.0  # when this iteration's job began running (monotonic)
    position: int | None = None  # in the queue, while waiting
    preview: Image.Image | None = None
    interrupted: bool = False
    skipped: bool = False
    job_timestamp: str = "0"

    def start(self, iterations: int) -> None:
        self.active, self.job_count, self.job_no, self.interrupted = True, iterations, 0, False
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")

    def begin(self, index: int, steps: int) -> None:
        self.job_no, self.job_id, self.step, self.total, self.eta_s = index, None, 0, steps, 0.0
        self.started, self.position, self.preview, self.skipped = time.monotonic(), None, None, False

    def finish(self) -> None:
        self.active, self.job_id, self.preview, self.position = False, None, None, None

    def fraction(self) -> float:
        if not self.active or not self.job_count:
            return 0.0
        return min(1.0, (self.job_no + (self.step / self.total if self.total else 0.0)) / self.job_count)

    def eta(self) -> float:
        """This job's remaining time plus, for each iteration still to come, one like it."""
        if not self.active or not self.step:
            return 0.0
        per_iteration = time.monotonic() - self.started + self.eta_s
        return self.eta_s + per_iteration * (self.job_count - self.job_no - 1)


@dataclass
class UserProgress:
    """A user's A1111 requests in progress, oldest first (a client such as Open WebUI may run several at once
    under one account), and the last one to finish (its interrupted flag
    stays visible until the next request starts, as in A1111)."""

    calls: list[Progress] = field(default_factory=list)
    last: Progress = field(default_factory=Progress)

    def shown(self) -> Progress:
        """The oldest running request, else the oldest waiting one, else the last finished."""
        running = [call for call in self.calls if call.job_id is not None and call.position is None]
        return (running or self.calls or [self.last])[0]


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], responses=ERROR_RESPONSES)
    router.include_router(build_listings_router(studio))
    router.include_router(build_extras_router(studio))
    preferences = Preferences(Path(studio.config.data_dir) / PREFERENCES_FILE)
    progress_by_user: dict[str, UserProgress] = {}
    limits = studio.config.limits

    def progress_of(user: str) -> UserProgress:
        return progress_by_user.setdefault(user, UserProgress())

    async def generate(request: Request, body_model: type[A1111Body], user: str) -> dict[str, Any]:
        raw = await json_object(request)
        body = body_model.model_validate(raw)
        catalog = await asyncio.to_thread(Catalog, studio)  # reads the models folders' listing
        translation = translate(body, defaults_of(preferences.get(user), studio), catalog.names())
        try:
            job_request = studio.validate(translation.fields)
        except (ValidationError, RequestError) as exc:
            raise StudioError(in_a1111_names(classify(exc))) from None
        iterations = body.n_iter or 1
        if iterations * job_request.batch_size > limits.max_images_per_request:
            raise RequestError("n_iter", f"n_iter x batch_size is {iterations * job_request.batch_size} images; at "
                                         f"most {limits.max_images_per_request} per request "
                                         "(limits.max_images_per_request)")
        _report_resize(body, job_request, translation)
        if translation.kept:  # override_settings_restore_afterwards false: they become the user's options
            changes, _ = option_changes(OptionsBody(**translation.kept), translation.kept, {}, catalog)
            await asyncio.to_thread(preferences.update, user, changes)

        progress, running = Progress(), progress_of(user)
        progress.start(iterations)
        running.calls.append(progress)
        images: list[str] = []
        seeds: list[int] = []
        infotexts: list[str] = []
        sizes: list[tuple[int, int]] = []
        skipped: list[int] = []
        try:
            for index in range(iterations):  # A1111's batch count: successive batches, seeds continuing
                if progress.interrupted:
                    break
                if index:
                    next_seed = job_request.seed + job_request.batch_size if job_request.seed is not None else \
                        (seeds[-1] + 1 if seeds else None)
                    job_request = job_request.model_copy(update={"seed": next_seed})
                progress.begin(index, job_request.steps)
                outcome = await _run(job_request, user, progress)
                made = await asyncio.to_thread(_read_images, studio, outcome.result.get("image_ids", []))
                images += [data for data, _, _ in made]
                infotexts += [text for _, text, _ in made]  # as the PNG has it, hashes included
                sizes += [size for _, _, size in made]
                seeds += outcome.result.get("seeds", [])
                if not outcome.ok:  # A1111 returns what was made so far; a skip goes on with the next batch
                    if progress.skipped and not progress.interrupted:
                        skipped.append(index)
                        continue
                    break
        finally:
            progress.finish()
            running.calls.remove(progress)
            running.last = progress
        info = _info(body, job_request, translation, catalog, seeds, infotexts, sizes, progress, skipped)
        parameters = {key: value for key, value in raw.items() if key in body_model.model_fields}
        if isinstance(body, Img2ImgBody) and not body.include_init_images:  # as A1111: not echoed back
            parameters.update({key: None for key in ("init_images", "mask") if key in parameters})
        return {"images": images if body.send_images is not False else [], "parameters": parameters,
                "info": json.dumps(info)}

    async def _run(request: GenerationRequest, user: str, progress: Progress):
        """One job, followed to its outcome; a failure is raised with its kind (HTTP status from the table)."""
        async def track(event) -> None:
            if progress.job_id is None:
                progress.job_id = event.job_id
                if progress.interrupted or progress.skipped:  # asked for before the job had an id
                    await studio.jobs.cancel(event.job_id, user)
            if event.kind in ("queued", "position"):
                progress.position = event.data.get("position")
            elif event.kind == "running":
                progress.position, progress.started = None, time.monotonic()
            elif event.kind == "step":
                progress.step, progress.total = event.data["step"], event.data["total"]
                progress.eta_s, progress.preview = event.data["eta_s"], event.data["preview"]

        try:
            outcome = await studio.jobs.outcome(request, user, on_event=track)
        except (RequestError, StudioError) as exc:  # refused at submit (an unknown model, upscaler, LoRA...)
            raise StudioError(in_a1111_names(classify(exc))) from None
        if not outcome.ok and outcome.status != "cancelled":
            raise StudioError(in_a1111_names(outcome.error))
        return outcome

    @router.post("/txt2img", operation_id="a1111_txt2img", openapi_extra=json_body(Txt2ImgBody))
    async def txt2img(request: Request, user: str = Depends(current_user)) -> dict:
        """txt2img; `enable_hr` adds hires fix."""
        return await generate(request, Txt2ImgBody, user)

    @router.post("/img2img", operation_id="a1111_img2img", openapi_extra=json_body(Img2ImgBody))
    async def img2img(request: Request, user: str = Depends(current_user)) -> dict:
        """img2img; with `mask`, inpainting (white = repaint)."""
        return await generate(request, Img2ImgBody, user)

    @router.get("/progress", operation_id="a1111_progress")
    def get_progress(skip_current_image: bool = False, user: str = Depends(current_user)) -> dict:
        """This user's progress. `state.job_count`: iterations of the running request, or (idle) the user's jobs
        queued or running from other front ends; 0 means nothing of theirs is pending."""
        running = progress_of(user)
        progress = running.shown()
        active = progress.active
        preview = progress.preview if active and not skip_current_image else None
        return {"progress": progress.fraction(), "eta_relative": progress.eta(),
                "state": {"skipped": progress.skipped, "interrupted": progress.interrupted,
                          "stopping_generation": False,
                          "job": f"Batch {progress.job_no + 1} out of {progress.job_count}" if active else "",
                          "job_count": progress.job_count + len(running.calls) - 1 if active else
                          studio.jobs.active_jobs(user),
                          "job_timestamp": progress.job_timestamp, "job_no": progress.job_no if active else 0,
                          "sampling_step": progress.step if active else 0,
                          "sampling_steps": progress.total if active else 0},
                "current_image": image_to_base64(preview) if preview is not None else None,
                "textinfo": f"In the queue: position {progress.position}" if active and progress.position else None,
                "current_task": progress.job_id if active else None}

    @router.post("/interrupt", operation_id="a1111_interrupt")
    async def interrupt(user: str = Depends(current_user)) -> dict:
        """Stop this user's running requests: their batches end within a step, no further batch starts."""
        for progress in list(progress_of(user).calls):
            progress.interrupted = True
            if progress.job_id:
                await studio.jobs.cancel(progress.job_id, user)
        return {}

    @router.post("/skip", operation_id="a1111_skip")
    async def skip(user: str = Depends(current_user)) -> dict:
        """Skip the current batch of this user's request (n_iter): it stops within a step, the next one runs."""
        progress = progress_of(user).shown()
        if progress.active:
            progress.skipped = True
            if progress.job_id:
                await studio.jobs.cancel(progress.job_id, user)
        return {}

    @router.get("/options", operation_id="a1111_get_options")
    def get_options(user: str = Depends(current_user)) -> dict:
        """A1111's options as this user's requests run (their model, VAE and CLIP skip)."""
        return options_of(defaults_of(preferences.get(user), studio), Catalog(studio), studio)

    @router.post("/options", operation_id="a1111_set_options", openapi_extra=json_body(OptionsBody))
    async def set_options(request: Request, user: str = Depends(current_user)) -> dict:
        """Set this user's default model (sd_model_checkpoint), VAE (sd_vae) and CLIP skip; the whole dict from GET
        may be posted back. Other keys are accepted; the answer names those ignored and why."""
        raw = await json_object(request)
        body = OptionsBody.model_validate(raw)
        catalog = await asyncio.to_thread(Catalog, studio)
        current = options_of(defaults_of(preferences.get(user), studio), catalog, studio)
        changes, ignored = option_changes(body, raw, current, catalog)
        if changes:
            await asyncio.to_thread(preferences.update, user, changes)
        return {"updated": sorted(changes), "ignored": ignored}

    return router


def _read_images(studio: Studio, image_ids: list[str]) -> list[tuple[str, str, tuple[int, int]]]:
    """(base64 PNG, its infotext, its size) of each saved image (history and file reads: call off the loop)."""
    made = []
    for path in studio.image_paths(image_ids):
        with Image.open(path) as image:
            made.append((base64.b64encode(path.read_bytes()).decode(), read_png_text(image).get("parameters", ""),
                         image.size))
    return made


def _report_resize(body: A1111Body, request: GenerationRequest, translation: Translation) -> None:
    if not isinstance(body, Img2ImgBody) or not body.resize_mode or request.init_image is None:
        return
    size = (request.width or request.init_image.width, request.height or request.init_image.height)
    if request.init_image.size != size:
        translation.unhonoured["resize_mode"] = f"the image was resized to {size[0]}x{size[1]} (just resize)"


def _info(body: A1111Body, request: GenerationRequest, translation: Translation, catalog: Catalog,
          seeds: list[int], infotexts: list[str], sizes: list[tuple[int, int]], progress: Progress,
          skipped: list[int]) -> dict[str, Any]:
    """A1111's `info` (Processed.js()) for what ran, plus `unhonoured` (and `skipped` batches, if any)."""
    row = catalog.row(request.model) or {}
    width, height = request.width, request.height
    if sizes and (width is None or height is None):
        width, height = hires_base_size(request.hires, *sizes[0]) if request.hires else sizes[0]
    sampler = request.scheduler
    extra: dict[str, Any] = {}
    if sampler.endswith(KARRAS_SUFFIX):
        extra["Schedule type"] = "Karras"
    if request.hires is not None:
        extra.update({"Hires upscale": request.hires.scale, "Hires upscaler": request.hires.upscaler,
                      "Hires steps": request.hires.steps or None})
        if request.hires.width or request.hires.height:
            extra["Hires resize"] = f"{request.hires.width or 0}x{request.hires.height or 0}"
    count = len(seeds)
    prompt, negative = body.prompt or "", body.negative_prompt or ""
    subseed = body.subseed if body.subseed is not None else -1
    vae = request.vae
    info = {
        "prompt": prompt, "all_prompts": [prompt] * count,  # as sent, <lora:...> tags included (as A1111's)
        "negative_prompt": negative, "all_negative_prompts": [negative] * count,
        "seed": seeds[0] if seeds else None, "all_seeds": seeds, "subseed": subseed, "all_subseeds": [subseed] * count,
        "subseed_strength": body.subseed_strength or 0, "width": width, "height": height, "sampler_name": sampler,
        "cfg_scale": request.guidance, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": row.get("model_name", request.model), "sd_model_hash": row.get("hash"),
        "sd_vae_name": vae, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": request.hires.denoising_strength if request.hires else
        (request.strength if request.init_image is not None else None),
        "extra_generation_params": {key: value for key, value in extra.items() if value is not None},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": body.styles or [],
        "job_timestamp": progress.job_timestamp, "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": "inpaint" in str(row.get("title", "")).lower(),
        "version": f"diffusion-studio {studio_version()}",
        "unhonoured": translation.unhonoured,
    }
    if skipped:
        info["skipped"] = skipped
    return info
