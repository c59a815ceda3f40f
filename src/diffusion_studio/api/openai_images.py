"""OpenAI's images API (`/v1/images/generations`, `/edits`, `/variations`, `/v1/models`), as the official SDKs and
Open WebUI call it, over the same job service as every other front end (queue, limits, history).

The studio's API tokens are the bearer keys. Fields OpenAI defines that have no meaning here are accepted and
ignored, as documented in the README: `quality`, `style`, `background`, `moderation`, `output_format`
(always PNG) and `user` (the caller is the token's user). An OpenAI model name (`dall-e-2`, `dall-e-3`,
`gpt-image-1`, ...) means the studio's default model; any studio model name picks that model.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..engine.sources import list_models
from ..requests import GenerationRequest, RequestError, decode_image
from ..service.outcomes import StudioError, classify
from ..studio import Studio
from .access import current_user
from .bodies import error_responses, json_body, json_object

log = logging.getLogger(__name__)

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini")
# What a variation keeps of its image: enough to be recognisably the same picture, changed in the details.
VARIATION_STRENGTH = 0.6
# An edit without a mask or transparent pixels changes the whole image, as much as a variation.
UNMASKED_EDIT_STRENGTH = 0.75


class GenerationsBody(BaseModel):
    """OpenAI's `images.generate` body; unknown fields are refused (a typo is not silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT, or auto (the model's native size)")
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    user: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


OPENAI_ERRORS = error_responses(OpenAIErrorBody, {
    400: "Invalid input; `param` names it (OpenAI's 400 invalid_request_error)", 404: "No such image",
    409: "Cancelled", 422: None})
_IMAGE_FORM = {"type": "object", "required": ["image"], "properties": {
    "image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
    "prompt": {"type": "string"}, "model": {"type": "string"}, "n": {"type": "string"},
    "size": {"type": "string"}, "response_format": {"type": "string", "enum": ["b64_json", "url"]}}}
FORM_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _IMAGE_FORM}}}}


class OpenAIError(Exception):
    """A refusal in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def openai_error(exc: BaseException) -> OpenAIError:
    """Any exception, through the one outcome table, in OpenAI's shape."""
    error = classify(exc)
    retry = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    message = f"{error.field}: {error.message}" if error.field else error.message
    status = 400 if error.info.http_status == 422 else error.info.http_status  # OpenAI says 400 for bad input
    return OpenAIError(status, message, error.field, error.kind.value, retry)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "", "auto"):
        return None, None
    width, _, height = size.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise RequestError("size", f"'{size}' should be WIDTHxHEIGHT (e.g. 512x512) or auto")
    return int(width), int(height)


def model_for(studio: Studio, name: str | None) -> str:
    return studio.config.default_model if name in (None, "", *OPENAI_MODELS) else name


