"""Validation: every bad input is refused with a message naming the field and what is allowed."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from diffusion_studio.config import Limits
from diffusion_studio.requests import GenerationRequest, describe_validation_error


def error_for(context=None, **fields) -> str:
    with pytest.raises(ValidationError) as caught:
        GenerationRequest.model_validate(fields, context=context)
    return describe_validation_error(caught.value)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"width": 60}, "width: must be a multiple of 8 between 8 and 1024 (got 60)"),
        ({"height": 2048}, "height: must be a multiple of 8 between 8 and 1024 (got 2048)"),
        ({"width": 0}, "width: Input should be greater than or equal to 8"),
        ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"steps": 151}, "steps: must be between 1 and 150 (got 151)"),
        ({"batch_size": 9}, "batch_size: must be between 1 and 8 (got 9)"),
        ({"guidance": -1}, "guidance: Input should be greater than or equal to 0"),
        ({"seed": 2**40}, "seed: Input should be less than or equal to 4294967295"),
        ({"scheduler": "Euler b"}, "scheduler: unknown scheduler; choose one of: Euler, Euler a"),
        ({"prompt": "x" * 2001}, "prompt: must be at most 2000 characters"),
        ({"strength": 0}, "strength: Input should be greater than 0"),
        ({"mode": "img2img"}, "init_image: is required for mode 'img2img'"),
        ({"mode": "inpaint", "init_image": Image.new("RGB", (8, 8))}, "mask_image: is required for mode 'inpaint'"),
        ({"mode": "controlnet"}, "control_image: is required for mode 'controlnet'"),
        ({"mode": "upscale"}, "mode: Input should be 'txt2img', 'img2img', 'inpaint' or 'controlnet'"),
        ({"control_start": 0.6, "control_end": 0.5}, "control_end: must be greater than control_start (0.6)"),
        ({"canny_low": 200, "canny_high": 100}, "canny_low: must not exceed canny_high (100)"),
        ({"control_type": "scribble"}, "control_type: Input should be 'canny', 'depth' or 'pose'"),
        ({"loras": [{"name": "x", "weight": 9}]}, "loras.0.weight: Input should be less than or equal to 4"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_invalid_fields_are_named(fields, expected):
    assert expected in error_for(**fields)


def test_limits_come_from_config():
    limits = Limits(max_width=256, max_steps=10, max_batch_size=2, max_prompt_chars=5)
    context = {"limits": limits}
    assert "width: must be a multiple of 8 between 8 and 256" in error_for(context, width=512)
    assert "steps: must be between 1 and 10" in error_for(context, steps=11)
    assert "batch_size: must be between 1 and 2" in error_for(context, batch_size=3, steps=4)
    assert "prompt: must be at most 5 characters" in error_for(context, prompt="abcdef", steps=4)
    ok = GenerationRequest.model_validate({"width": 256, "steps": 10}, context=context)
    assert (ok.width, ok.steps) == (256, 10)


def test_random_seed_marker_and_defaults():
    request = GenerationRequest(seed=-1)
    assert request.seed is None
    assert request.width is None and request.height is None  # the model's native size


@pytest.mark.parametrize(
    "value, expected",
    [
        ("not base64 !!", "init_image: must be base64-encoded image data"),
        (base64.b64encode(b"hello, not an image").decode(), "init_image: is not a readable image"),
        (b"\x89PNG\r\n\x1a\n broken", "init_image: is not a readable image"),
        (12345, "init_image: must be an image"),
        (np.zeros((4, 4, 3), np.float32), "init_image: must be an 8-bit image array"),
    ],
)
def test_bad_images_refused(value, expected):
    assert expected in error_for(mode="img2img", init_image=value)


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions in a few bytes: reading its pixels would exhaust memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def test_decompression_bomb_refused_before_reading_pixels():
    message = error_for(mode="img2img", init_image=_huge_png_header(50000, 50000))
    assert "init_image" in message and "too large" in message or "more than the allowed" in message


def test_pixel_limit_from_config():
    small = Limits(max_input_pixels=100)
    message = error_for({"limits": small}, mode="img2img", init_image=png_bytes(Image.new("RGB", (20, 20))))
    assert "init_image: image is 20x20, more than the allowed 100 pixels" in message


def test_images_decoded_from_every_form():
    image = Image.new("RGB", (16, 8), "red")
    raw = png_bytes(image)
    for form in (image, raw, base64.b64encode(raw).decode(), "data:image/png;base64," + base64.b64encode(raw).decode(),
                 np.asarray(image)):
        request = GenerationRequest(mode="img2img", init_image=form)
        assert request.init_image.size == (16, 8) and request.init_image.mode == "RGB"


def test_mask_from_painted_alpha():
    painted = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    painted.putpixel((2, 3), (255, 255, 255, 255))
    request = GenerationRequest(mode="inpaint", init_image=Image.new("RGB", (8, 8)), mask_image=painted)
    assert request.mask_image.mode == "L"
    assert request.mask_image.getpixel((2, 3)) == 255 and request.mask_image.getpixel((0, 0)) == 0


def test_json_round_trip_keeps_images():
    request = GenerationRequest(mode="img2img", init_image=Image.new("RGB", (8, 8), "blue"), seed=5)
    again = GenerationRequest.model_validate(request.model_dump(mode="json"))
    assert again.init_image.getpixel((0, 0)) == (0, 0, 255)
    assert again.parameters()["init_image_sha256"] == request.parameters()["init_image_sha256"]


def test_prompt_blocklist():
    limits = Limits(blocked_terms=("forbidden", "two words"))
    assert "prompt: contains the blocked term 'forbidden'" in error_for({"limits": limits}, prompt="A Forbidden cat")
    assert "blocked term 'two words'" in error_for({"limits": limits}, prompt="say two words now")
    GenerationRequest.model_validate({"prompt": "unforbiddenly fine"}, context={"limits": limits})
