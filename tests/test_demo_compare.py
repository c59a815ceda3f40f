"""create_parameter_comparison: one real generation per value, through the job service, labelled in one grid (the
Compare tab's), not the seed's text drawn over one image."""

import asyncio
import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusion_studio.demo import DemoConfig, DiffusionDemo, ParameterComparison
from diffusion_studio.requests import GenerationRequest

pytestmark = pytest.mark.filterwarnings("ignore:use_half_precision:diffusion_studio.demo.NoEffectWarning")


def session(data_dir, tmp_path, user, body):
    demo = DiffusionDemo(DemoConfig(data_dir=data_dir, models_dir=tmp_path, user=user))

    async def main():
        try:
            return await body(demo)
        finally:
            await demo.studio.jobs.stop()

    return demo, asyncio.run(main())


def distinct(images) -> bool:
    arrays = [np.asarray(image.convert("RGB")) for image in images]
    return all(not np.array_equal(a, b) for a, b in itertools.combinations(arrays, 2))


def test_comparing_a_generated_image_reruns_its_request_per_value(data_dir, tmp_path):
    async def body(demo):
        base, _ = await demo.generate_image("a red circle on a white background", num_steps=2, seed=11)
        return base, await demo.create_parameter_comparison(  # the seed's keyword names
            base_image=base, parameter_name="guidance_scale", values=[1.0, 5.0, 12.0])

    demo, (base, compared) = session(data_dir, tmp_path, "compare", body)
    assert isinstance(compared, ParameterComparison) and isinstance(compared, list) and len(compared) == 3
    assert distinct(compared) and all(image.size == (64, 64) for image in compared)
    assert compared.parameter == "guidance_scale" and compared.values == [1.0, 5.0, 12.0] and compared.seed == 11
    assert np.array_equal(np.asarray(compared[1]), np.asarray(base))  # guidance 5 is the base image's own
    history = demo.generation_history
    assert len(history) == 4  # the base, then one job per value
    assert [entry["parameters"]["guidance_scale"] for entry in history[1:]] == [1.0, 5.0, 12.0]
    assert {entry["parameters"]["seed"] for entry in history} == {11}
    assert {entry["prompt"] for entry in history} == {"a red circle on a white background"}
    grid = compared.grid  # 3 columns of 96 px (cells are at least 96 wide), a label row and a time row
    assert grid.size == (8 + 3 * 96, 24 + 64 + 14)
    cells = [np.asarray(grid.crop((8 + i * 96 + 16, 24, 8 + i * 96 + 16 + 64, 24 + 64))) for i in range(3)]
    assert all(np.array_equal(cell, np.asarray(image.convert("RGB"))) for cell, image in zip(cells, compared))
    labels = np.asarray(grid.crop((8, 0, 8 + 3 * 96, 24)).convert("L"))
    assert all((labels[:, i * 96:(i + 1) * 96] < 128).sum() > 20 for i in range(3))  # a label over each column


def test_comparing_a_request_over_steps_and_seeds(data_dir, tmp_path):
    async def body(demo):
        over_steps = await demo.create_parameter_comparison(
            {"prompt": "a blue star", "num_steps": 2, "seed": 3}, "num_steps", [2, 3, 4])
        request = GenerationRequest(prompt="a green square", steps=2, seed=1)
        over_seeds = await demo.create_parameter_comparison(request, "seed", [1, 2])
        return over_steps, over_seeds

    demo, (over_steps, over_seeds) = session(data_dir, tmp_path, "compare-request", body)
    assert len(over_steps) == 3 and distinct(over_steps) and over_steps.seed == 3
    assert len(over_seeds) == 2 and distinct(over_seeds) and over_seeds.seed is None
    assert [entry["parameters"]["steps"] for entry in demo.generation_history[:3]] == [2, 3, 4]
    assert [entry["parameters"]["seed"] for entry in demo.generation_history[3:]] == [1, 2]


def test_comparing_a_plain_picture_is_image_to_image_over_strength(data_dir, tmp_path):
    picture = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(picture).rectangle((16, 16, 48, 48), fill="blue")

    async def body(demo):  # the seed's names work as keywords here too
        return await demo.create_parameter_comparison(picture, "strength", [0.3, 0.6, 1.0],
                                                      prompt="a blue square", num_steps=4, seed=2)

    demo, compared = session(data_dir, tmp_path, "compare-img", body)
    assert distinct(compared)
    assert {entry["mode"] for entry in demo.generation_history} == {"img2img"}
    # less strength keeps more of the picture
    changes = [np.abs(np.asarray(image.convert("RGB")).astype(int) - np.asarray(picture)).mean() for image in compared]
    assert changes[0] < changes[2], changes


def test_what_a_comparison_refuses(data_dir, tmp_path):
    async def body(demo):
        with pytest.raises(ValueError, match="parameter_name: strength changes nothing in txt2img"):
            await demo.create_parameter_comparison({"prompt": "x"}, "strength", [0.2, 0.8])
        with pytest.raises(ValueError, match="parameter_name: 'sharpness' is not a parameter"):
            await demo.create_parameter_comparison({"prompt": "x"}, "sharpness", [1, 2])
        with pytest.raises(ValueError, match="values: give at least one value"):
            await demo.create_parameter_comparison({"prompt": "x"}, "seed", [])
        with pytest.raises(ValueError, match="values: at most 16"):
            await demo.create_parameter_comparison({"prompt": "x"}, "seed", list(range(17)))
        with pytest.raises(ValueError, match="steps: must be between 1 and 150"):
            await demo.create_parameter_comparison({"prompt": "x"}, "num_steps", [2, 999])
        with pytest.raises(TypeError, match="base_image: give an image"):
            await demo.create_parameter_comparison("a prompt", "seed", [1])

    demo, _ = session(data_dir, tmp_path, "compare-refused", body)
    assert demo.generation_history == []  # nothing was queued