def mask_from_alpha(image: Image.Image) -> Image.Image | None:
    """OpenAI's mask: fully transparent pixels are where to edit (white in ours), the rest is kept. None when the
    image has no transparent pixel."""
    if "A" not in image.getbands() and image.mode != "P":
        return None
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    if not (alpha == 0).any():
        return None
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"], responses=OPENAI_ERRORS)
    limits = studio.config.limits

    async def run(fields: dict[str, Any], response_format: str, user: str, base_url: str) -> dict[str, Any]:
        """One job through the queue; its images as OpenAI returns them."""
        request: GenerationRequest = studio.validate(fields)
        if request.batch_size > limits.max_images_per_request:
            raise RequestError("n", f"at most {limits.max_images_per_request} images per request "
                                    "(limits.max_images_per_request)")
        outcome = await studio.jobs.outcome(request, user)
        if not outcome.ok:
            raise StudioError(outcome.error)
        image_ids = outcome.result["image_ids"]
        if response_format == "url":  # OpenAI's URLs open without a key: the studio's share links do too
            data = [{"url": base_url.rstrip("/") + studio.share_link(image_id, user)} for image_id in image_ids]
        else:
            data = [{"b64_json": base64.b64encode(path.read_bytes()).decode()}
                    for path in studio.image_paths(image_ids)]
        return {"created": int(time.time()), "data": data}

    def read_image(value, field: str) -> Image.Image:
        try:
            return decode_image(value, limits.max_input_pixels)
        except ValueError as exc:
            raise RequestError(field, str(exc)) from None

    async def form_fields(request: Request) -> tuple[dict[str, Any], Image.Image, Image.Image | None]:
        """An edits/variations multipart body: its plain fields, the image (`image` or the first of `image[]`) and
        the mask, read as images with the studio's own limits."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError("image", "send multipart/form-data with an 'image' file (as OpenAI's API takes it)")
        try:
            form = await request.form()
        except Exception as exc:  # a broken multipart body (boundary, headers, encoding): the client's input
            raise RequestError("body", f"is not a readable multipart/form-data body ({type(exc).__name__})") from None
        upload = form.get("image") or form.get("image[]")
        if upload is None or isinstance(upload, str):
            raise RequestError("image", "is required: a PNG, JPEG or WEBP file")
        image = read_image(await upload.read(), "image")
        mask_upload = form.get("mask")
        mask = None
        if mask_upload is not None and not isinstance(mask_upload, str):
            mask = read_image(await mask_upload.read(), "mask")
        plain = {key: value for key, value in form.items() if isinstance(value, str)}
        return plain, image, mask

    def common(plain: dict[str, Any], base: dict[str, Any]) -> tuple[dict[str, Any], str]:
        response_format = plain.get("response_format") or "b64_json"
        if response_format not in ("b64_json", "url"):
            raise RequestError("response_format", f"'{response_format}': must be b64_json or url")
        n = plain.get("n", 1)
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise RequestError("n", f"'{n}' is not a whole number") from None
        width, height = parse_size(plain.get("size"))
        fields = {**base, "model": model_for(studio, plain.get("model")), "batch_size": n, "width": width,
                  "height": height}
        return {k: v for k, v in fields.items() if v is not None}, response_format

    async def answer(handler) -> JSONResponse:
        try:
            return JSONResponse(await handler())
        except Exception as exc:  # every refusal and fault, through the outcome table, in OpenAI's error shape
            error = openai_error(exc)
            if error.status >= 500 and not isinstance(exc, StudioError):  # a fault of ours: the log keeps why
                log.exception("OpenAI images route failed")
            return error.response()

    @router.post("/images/generations", operation_id="openai_images_generations",
                 openapi_extra=json_body(GenerationsBody))
    async def generations(request: Request, user: str = Depends(current_user)) -> JSONResponse:
        async def handle():
            body = GenerationsBody.model_validate(await json_object(request))
            fields, response_format = common(body.model_dump(), {"prompt": body.prompt})
            return await run(fields, response_format, user, str(request.base_url))

        return await answer(handle)

    @router.post("/images/edits", operation_id="openai_images_edits", openapi_extra=FORM_BODY)
    async def edits(request: Request, user: str = Depends(current_user)) -> JSONResponse:
        async def handle():
            plain, image, mask = await form_fields(request)
            if not plain.get("prompt"):
                raise RequestError("prompt", "is required for an edit")
            area = mask_from_alpha(mask if mask is not None else image)
            if mask is not None and area is None:
                raise RequestError("mask", "has no fully transparent pixels: they mark the area to edit")
            base = {"prompt": plain["prompt"], "init_image": image.convert("RGB")}
            if area is not None:
                base |= {"mode": "inpaint", "mask_image": area.resize(image.size), "strength": 1.0}
            else:
                base |= {"mode": "img2img", "strength": UNMASKED_EDIT_STRENGTH}
            fields, response_format = common(plain, base)
            return await run(fields, response_format, user, str(request.base_url))

        return await answer(handle)

    @router.post("/images/variations", operation_id="openai_images_variations", openapi_extra=FORM_BODY)
    async def variations(request: Request, user: str = Depends(current_user)) -> JSONResponse:
        async def handle():
            plain, image, _ = await form_fields(request)
            fields, response_format = common(plain, {"mode": "img2img", "init_image": image.convert("RGB"),
                                                     "strength": VARIATION_STRENGTH})
            return await run(fields, response_format, user, str(request.base_url))

        return await answer(handle)

    @router.get("/models", operation_id="openai_models")
    def models(user: str = Depends(current_user)) -> dict:
        """The studio's usable base models, as OpenAI lists models."""
        rows = [row for row in list_models(studio.config, "checkpoint") if row.get("usable", True)]
        return {"object": "list", "data": [{"id": row["name"], "object": "model", "created": 0,
                                            "owned_by": "diffusion-studio"} for row in rows]}

    return router
