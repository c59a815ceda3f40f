"""A1111's "Extras": upscaling one image or a batch (extra-single-image, extra-batch-images) through the studio's
upscalers, and png-info. Upscaling runs off the event loop; face restoration and the second upscaler's blend are
not here and are said so in `html_info`, as is an upscaler_1 of "None" (A1111 then returns the image unchanged)."""

from __future__ import annotations

import asyncio
import html
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..engine.metadata import a1111_fields, find_hashes, hash_report, read_png_text
from ..requests import RequestError, decode_image, image_to_base64
from ..service.outcomes import StudioError, classify
from ..studio import Studio
from .a1111_fields import in_a1111_names
from .bodies import json_body, json_object


class ExtrasBody(BaseModel):
    """A1111's extras fields (webuiapi's defaults); other keys are accepted."""

    model_config = ConfigDict(extra="allow")

    resize_mode: int | None = Field(0, description="0: by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool | None = True
    gfpgan_visibility: float | None = 0
    codeformer_visibility: float | None = 0
    codeformer_weight: float | None = 0
    upscaling_resize: float | None = Field(2, description="the scale (resize_mode 0)")
    upscaling_resize_w: int | None = Field(512, ge=1)
    upscaling_resize_h: int | None = Field(512, ge=1)
    upscaling_crop: bool | None = Field(True, description="resize_mode 1: crop to the exact size, else stretch")
    upscaler_1: str | None = Field("None", description="a pixel upscaler or an upscaler model (GET upscalers)")
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float | None = 0
    upscale_first: bool | None = False


class ExtraSingleBody(ExtrasBody):
    image: str = Field(description="base64 image (or a data URL)")


class ListedImage(BaseModel):
    model_config = ConfigDict(extra="allow")

    data: str = Field(description="base64 image (or a data URL)")
    name: str | None = None


class ExtraBatchBody(ExtrasBody):
    imageList: list[ListedImage] = Field(description="images to upscale, each {data, name}")


class A1111PngInfoBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    image: str = Field(description="base64 PNG (or a data URL)")


def upscale_one(studio: Studio, image: Image.Image, body: ExtrasBody) -> tuple[Image.Image, str]:
    """The image as A1111's extras tab would upscale it (blocking), and what was done."""
    name = body.upscaler_1 or "None"
    if name == "None":
        return image, "upscaler_1 is None: the image is unchanged"
    if body.resize_mode == 1:
        width, height = body.upscaling_resize_w or 512, body.upscaling_resize_h or 512
        if body.upscaling_crop is not False:  # cover the box, then crop its centre, as A1111 does
            scale = max(width / image.width, height / image.height)
            covered = studio.upscale(image, name, size=(max(width, round(image.width * scale)),
                                                        max(height, round(image.height * scale))))
            left, top = (covered.width - width) // 2, (covered.height - height) // 2
            return covered.crop((left, top, left + width, top + height)), f"{name} to {width}x{height}, cropped"
        return studio.upscale(image, name, size=(width, height)), f"{name} to {width}x{height}"
    scale = body.upscaling_resize if body.upscaling_resize is not None else 2
    result = studio.upscale(image, name, scale=scale)
    return result, f"{name} x{scale:g} to {result.width}x{result.height}"


def unhonoured(body: ExtrasBody) -> list[str]:
    notes = []
    if (body.gfpgan_visibility or 0) > 0 or (body.codeformer_visibility or 0) > 0:
        notes.append("no face restoration here (gfpgan/codeformer)")
    if (body.extras_upscaler_2_visibility or 0) > 0 and (body.upscaler_2 or "None") != "None":
        notes.append("upscaler_2 is not blended here; upscaler_1 alone was used")
    return notes


def build_extras_router(studio: Studio) -> APIRouter:
    router = APIRouter()  # included by a1111.build_router, under /sdapi/v1
    limits = studio.config.limits

    def decode(value: str, field: str) -> Image.Image:
        try:
            return decode_image(value, limits.max_input_pixels).convert("RGB")
        except ValueError as exc:
            raise RequestError(field, str(exc)) from None

    async def upscale(image: Image.Image, body: ExtrasBody) -> tuple[Image.Image, str]:
        try:
            return await asyncio.to_thread(upscale_one, studio, image, body)
        except RequestError as exc:
            raise StudioError(in_a1111_names(classify(exc))) from None

    def info(done: list[str], body: ExtrasBody) -> str:
        return "".join(f"<p>{html.escape(line)}</p>" for line in [*done, *unhonoured(body)])

    @router.post("/extra-single-image", operation_id="a1111_extra_single_image",
                 openapi_extra=json_body(ExtraSingleBody))
    async def extra_single_image(request: Request) -> dict:
        """Upscale one image: {"html_info": what was done, "image": base64 PNG}."""
        body = ExtraSingleBody.model_validate(await json_object(request))
        result, done = await upscale(decode(body.image, "image"), body)
        return {"html_info": info([done], body), "image": image_to_base64(result)}

    @router.post("/extra-batch-images", operation_id="a1111_extra_batch_images",
                 openapi_extra=json_body(ExtraBatchBody))
    async def extra_batch_images(request: Request) -> dict:
        """Upscale each image of imageList: {"html_info", "images": [base64 PNG, ...]}."""
        body = ExtraBatchBody.model_validate(await json_object(request))
        if len(body.imageList) > limits.max_images_per_request:
            raise RequestError("imageList", f"{len(body.imageList)} images; at most "
                                            f"{limits.max_images_per_request} (limits.max_images_per_request)")
        images, done = [], []
        for index, listed in enumerate(body.imageList):
            result, what = await upscale(decode(listed.data, f"imageList.{index}.data"), body)
            images.append(image_to_base64(result))
            done.append(f"{listed.name or index}: {what}")
        return {"html_info": info(done, body), "images": images}

    @router.post("/png-info", operation_id="a1111_png_info", openapi_extra=json_body(A1111PngInfoBody))
    async def png_info(request: Request) -> dict:
        body = A1111PngInfoBody.model_validate(await json_object(request))
        try:
            image = decode_image(body.image, limits.max_input_pixels)
        except ValueError as exc:
            raise RequestError("image", str(exc)) from None
        text = read_png_text(image)
        parameters_text = text.get("parameters", "")
        # The hashes it names are looked up among the listed models' known hashes (reads folders: off the loop).
        matches = await asyncio.to_thread(lambda: find_hashes(parameters_text, studio.hash_lookup())) \
            if parameters_text else []
        parameters: dict[str, Any] = a1111_fields(parameters_text) if parameters_text else {}
        found = next((match.local for match in matches if match.kind == "checkpoint" and match.local), None)
        if found:
            parameters["Model"] = found
        return {"info": parameters_text, "items": text, "parameters": parameters, **hash_report(matches)}

    return router
