"""OpenAI's images API, driven by the official `openai` package pointed at a served studio (base_url), with the
studio's API token as the key: generations (b64_json and url), edits with a mask, variations, models, errors."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from diffusion_studio.config import StudioConfig
from diffusion_studio.engine.metadata import request_from_png
from diffusion_studio.server import build_app
from servers import make_users, serving


@pytest.fixture(scope="module")
def studio_url(data_dir, tmp_path_factory):
    users_file = tmp_path_factory.mktemp("auth") / "users.json"
    _, tokens = make_users(users_file, {"carol": "carol-password"})
    token = tokens["carol"]
    config = StudioConfig(data_dir=data_dir, models_dir=tmp_path_factory.mktemp("none"), auth="on",
                          users_file=users_file, preview_interval=0)
    with serving(build_app(config)) as url:
        yield url, token


@pytest.fixture(scope="module")
def client(studio_url):
    url, token = studio_url
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)


def png_of(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generations_as_b64_and_url(client, studio_url):
    result = client.images.generate(model="dall-e-3", prompt="a red circle on a white background", n=2,
                                    size="64x64", response_format="b64_json", quality="hd", style="vivid")
    assert len(result.data) == 2
    images = [png_of(item.b64_json) for item in result.data]
    assert all(image.size == (64, 64) for image in images)
    request = request_from_png(images[0])  # a real generation, with its parameters, on the default model
    assert request.prompt == "a red circle on a white background" and request.model == "builtin:shapes"
    assert images[0].tobytes() != images[1].tobytes()

    linked = client.images.generate(model="builtin:shapes-xl", prompt="a blue square", response_format="url")
    fetched = httpx.get(linked.data[0].url)  # opens without a key, as OpenAI's URLs do
    assert fetched.status_code == 200 and request_from_png(Image.open(io.BytesIO(fetched.content))).model == \
        "builtin:shapes-xl"


def test_edits_with_a_mask_keep_the_opaque_area(client, shape_image):
    source = shape_image.resize((64, 64)).convert("RGB")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: the area to edit
    result = client.images.edit(image=("source.png", png_bytes(source)), mask=("mask.png", png_bytes(mask)),
                                prompt="a green star on a white background", size="64x64")
    edited = np.asarray(png_of(result.data[0].b64_json).convert("RGB"), dtype=np.int16)
    kept = np.asarray(source, dtype=np.int16)
    assert np.abs(edited[:8] - kept[:8]).max() <= 2  # far from the hole: the original pixels
    assert np.abs(edited[24:40, 24:40] - kept[24:40, 24:40]).mean() > 5  # inside it: generated


def test_variations_and_models(client, shape_image):
    source = png_bytes(shape_image.resize((64, 64)).convert("RGB"))
    result = client.images.create_variation(image=("source.png", source), n=1, size="64x64")
    variation = png_of(result.data[0].b64_json)
    assert variation.size == (64, 64) and request_from_png(variation).mode.value == "img2img"
    names = [model.id for model in client.models.list()]
    assert names[:2] == ["builtin:shapes", "builtin:shapes-xl"]


def test_errors_in_openais_shape(client, studio_url):
    with pytest.raises(openai.BadRequestError) as caught:  # 4xx in OpenAI's shape, naming the parameter
        client.images.generate(prompt="x", size="big")
    assert caught.value.status_code == 400 and caught.value.body["param"] == "size"
    assert "WIDTHxHEIGHT" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="model"):
        client.images.generate(prompt="x", model="no-such-model")
    with pytest.raises(openai.BadRequestError, match="mask: has no fully transparent pixels"):
        opaque = png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 255)))
        client.images.edit(image=("a.png", opaque), mask=("m.png", opaque), prompt="x")
    url, _ = studio_url
    anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.images.generate(prompt="x")
