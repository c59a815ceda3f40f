"""The served studio over real HTTP: health, page, and generation through gradio_client."""

import time

import httpx
import pytest
from gradio_client import Client
from PIL import Image

from diffusion_studio.engine.metadata import request_from_png

PANEL = ["model", "steps", "guidance", "width", "height", "seed", "scheduler", "batch_size", "loras", "clip_skip",
         "vae", "step_cache"]
HIRES = ["hires_enable", "hires_upscaler", "hires_scale", "hires_width", "hires_height", "hires_steps",
         "hires_denoising_strength"]
INPAINT = ["inpaint_area", "inpaint_padding", "inpaint_fill", "mask_mode", "outpaint_left", "outpaint_right",
           "outpaint_top", "outpaint_bottom"]
ARGUMENTS = {  # the public Gradio API: each endpoint's arguments by name, in the order a positional call gives them
    "/generate": ["prompt", "negative", "count", *PANEL, *HIRES],
    "/batch": ["prompts", "upload", "negative", *PANEL, *HIRES],
    "/img2img": ["source", "prompt", "negative", "strength", *PANEL, *HIRES],
    "/inpaint": ["editor", "prompt", "negative", "strength", "blur", "grow", *PANEL, *INPAINT],
    "/controlnet": ["source", "control_type", "preprocess", "low", "high", "prompt", "negative", "scale", "start",
                    "end", *PANEL, *HIRES],
    "/compare": ["prompt", "negative", "x_axis", "x_values", "y_axis", "y_values", "init_image", *PANEL, *HIRES],
    "/train_start": ["base", "name", "dataset", "files", "instance_prompt", "rank", "steps", "learning_rate", "batch",
                     "sample_every", "layers", "text_encoder"],
    "/history": ["text", "mode", "model", "period"],
}


def test_health_and_page(server):
    server, _ = server
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "Diffusion Studio" in page.text
    assert httpx.get(f"{server}/docs").status_code == 200


def test_generate_through_gradio_client(server):
    server, studio = server
    client = Client(server, download_files=False, verbose=False)
    job = client.submit("a blue square on a black background", "", 1, "builtin:shapes", 4, 7.0, 0, 0, 321,
                        "Euler", 2, [], api_name="/generate")
    preview, gallery, status = job.result(timeout=120)  # the last-seed State stays server-side
    assert "seed 321" in status and status.startswith("Done")
    assert len(gallery) == 2
    outputs = job.outputs()
    assert len(outputs) >= 2  # progress updates streamed before the final result
    saved = Image.open(gallery[0]["image"]["path"])
    request = request_from_png(saved)
    assert (request.prompt, request.seed, request.steps) == ("a blue square on a black background", 321, 4)
    # The UI went through the job service: the job and its images are in the persistent history.
    [job] = studio.store.find(prompt="a blue square on a black background")
    assert job.status.value == "done" and job.user == "local" and job.result["seeds"] == [321, 322]
    saved_names = [p.name for p in studio.image_paths(job.result["image_ids"])]
    assert saved_names == [g["image"]["path"].rsplit("/", 1)[-1] for g in gallery]


def test_endpoints_take_named_arguments_in_one_order(server):
    server, _ = server
    client = Client(server, download_files=False, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name, arguments in ARGUMENTS.items():
        assert [p["parameter_name"] for p in endpoints[name]["parameters"]] == arguments, name
    # By name, the rest left at the page's defaults (the default model, native size, one image).
    preview, gallery, status = client.predict(prompt="a green star on a white background", negative="", steps=2, seed=9,
                                              api_name="/generate")
    assert status.startswith("Done") and "seed 9" in status and len(gallery) == 1
    request = request_from_png(Image.open(gallery[0]["image"]["path"]))
    assert (request.prompt, request.steps, request.seed, request.model) == (
        "a green star on a white background", 2, 9, "builtin:shapes")


def test_invalid_input_names_the_field(server):
    server, _ = server
    client = Client(server, download_files=False, verbose=False)
    with pytest.raises(Exception, match="width: must be a multiple of 8"):
        client.predict("x", "", 1, "builtin:shapes", 4, 7.0, 60, 0, 1, "Euler", 1, [], api_name="/generate")
    with pytest.raises(Exception, match="model: 'nope' is not a built-in"):
        client.predict("x", "", 1, "nope", 4, 7.0, 0, 0, 1, "Euler", 1, [], api_name="/generate")
    with pytest.raises(Exception, match="loras: 'heart:lots' should be NAME or NAME:WEIGHT"):
        client.predict("x", "", 1, "builtin:shapes", 4, 7.0, 0, 0, 1, "Euler", 1, ["heart:lots"],
                       api_name="/generate")


def test_cancel_a_running_generation(server):
    server, studio = server
    client = Client(server, download_files=False, verbose=False)
    job = client.submit("a red star", "", 1, "builtin:shapes", 150, 7.0, 256, 256, 5, "Euler", 1, [],
                        api_name="/generate")
    deadline = time.time() + 60
    while len(job.outputs()) < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    job.cancel()
    deadline = time.time() + 30
    while not job.done():
        assert time.time() < deadline, "cancel did not stop the job"
        time.sleep(0.1)
    health = httpx.get(f"{server}/health").json()
    deadline = time.time() + 30
    while any(model["in_use"] for model in health["loaded"]):  # the worker let go of the model: run stopped
        assert time.time() < deadline, "the engine run kept going after cancel"
        time.sleep(0.1)
        health = httpx.get(f"{server}/health").json()
    deadline = time.time() + 30
    while (job := studio.store.find(prompt="a red star")[0]).status.value == "running":  # saving partial images
        assert time.time() < deadline
        time.sleep(0.05)
    assert job.status.value == "cancelled"
