"""The Python API: thin calls through the same job service, with human status lines; each DemoConfig field's
effect (tests/test_demo_seed.py runs the seed's calls, test_demo_figures.py the training figure and comparisons)."""

import asyncio
import subprocess
import sys
import warnings

import numpy as np
import pytest
from diffusers.models.attention_processor import SlicedAttnProcessor
from PIL import Image, ImageDraw

from diffusion_studio.demo import DemoConfig, DiffusionDemo, NoEffectWarning
from diffusion_studio.demo.config import studio_config

# On this CPU every demo says use_half_precision does nothing here; the tests that mean it catch it themselves.
pytestmark = pytest.mark.filterwarnings("ignore:use_half_precision:diffusion_studio.demo.NoEffectWarning")


def make_demo(data_dir, tmp_path, **fields) -> DiffusionDemo:
    return DiffusionDemo(DemoConfig(data_dir=data_dir, models_dir=tmp_path / "models", **fields))


def run(demo: DiffusionDemo, session):
    """Run `session(demo)` on a fresh event loop and stop the demo's job service after it."""
    async def main():
        try:
            return await session(demo)
        finally:
            await demo.studio.jobs.stop()

    return asyncio.run(main())


def test_python_api_every_call(data_dir, tmp_path, shape_image, center_mask):
    demo = make_demo(data_dir, tmp_path, user="notebook")

    async def session(demo):
        loaded = await demo.load_pipeline("stable_diffusion")
        image, status = await demo.generate_image("a red circle on a white background", num_steps=2, seed=5)
        again, _ = await demo.generate_image("a red circle on a white background", num_steps=2, seed=5)
        batch, batch_status = await demo.generate_batch(["a star", "a square", "a circle"], num_steps=2, seed=1)
        changed, _ = await demo.img2img_generation(shape_image, "a blue circle", num_steps=2, strength=0.5, seed=1)
        painted, _ = await demo.inpaint_generation(shape_image, center_mask, "a star", num_steps=2, seed=1)
        controlled, control_status = await demo.controlnet_generation(shape_image, "a square", num_steps=2, seed=1)
        await demo.load_pipeline("stable_diffusion_xl")
        xl, xl_status = await demo.generate_image("a star", num_steps=2, seed=2)
        return locals()

    r = run(demo, session)
    assert r["loaded"].startswith("Loaded builtin:shapes for stable_diffusion in ")
    assert r["image"].size == (64, 64) and np.array_equal(np.asarray(r["image"]), np.asarray(r["again"]))
    assert r["status"].startswith("Generated 1 image in ") and "(seed 5, 2 steps, builtin:shapes)" in r["status"]
    assert len(r["batch"]) == 3 and r["batch_status"].startswith("Generated 3 of 3 images in ")
    assert r["changed"].size == r["painted"].size == r["controlled"].size == (64, 64)
    assert "builtin:shapes-xl" in r["xl_status"] and r["xl"].size == (64, 64)
    history = demo.generation_history  # oldest first, as the seed appended
    assert len(history) == 9 and history[0]["seeds"] == [5] and history[-1]["model"] == "builtin:shapes-xl"
    assert [entry["mode"] for entry in history] == ["txt2img"] * 5 + ["img2img", "inpaint", "controlnet", "txt2img"]
    edges = demo.create_control_image(_square())
    assert np.asarray(edges).max() == 255


def _square():
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill="blue")
    return image


def test_python_api_errors(data_dir, tmp_path):
    demo = make_demo(data_dir, tmp_path, user="errors")

    async def session(demo):
        with pytest.raises(ValueError, match="pipeline_type: must be one of"):
            await demo.load_pipeline("video")
        with pytest.raises(ValueError, match=r"steps: must be between 1 and 150 \(got 999\)"):
            await demo.generate_image("x", num_steps=999)
        demo.config.model = "nowhere"  # the older name; refused before it is queued, like any other bad input
        with pytest.raises(ValueError, match="model: 'nowhere' is not a built-in"):
            await demo.generate_image("x", num_steps=2)
        with pytest.raises(ValueError, match="mode: each method has its own"):
            await demo.generate_image("x", mode="inpaint")
        with pytest.raises(ValueError, match=r"steps: given twice \(also as num_steps\)"):
            await demo.generate_image("x", num_steps=2, steps=3)

    run(demo, session)
    assert demo.generation_history == []


