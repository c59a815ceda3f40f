"""The seed's usage, as its README's examples and its Gradio wiring call the Python API: keyword calls with the
seed's names, and the positional order its buttons pass. Written out here from the seed's API (its calls, not
its text); the only changes are sizes and steps shrunk for a CPU test (64 px, 2 steps instead of 512 px, 30) and
the data dir: `DemoConfig()` is bare, so the models are the built-ins it defaults to."""

import ast
import asyncio

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusion_studio.demo import DemoConfig, DiffusionDemo

pytestmark = pytest.mark.filterwarnings("ignore:use_half_precision:diffusion_studio.demo.NoEffectWarning")

# A notebook cell in the seed's style: top-level await, keyword arguments named as the seed names them.
NOTEBOOK = """
config = DemoConfig()
demo = DiffusionDemo(config)

await demo.load_pipeline("stable_diffusion")
image, status = await demo.generate_image(
    prompt="a red circle on a white background",
    negative_prompt="blurry, low quality",
    num_steps=2,
    guidance_scale=7.5,
    height=64,
    width=64,
    seed=42,
)

prompts = ["a red circle", "a blue square", "a green star", "a yellow triangle"]
images, batch_status = await demo.generate_batch(
    prompts=prompts,
    negative_prompts=["blurry, low quality"] * len(prompts),
    num_steps=2,
    guidance_scale=7.5,
    seed=42,
)

await demo.load_pipeline("img2img")
transformed_image, img2img_status = await demo.img2img_generation(
    image=input_image,
    prompt="a blue circle on a white background",
    negative_prompt="blurry, low quality",
    strength=0.8,
    num_steps=2,
    guidance_scale=7.5,
)

await demo.load_pipeline("inpaint")
inpainted_image, inpaint_status = await demo.inpaint_generation(
    image=input_image,
    mask=mask_image,
    prompt="a green star",
    negative_prompt="blurry, low quality",
    num_steps=2,
    guidance_scale=7.5,
)

await demo.load_pipeline("controlnet")
controlled_image, control_status = await demo.controlnet_generation(
    control_image=control_image,
    prompt="a red square on a black background",
    negative_prompt="blurry, low quality",
    control_type="canny",
    control_scale=1.0,
    num_steps=2,
    guidance_scale=7.5,
)
"""


def run_notebook(source: str, names: dict) -> dict:
    """Run a cell with top-level await, as Jupyter does, on one event loop (the demo's job service lives on it)."""
    code = compile(source, "<notebook>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)

    async def cell():
        try:
            await eval(code, names)
        finally:
            if "demo" in names:
                await names["demo"].studio.jobs.stop()

    asyncio.run(cell())
    return names


def _pictures():
    picture = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(picture).ellipse((16, 16, 48, 48), fill="red")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((20, 20, 44, 44), fill=255)
    square = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(square).rectangle((12, 12, 52, 52), fill="white")
    return picture, mask, square


def test_the_seeds_usage_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # DemoConfig() keeps its data in ./data, as the seed's would
    picture, mask, square = _pictures()
    r = run_notebook(NOTEBOOK, {"DemoConfig": DemoConfig, "DiffusionDemo": DiffusionDemo, "input_image": picture,
                                "mask_image": mask, "control_image": square})
    assert r["image"].size == (64, 64) and "(seed 42, 2 steps, builtin:shapes)" in r["status"]
    assert len(r["images"]) == 4 and r["batch_status"].startswith("Generated 4 of 4 images in ")
    for name in ("transformed_image", "inpainted_image", "controlled_image"):
        assert r[name].size == (64, 64), name
    assert r["img2img_status"].startswith("Generated 1 image") and r["control_status"].startswith("Generated")
    # the inpainted image kept what the mask keeps (black = keep), and changed what it repaints
    kept = np.asarray(mask) == 0
    painted, original = np.asarray(r["inpainted_image"].convert("RGB")), np.asarray(picture)
    assert np.abs(painted[kept].astype(int) - original[kept]).mean() < 12
    assert np.abs(painted[~kept].astype(int) - original[~kept]).mean() > 12
    history = r["demo"].generation_history
    assert len(history) == 8 and (tmp_path / "data" / "studio.db").exists()
    assert [entry["parameters"]["seed"] for entry in history[1:5]] == [42, 43, 44, 45]  # seed + i per prompt
    assert {entry["negative_prompt"] for entry in history} == {"blurry, low quality"}
    assert [entry["mode"] for entry in history[5:]] == ["img2img", "inpaint", "controlnet"]
    assert all(entry["parameters"]["guidance_scale"] == 7.5 and entry["parameters"]["steps"] == 2
               for entry in history)


def test_positional_calls_as_the_seeds_buttons_pass_them(data_dir, tmp_path):
    """The seed's Gradio wiring calls these positionally: (image, prompt, negative, strength, steps, guidance),
    (image, mask, prompt, negative, steps, guidance), (image, prompt, negative, control type, scale, steps,
    guidance), and load_pipeline(pipeline_type, model_name)."""
    picture, mask, square = _pictures()
    demo = DiffusionDemo(DemoConfig(data_dir=data_dir, models_dir=tmp_path, user="buttons"))

    async def session():
        try:
            loaded = await demo.load_pipeline("stable_diffusion_xl", "builtin:shapes")  # a model of its own
            shown, _ = await demo.generate_image("a circle", "", 2, 5.0, 64, 64, 7)
            changed, _ = await demo.img2img_generation(picture, "a blue circle", "", 0.5, 2, 5.0)
            painted, _ = await demo.inpaint_generation(picture, mask, "a star", "", 2, 5.0)
            controlled, _ = await demo.controlnet_generation(square, "a square", "", "canny", 0.5, 2, 5.0)
            return loaded, shown, changed, painted, controlled
        finally:
            await demo.studio.jobs.stop()

    loaded, *images = asyncio.run(session())
    assert loaded.startswith("Loaded builtin:shapes for stable_diffusion_xl")
    assert all(image.size == (64, 64) for image in images)
    history = demo.generation_history
    assert [entry["model"] for entry in history] == ["builtin:shapes"] * 4
    img2img, inpaint, control = (job.request for job in demo.studio.history("buttons", since=demo._since)[2::-1])
    assert img2img["strength"] == 0.5 and img2img["steps"] == 2 and img2img["guidance"] == 5.0
    assert inpaint["mode"] == "inpaint" and inpaint["steps"] == 2
    assert control["control_type"] == "canny" and control["control_scale"] == 0.5 and control["steps"] == 2
