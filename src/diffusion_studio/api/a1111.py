"""/sdapi/v1: the AUTOMATIC1111-compatible subset, so existing clients work unchanged. Same field names and
response shapes (`images` as base64 PNG, `parameters`, `info` as a JSON string); A1111's many other fields are
accepted and ignored, as A1111 itself ignores what a script doesn't use. Work goes through the same job service.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from PIL import Image

from ..engine.metadata import a1111_parameters, read_png_text
from ..requests import GenerationRequest, Mode, RequestError, decode_image, image_to_base64
from ..samplers import KARRAS_SUFFIX, SAMPLERS
from ..studio import Studio
from .access import current_user

def to_request_fields(body: dict[str, Any], img2img: bool, default_model: str) -> dict[str, Any]:
    """A1111 payload -> GenerationRequest fields."""
    sampler = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    if body.get("scheduler") == "Karras" and sampler + KARRAS_SUFFIX in SAMPLERS:
        sampler += KARRAS_SUFFIX
    override = body.get("override_settings") or {}
    fields: dict[str, Any] = {
        "model": override.get("sd_model_checkpoint") or default_model,
        "prompt": body.get("prompt", ""), "negative_prompt": body.get("negative_prompt", ""),
        "steps": body.get("steps", 20), "guidance": body.get("cfg_scale", 7.0), "seed": body.get("seed", -1),
        "scheduler": sampler, "batch_size": body.get("batch_size", 1),
        "width": body.get("width"), "height": body.get("height"),
    }
    if img2img:
        images = body.get("init_images") or []
        if not images:
            raise RequestError("init_images", "needs one base64 image for img2img")
        fields.update(init_image=images[0], strength=body.get("denoising_strength", 0.75))
        fields["mode"] = Mode.inpaint.value if body.get("mask") else Mode.img2img.value
        if body.get("mask"):
            fields.update(mask_image=body["mask"], mask_blur=body.get("mask_blur", 4))
    return {k: v for k, v in fields.items() if v is not None}


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
    # A1111 has one progress bar for the whole server; here each user has their own.
    progress_by_user: dict[str, dict[str, Any]] = {}

    def progress_of(user: str) -> dict[str, Any]:
        return progress_by_user.setdefault(user, {"job_id": None, "step": 0, "total": 0, "eta_s": 0.0,
                                                  "preview": None})

    async def generate(body: dict[str, Any], img2img: bool, user: str) -> dict[str, Any]:
        request = studio.validate(to_request_fields(body, img2img, studio.config.default_model))
        count = max(1, int(body.get("n_iter", 1)))
        images, infotexts, seeds = [], [], []
        for index in range(count):  # A1111's batch count: successive batches, seeds continuing
            if index and request.seed is not None:
                request = request.model_copy(update={"seed": request.seed + request.batch_size})
            job = await _run(request, user)
            paths = studio.image_paths(job.result.get("image_ids", []))
            images += [base64.b64encode(path.read_bytes()).decode() for path in paths]
            seeds += job.result.get("seeds", [])
            infotexts += [a1111_parameters(request, seed, *_size(path), request.model) for path, seed in
                          zip(paths, job.result.get("seeds", []))]
        info = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": seeds[0] if seeds
                else None, "all_seeds": seeds, "steps": request.steps, "cfg_scale": request.guidance,
                "sampler_name": request.scheduler, "sd_model_name": request.model, "infotexts": infotexts}
        return {"images": images, "parameters": body, "info": json.dumps(info)}

    async def _run(request: GenerationRequest, user: str):
        progress = progress_of(user)
        progress.update(step=0, total=request.steps, eta_s=0.0, preview=None)
        try:
            async for event in studio.jobs.follow(request, user):
                progress["job_id"] = job_id = event.job_id
                if event.kind == "step":
                    progress.update(step=event.data["step"], total=event.data["total"], eta_s=event.data["eta_s"],
                                    preview=event.data["preview"])
        finally:
            progress["job_id"] = None
        record = studio.jobs.get(job_id)
        if record.status.value in ("failed", "interrupted"):
            raise RequestError("request", record.error or record.status.value)
        return record

    @router.post("/txt2img", operation_id="a1111_txt2img")
    async def txt2img(request: Request, user: str = Depends(current_user)) -> dict:
        return await generate(await request.json(), img2img=False, user=user)

    @router.post("/img2img", operation_id="a1111_img2img")
    async def img2img(request: Request, user: str = Depends(current_user)) -> dict:
        """img2img; with `mask`, inpainting (white = repaint)."""
        return await generate(await request.json(), img2img=True, user=user)

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

    @router.post("/png-info", operation_id="a1111_png_info")
    async def png_info(request: Request) -> dict:
        body = await request.json()
        try:
            image = decode_image(body.get("image", ""), studio.config.limits.max_input_pixels)
        except ValueError as exc:
            raise RequestError("image", str(exc)) from None
        text = read_png_text(image)
        return {"info": text.get("parameters", ""), "items": text, "parameters": {}}

    @router.get("/sd-models", operation_id="a1111_sd_models")
    def sd_models() -> list[dict]:
        return [{"title": row["name"], "model_name": row["name"], "hash": None, "sha256": None,
                 "filename": row["description"], "config": None}
                for row in studio.models() if row["role"] == "base"]

    @router.get("/samplers", operation_id="a1111_samplers")
    def samplers() -> list[dict]:
        return [{"name": name, "aliases": [], "options": options} for name, (_, options) in SAMPLERS.items()]

    return router


def _size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size