def test_history_has_the_seeds_shape_and_ours(data_dir, tmp_path):
    demo = make_demo(data_dir, tmp_path, user="history")

    async def session(demo):
        await demo.generate_image("a red circle", negative_prompt="blurry", num_steps=2, guidance_scale=3.5, seed=9)
        await demo.generate_image("a blue star", num_steps=3, height=32, width=48)

    run(demo, session)
    first, second = demo.generation_history
    seed_keys = {"prompt", "negative_prompt", "parameters", "generation_time", "timestamp"}
    ours = {"id", "status", "mode", "model", "seeds", "images", "error", "created_at"}
    assert set(first) == seed_keys | ours
    assert set(first["parameters"]) == {"steps", "guidance_scale", "height", "width", "seed"}
    assert first["prompt"] == "a red circle" and first["negative_prompt"] == "blurry"
    assert first["parameters"] == {"steps": 2, "guidance_scale": 3.5, "height": 64, "width": 64, "seed": 9}
    assert second["parameters"]["height"] == 32 and second["parameters"]["width"] == 48
    assert second["parameters"]["seed"] == second["seeds"][0]  # a random seed: the one used, to reproduce it
    assert 0 < first["generation_time"] < 60 and first["timestamp"] <= second["timestamp"]
    assert first["status"] == "done" and first["error"] is None and first["mode"] == "txt2img"
    assert Image.open(second["images"][0]).size == (48, 32)


def test_defaults_for_calls(data_dir, tmp_path, shape_image):
    demo = make_demo(data_dir, tmp_path, user="defaults", default_steps=3, default_guidance_scale=2.5,
                     default_height=32, default_width=48)

    async def session(demo):
        image, _ = await demo.generate_image("a circle")
        changed, _ = await demo.img2img_generation(shape_image, "a circle", strength=0.7)
        wide, _ = await demo.generate_image("a circle", height=40, num_steps=2)  # a call's own values win
        return image, changed, wide

    image, changed, wide = run(demo, session)
    assert image.size == changed.size == (48, 32) and wide.size == (48, 40)
    first, second, third = (entry["parameters"] for entry in demo.generation_history)
    assert first["steps"] == second["steps"] == 3 and first["guidance_scale"] == second["guidance_scale"] == 2.5
    assert third["steps"] == 2


def test_limits_come_from_the_config(data_dir, tmp_path):
    demo = make_demo(data_dir, tmp_path, user="limits", max_batch_size=2, max_prompt_length=20)
    assert demo.studio.config.limits.max_batch_size == 2 and demo.studio.config.limits.max_prompt_chars == 20

    async def session(demo):
        with pytest.raises(ValueError, match=r"prompt: must be at most 20 characters \(DemoConfig.max_prompt_len"):
            await demo.generate_image("a red circle on a white background", num_steps=2)
        with pytest.raises(ValueError, match=r"prompts: at most 2 in one batch \(DemoConfig.max_batch_size"):
            await demo.generate_batch(["a", "b", "c"], num_steps=2)
        with pytest.raises(ValueError, match=r"batch_size: must be between 1 and 2 .*DemoConfig.max_batch_size"):
            await demo.generate_image("a circle", num_steps=2, batch_size=3)
        images, _ = await demo.generate_batch(["a star", "a circle"], num_steps=2, seed=3)
        return images

    assert len(run(demo, session)) == 2


