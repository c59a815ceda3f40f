"""The Python API: thin calls through the same job service, with human status lines."""

import asyncio

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusion_studio.demo import DemoConfig, DiffusionDemo


def test_python_api_every_call(data_dir, shape_image, center_mask):
    demo = DiffusionDemo(DemoConfig(data_dir=data_dir, user="notebook"))

    async def session():
        loaded = await demo.load_pipeline("stable_diffusion")
        image, status = await demo.generate_image("a red circle on a white background", num_steps=2, seed=5)
        again, _ = await demo.generate_image("a red circle on a white background", num_steps=2, seed=5)
        batch, batch_status = await demo.generate_batch(["a star", "a square", "a circle"], num_steps=2, seed=1)
        changed, _ = await demo.img2img_generation(shape_image, "a blue circle", num_steps=2, strength=0.5, seed=1)
        painted, _ = await demo.inpaint_generation(shape_image, center_mask, "a star", num_steps=2, seed=1)
        controlled, control_status = await demo.controlnet_generation(shape_image, "a square", num_steps=2, seed=1)
        await demo.load_pipeline("stable_diffusion_xl")
        xl, xl_status = await demo.generate_image("a star", num_steps=2, seed=2)
        await demo.studio.jobs.stop()
        return locals()

    r = asyncio.run(session())
    assert r["loaded"].startswith("Loaded builtin:shapes for stable_diffusion in ")
    assert r["image"].size == (64, 64) and np.array_equal(np.asarray(r["image"]), np.asarray(r["again"]))
    assert r["status"].startswith("Generated 1 image in ") and "(seed 5, 2 steps, builtin:shapes)" in r["status"]
    assert len(r["batch"]) == 3 and r["batch_status"].startswith("Generated 3 of 3 images in ")
    assert r["changed"].size == r["painted"].size == r["controlled"].size == (64, 64)
    assert "builtin:shapes-xl" in r["xl_status"] and r["xl"].size == (64, 64)
    history = demo.generation_history
    assert len(history) == 9 and history[0]["mode"] == "txt2img" and history[-1]["seeds"] == [5]
    edges = demo.create_control_image(_square())
    assert np.asarray(edges).max() == 255


def _square():
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill="blue")
    return image


def test_python_api_errors(data_dir):
    demo = DiffusionDemo(DemoConfig(data_dir=data_dir, user="errors"))

    async def session():
        with pytest.raises(ValueError, match="kind: must be one of"):
            await demo.load_pipeline("video")
        with pytest.raises(ValueError, match="steps: must be between 1 and 150"):
            await demo.generate_image("x", num_steps=999)
        demo.config.model = "nowhere"  # refused before it is queued, like any other bad input
        with pytest.raises(ValueError, match="model: 'nowhere' is not a built-in"):
            await demo.generate_image("x", num_steps=2)
        await demo.studio.jobs.stop()

    asyncio.run(session())
