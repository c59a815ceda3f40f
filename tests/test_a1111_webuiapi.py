"""webuiapi (the PyPI A1111 client) against a served studio, over real HTTP: its constructor, options, model
switching, every listing it reads, progress, skip and interrupt, txt2img with hires fix, img2img with a data-URL
image and an only-masked inpainting mask, extras upscaling; and a bad field answered with a 4xx naming it."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageDraw

from diffusion_studio.config import StudioConfig
from diffusion_studio.server import build_app
from diffusion_studio.service.preferences import Preferences
from model_trees import a1111_tree
from servers import serving


@pytest.fixture(scope="module")
def served(tmp_path_factory, sd_folder):
    """A studio on loopback (auth off: every caller is `local`) with an A1111 models tree beside its own."""
    root = tmp_path_factory.mktemp("a1111-webuiapi")
    webui = a1111_tree(root / "webui", sd_folder)
    config = StudioConfig(data_dir=root / "data", models_dir=root / "own", models_dirs=[webui], preview_interval=1)
    app = build_app(config)
    with serving(app) as url:
        yield url, app.state.studio


@pytest.fixture
def api(served):
    client = webuiapi.WebUIApi(baseurl=f"{served[0]}/sdapi/v1", sampler="Euler", steps=2)
    yield client
    client.set_options({"sd_model_checkpoint": "builtin:shapes", "sd_vae": "Automatic",
                        "CLIP_stop_at_last_layers": 1})


def shapes_image(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="red")
    return image


def test_constructor_and_listings(served, api):
    url, _ = served
    assert api.get_scripts() == {"txt2img": [], "img2img": []}  # what the constructor read
    assert not (api.has_controlnet or api.has_adetailer or api.has_animatediff)
    schedulers = {row["name"]: row for row in api.get_schedulers()}
    assert set(schedulers) == {"automatic", "karras"} and schedulers["karras"]["label"] == "Karras"
    assert schedulers["karras"]["default_rho"] == 7.0 and schedulers["automatic"]["need_inner_model"] is False
    upscalers = [row["name"] for row in api.get_upscalers()]
    assert upscalers[:3] == ["None", "Lanczos", "Nearest"] and not any(n.startswith("Latent") for n in upscalers)
    assert {"Latent", "Latent (bicubic antialiased)"} <= {row["name"] for row in api.get_latent_upscale_modes()}
    assert "tiny-vae" in {row["model_name"] for row in api.get_sd_vae()}
    assert "style/inkwash" in {row["name"] for row in api.get_loras()}
    embeddings = api.get_embeddings()
    assert "badhands" in {**embeddings["loaded"], **embeddings["skipped"]}
    models = api.util_get_model_names()
    assert "builtin:shapes" in models and any(title.startswith("anime/tiny.safetensors") for title in models)
    samplers = {row["name"]: row for row in api.get_samplers()}
    assert {"Euler", "Euler a", "DPM++ 2M"} <= set(samplers) and samplers["Euler a"]["aliases"] == ["k_euler_a"]
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["listen"] is False and flags["port"] == int(url.rsplit(":", 1)[1])
    memory = api.get_memory()
    assert 0 < memory["ram"]["used"] < memory["ram"]["total"] and ("error" in memory["cuda"] or
                                                                   memory["cuda"]["system"]["total"] > 0)
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0 and progress["current_image"] is None


def test_options_round_trip_and_model_switch(served, api):
    url, studio = served
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "builtin:shapes" and options["sd_vae"] == "Automatic"
    assert options["CLIP_stop_at_last_layers"] == 1 and options["samples_format"] == "png"
    assert "forge_preset" not in options  # SillyTavern takes that key for Forge
    assert api.set_options(options) == {"updated": ["clip_skip", "model", "vae"], "ignored": {}}  # the whole dict
    assert api.get_options() == options

    api.util_set_model("builtin:shapes-xl")
    assert api.util_get_current_model() == "builtin:shapes-xl"
    tiny = next(title for title in api.util_get_model_names() if title.startswith("anime/tiny"))
    assert api.set_options({"sd_vae": "tiny-vae.safetensors"})["updated"] == ["vae"]  # A1111 lists the suffix
    assert api.get_options()["sd_vae"] == "tiny-vae"
    reply = api.set_options({"sd_model_checkpoint": tiny, "sd_vae": "tiny-vae-folder",
                             "CLIP_stop_at_last_layers": 2, "samples_format": "jpg", "made_up_setting": 3})
    assert set(reply["ignored"]) == {"samples_format", "made_up_setting"}  # accepted, and said so
    after = api.get_options()
    assert (after["sd_model_checkpoint"], after["sd_vae"], after["CLIP_stop_at_last_layers"]) == \
        (tiny, "tiny-vae-folder", 2)
    assert after["samples_format"] == "png" and "made_up_setting" not in after
    # kept in the data dir: a studio started again on it reads the same options for this user
    assert Preferences(studio.config.data_dir / "preferences.json").get("local") == {
        "model": "anime/tiny", "vae": "tiny-vae-folder", "clip_skip": 2}

    result = api.txt2img(prompt="a tiny circle", width=32, height=32, steps=2, seed=9)
    assert result.images[0].size == (32, 32)  # the user's option ran: the tiny model's size
    assert result.info["sd_vae_name"] == "tiny-vae-folder" and result.info["clip_skip"] == 2
    assert "Clip skip: 2" in result.info["infotexts"][0] and "VAE: tiny-vae-folder" in result.info["infotexts"][0]

    bad = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"})
    assert bad.status_code == 422 and bad.json()["field"] == "sd_model_checkpoint"
    assert "builtin:shapes" in bad.json()["detail"]  # names what exists
    bad_vae = httpx.post(f"{url}/sdapi/v1/options", json={"sd_vae": "no-such-vae"})
    assert bad_vae.status_code == 422 and "tiny-vae" in bad_vae.json()["detail"]
    bad_skip = httpx.post(f"{url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
    assert bad_skip.status_code == 422 and "CLIP_stop_at_last_layers" in bad_skip.json()["detail"]
    assert api.get_options() == after  # nothing changed by the refusals


def test_override_settings_for_one_request_or_kept(api):
    once = api.txt2img(prompt="x", width=64, height=64, steps=2, seed=1,
                       override_settings={"sd_model_checkpoint": "builtin:shapes-xl", "CLIP_stop_at_last_layers": 2})
    assert once.info["sd_model_name"] == "builtin:shapes-xl" and once.info["clip_skip"] == 2
    assert api.util_get_current_model() == "builtin:shapes"  # restored afterwards (A1111's default)
    kept = api.txt2img(prompt="x", width=64, height=64, steps=2, seed=1, override_settings_restore_afterwards=False,
                       override_settings={"sd_model_checkpoint": "builtin:shapes-xl"})
    assert kept.info["sd_model_name"] == "builtin:shapes-xl"
    assert api.util_get_current_model() == "builtin:shapes-xl"  # as A1111: the override became the option


def test_txt2img_with_hires_fix(api):
    result = api.txt2img(prompt="a red circle", width=64, height=64, steps=2, seed=5, enable_hr=True, hr_scale=2,
                         hr_upscaler=webuiapi.HiResUpscaler.Latent, hr_second_pass_steps=2, denoising_strength=0.6,
                         restore_faces=True)
    info = result.info
    assert (info["width"], info["height"]) == (64, 64)  # A1111's info gives the first pass's size
    assert info["extra_generation_params"]["Hires upscaler"] == "Latent" and info["denoising_strength"] == 0.6
    assert "Hires upscale: 2" in info["infotexts"][0] and "Hires upscaler: Latent" in info["infotexts"][0]
    assert info["unhonoured"]["restore_faces"] == "no face restoration here"
    assert "scheduler" not in info["unhonoured"]  # webuiapi's "automatic" is what runs
    assert result.images[0].size == (128, 128)  # hires fix doubled the size


def test_img2img_data_url_and_only_masked_inpainting(api):
    source = shapes_image()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((24, 24, 40, 40), fill=255)
    result = api.img2img(images=[source], mask_image=mask, inpaint_full_res=True, inpaint_full_res_padding=8,
                         inpainting_fill=1, denoising_strength=0.75, prompt="a blue square", width=64, height=64,
                         steps=4, seed=3)  # webuiapi sends both as data:image/png;base64 URLs
    assert result.images[0].size == (64, 64) and result.info["denoising_strength"] == 0.75
    changed = np.abs(np.asarray(result.images[0].convert("RGB"), int) - np.asarray(source, int)).max(axis=2)
    far = np.ones((64, 64), bool)
    far[12:53, 12:53] = False  # the mask, its blur and its padding
    assert changed[far].max() == 0 and changed[24:41, 24:41].mean() > 20  # repainted there, untouched elsewhere
    infotext = result.info["infotexts"][0]
    assert "Inpaint area: Only masked" in infotext and "Masked area padding: 8" in infotext
    assert "Masked content" not in infotext  # 1 is "original", A1111's infotext names only the others
    assert result.parameters["init_images"] is None and result.parameters["mask"] is None  # include_init_images off

    plain = api.img2img(images=[source], denoising_strength=0.5, prompt="x", steps=4, seed=3, width=64, height=64,
                        resize_mode=1, include_init_images=True)
    assert plain.images[0].size == (64, 64) and plain.parameters["init_images"][0].startswith("data:image/png")
    assert "resize_mode" not in plain.info["unhonoured"]  # the image already had that size: nothing to crop


def test_progress_skip_and_interrupt(served, api):
    outcome = {}

    def generate():
        outcome["result"] = api.txt2img(prompt="slow", width=128, height=128, steps=120, n_iter=3, seed=40)

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        seen = wait_for(api, lambda state: state["job_no"] == 0 and state["sampling_step"] >= 2)
        assert seen["state"]["job_count"] == 3 and 0 < seen["progress"] < 1 / 3 and seen["eta_relative"] > 0
        assert seen["current_image"]  # the live preview, base64
        api.skip()  # the first batch stops, the second one runs
        wait_for(api, lambda state: state["job_no"] == 1 and state["sampling_step"] >= 2)
        api.interrupt()  # stops everything: no third batch
    finally:
        worker.join(120)
    info = outcome["result"].info
    assert info["skipped"] == [0] and info["all_seeds"] == [40, 41]  # A1111 returns what was made
    assert len(outcome["result"].images) == 2
    after = api.get_progress()
    assert after["state"]["job_count"] == 0 and after["state"]["interrupted"] is True and after["progress"] == 0


def wait_for(api, condition, timeout=90):
    deadline = time.time() + timeout
    while not condition((progress := api.get_progress())["state"]):
        assert time.time() < deadline, progress
        time.sleep(0.05)
    return progress


def test_extras_upscale(api, served):
    url, _ = served
    small = shapes_image(32)
    doubled = api.extra_single_image(small, upscaler_1=webuiapi.Upscaler.Lanczos, upscaling_resize=2)
    assert doubled.images[0].size == (64, 64) and "Lanczos" in doubled.info
    cropped = api.extra_single_image(small, upscaler_1="Nearest", resize_mode=1, upscaling_resize_w=48,
                                     upscaling_resize_h=40)
    assert cropped.images[0].size == (48, 40)
    unchanged = api.extra_single_image(small, upscaler_1="None", gfpgan_visibility=0.5)
    assert unchanged.images[0].size == (32, 32) and "face restoration" in unchanged.info
    batch = api.extra_batch_images([small, shapes_image(16)], upscaler_1="Lanczos", upscaling_resize=2)
    assert [image.size for image in batch.images] == [(64, 64), (32, 32)]
    latent = httpx.post(f"{url}/sdapi/v1/extra-single-image", json={"image": webuiapi.b64_img(small),
                                                                     "upscaler_1": "Latent"})
    assert latent.status_code == 422 and latent.json()["field"] == "upscaler_1"


@pytest.mark.parametrize("change, field", [
    ({"sampler_name": "no-such-sampler"}, "sampler_name"),
    ({"scheduler": "no-such-schedule"}, "scheduler"),
    ({"steps": "many"}, "steps"),
    ({"enable_hr": True, "hr_scale": 9}, "hr_scale"),
    ({"enable_hr": True, "hr_upscaler": webuiapi.HiResUpscaler.ESRGAN_4x}, "hr_upscaler"),  # no such file here
    ({"enable_hr": True, "hr_resize_x": 4}, "hr_resize_x"),
    ({"override_settings": {"sd_vae": "missing"}}, "sd_vae"),
    ({"script_name": "x/y plot"}, "script_name"),
    ({"override_settings": {"sd_model_checkpoint": "missing"}}, "sd_model_checkpoint"),
])
def test_a_bad_field_is_a_4xx_naming_it(served, change, field):
    url, _ = served
    reply = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                        **change}, timeout=60)
    assert reply.status_code == 422 and reply.json()["field"] == field and field in reply.json()["detail"], reply.text


def test_inpainting_fill_out_of_range(served):
    url, _ = served
    image = webuiapi.b64_img(shapes_image())
    reply = httpx.post(f"{url}/sdapi/v1/img2img", json={"init_images": [image], "mask": image, "inpainting_fill": 7})
    assert reply.status_code == 422 and reply.json()["field"] == "inpainting_fill"


def test_unhonoured_fields_are_named_in_info(served):
    url, _ = served
    reply = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=60, json={
        "prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 2, "tiling": True, "subseed_strength": 0.3,
        "scheduler": "Exponential", "styles": ["cinematic"], "not_a1111": 1, "send_images": False,
        "alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt"}]},
                             "ControlNet": {"args": []}}})
    assert reply.status_code == 200 and reply.json()["images"] == []  # send_images false
    unhonoured = json.loads(reply.json()["info"])["unhonoured"]
    assert set(unhonoured) == {"tiling", "subseed_strength", "scheduler", "styles", "not_a1111",
                               "alwayson_scripts.ADetailer"}  # ControlNet with no units is no request for it
    assert "Exponential" in unhonoured["scheduler"]


def test_lora_tags_in_the_prompt(api):
    tiny = next(title for title in api.util_get_model_names() if title.startswith("anime/tiny"))
    plain = api.txt2img(prompt="a circle", width=32, height=32, steps=2, seed=4,
                        override_settings={"sd_model_checkpoint": tiny})
    tagged = api.txt2img(prompt="a circle <lora:style/inkwash:0.8>", width=32, height=32, steps=2, seed=4,
                         override_settings={"sd_model_checkpoint": tiny})
    assert tagged.info["prompt"] == "a circle <lora:style/inkwash:0.8>"  # as sent, as A1111's info has it
    assert "<lora:style/inkwash:0.8>" in tagged.info["infotexts"][0]
    assert np.abs(np.asarray(tagged.images[0], int) - np.asarray(plain.images[0], int)).mean() > 1  # it applied