def test_half_precision_is_float16_on_a_gpu_and_says_it_does_nothing_on_the_cpu(tmp_path):
    config = DemoConfig(data_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on a GPU
        assert studio_config(config, "cuda").dtype == "float16"
        assert studio_config(config, "mps").dtype == "float16"
        assert studio_config(DemoConfig(data_dir=tmp_path, use_half_precision=False), "cuda").dtype == "float32"
        assert studio_config(DemoConfig(data_dir=tmp_path, dtype="bfloat16"), "cuda").dtype == "bfloat16"
    with pytest.warns(NoEffectWarning, match="use_half_precision: no effect on the CPU"):
        assert studio_config(config, "cpu").dtype == "auto"  # the engine's auto: float32 on the CPU
    with pytest.warns(NoEffectWarning, match="dtype='float32' is given and wins"):
        studio_config(DemoConfig(data_dir=tmp_path, use_half_precision=True, dtype="float32"), "cuda")


def test_half_precision_warning_points_at_the_callers_line(data_dir, tmp_path):
    with pytest.warns(NoEffectWarning) as caught:
        DiffusionDemo(DemoConfig(data_dir=data_dir, models_dir=tmp_path, device="cpu"))
    assert {record.filename for record in caught} == {__file__}


def test_vae_slicing_warns_when_set_and_only_then(tmp_path):
    with pytest.warns(NoEffectWarning, match="enable_vae_slicing: no effect: the VAE always decodes one image"):
        studio_config(DemoConfig(data_dir=tmp_path, enable_vae_slicing=True), "cuda")
    with pytest.warns(NoEffectWarning, match="enable_vae_slicing"):
        studio_config(DemoConfig(data_dir=tmp_path, enable_vae_slicing=False), "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        studio_config(DemoConfig(data_dir=tmp_path), "cuda")  # the default says what happens: no warning


@pytest.mark.parametrize("slicing", [True, False])
def test_attention_slicing_reaches_the_loaded_pipeline(data_dir, tmp_path, slicing):
    demo = make_demo(data_dir, tmp_path, enable_attention_slicing=slicing)
    assert demo.studio.config.memory.attention_slicing is slicing
    with demo.studio.engine.manager.use("builtin:shapes") as (entry, _):
        processors = entry.pipeline.unet.attn_processors.values()
        assert all(isinstance(p, SlicedAttnProcessor) for p in processors) is slicing
        assert any(isinstance(p, SlicedAttnProcessor) for p in processors) is slicing
    demo.studio.unload_model("builtin:shapes")


def test_advanced_controls_take_any_request_field_or_are_refused(data_dir, tmp_path):
    on = make_demo(data_dir, tmp_path, user="advanced")
    off = make_demo(data_dir, tmp_path, user="basic", enable_advanced_controls=False)

    async def advanced(demo):
        return await demo.generate_image("a circle", num_steps=2, seed=4, scheduler="DDIM", clip_skip=2)

    async def basic(demo):
        with pytest.raises(ValueError, match=r"scheduler: advanced controls are off \(DemoConfig.enable_advanced"):
            await demo.generate_image("a circle", num_steps=2, scheduler="DDIM")
        with pytest.raises(ValueError, match="advanced controls are off"):
            await demo.create_parameter_comparison({"prompt": "x"}, "seed", [1, 2], steps=2)
        return await demo.generate_image("a circle", num_steps=2, seed=4)

    image, _ = run(on, advanced)
    plain, _ = run(off, basic)
    [job] = on.studio.history("advanced", since=on._since)
    assert job.request["scheduler"] == "DDIM" and job.request["clip_skip"] == 2
    assert not np.array_equal(np.asarray(image), np.asarray(plain))  # the scheduler did run
    with pytest.raises(ValueError, match="scheduler: unknown scheduler"):
        run(on, lambda demo: demo.generate_image("a circle", scheduler="Nope"))


def test_training_demo_switch(data_dir, tmp_path):
    on = make_demo(data_dir, tmp_path)
    assert on.training is on.studio.training and on.training_stats == {}
    with pytest.raises(ValueError, match="training_stats: no training run has reported a step yet"):
        on.create_training_visualization()
    off = make_demo(data_dir, tmp_path, enable_training_demo=False)
    for read in (lambda: off.training, lambda: off.training_stats, off.create_training_visualization):
        with pytest.raises(RuntimeError, match="enable_training_demo: the training demo is off"):
            read()
    assert off.create_training_visualization({"losses": [1.0, 0.5]}).size == (1200, 800)  # given stats: a figure


def test_config_names_old_and_new(tmp_path):
    old = DemoConfig(model="builtin:shapes-xl", controlnet="builtin:shapes-canny")
    new = DemoConfig(default_model="builtin:shapes-xl", controlnet_model="builtin:shapes-canny")
    assert old == new and old.model == "builtin:shapes-xl" and old.controlnet == "builtin:shapes-canny"
    with pytest.raises(ValueError, match="max_batch_size"):
        DemoConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="default_height"):
        DemoConfig(default_height=30)  # a multiple of 8
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        DemoConfig(enable_xformers=True)


def test_package_exports_its_public_api_without_importing_torch():
    code = ("import sys, diffusion_studio as ds; assert 'torch' not in sys.modules and 'gradio' not in sys.modules;"
            " print(ds.__version__); from diffusion_studio import DemoConfig, DiffusionDemo, GenerationRequest, "
            "Studio, StudioConfig; print(DiffusionDemo.__module__, Studio.__name__, sorted(ds.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    version, names = out.stdout.splitlines()
    from importlib.metadata import version as installed

    assert version == installed("diffusion-studio")
    assert names.startswith("diffusion_studio.demo.api Studio ")
    assert "'DemoConfig', 'DiffusionDemo', 'GenerationRequest', 'Studio', 'StudioConfig', '__version__'" in names
