"""Every tab's main action through gradio_client against the running studio: batch, img2img, inpaint,
ControlNet, compare, training (start, live status, stop/finish, LoRA usable at once), history, PNG info, system."""

import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image
from safetensors.torch import load_file

from diffusion_studio.engine.metadata import request_from_png
from diffusion_studio.ui.panels import Params, panel_values


def params(steps=3, seed=1, batch=1, loras=(), model="builtin:shapes"):
    """The shared parameter panel's values, in its order (each endpoint's last arguments; test_app pins them)."""
    return [model, steps, 7.0, 0, 0, seed, "Euler", batch, list(loras)]


def test_panel_values_and_request_fields_are_inverses():
    parameters = {"model": "builtin:shapes", "steps": 3, "guidance": 7.5, "width": 64, "height": None, "seed": 5,
                  "scheduler": "DDIM", "batch_size": 2, "loras": [{"name": "heart", "weight": 0.8}], "clip_skip": 2,
                  "vae": "anime.safetensors", "step_cache": 2}
    values = panel_values(parameters)
    assert list(values) == [field for field in Params.__dataclass_fields__]  # every panel component, by name
    assert values["height"] == 0 and values["loras"] == ["heart:0.8"]  # as the components show them
    assert Params.fields({**values, "prompt": "ignored"}) == parameters
    assert panel_values({**parameters, "vae": None})["vae"] == "Automatic"  # A1111's word for the model's own
    assert Params.fields(panel_values({**parameters, "vae": None}))["vae"] is None


def gallery_paths(gallery):
    return [item["image"]["path"] for item in gallery]


def test_batch_runs_every_prompt_and_zips_them(client, tmp_path):
    prompts = "a red circle on a white background\na blue star on a black background\n\n"
    csv_file = tmp_path / "more.csv"
    csv_file.write_text("prompt,notes\na green square on a gray background,x\n")
    overall, table, gallery, archive = client.predict(prompts, handle_file(str(csv_file)), "", *params(seed=5),
                                                      api_name="/batch")
    assert overall.startswith("**3/3**")
    assert [row[2] for row in table["data"]] == ["done"] * 3
    assert len(gallery) == 3
    with zipfile.ZipFile(archive["path"]) as zipped:
        assert len(zipped.namelist()) == 3
    with pytest.raises(Exception, match="prompts: give at least one prompt"):
        client.predict("  \n", None, "", *params(), api_name="/batch")


def test_img2img_gives_before_and_after(client, source_png):
    preview, gallery, status, before_after = client.predict(
        handle_file(str(source_png)), "a blue circle on a white background", "", 0.5, *params(seed=3),
        api_name="/img2img")
    assert status.startswith("Done") and len(gallery) == 1
    request = request_from_png(Image.open(gallery_paths(gallery)[0]))
    assert (request.mode.value, request.strength, request.seed) == ("img2img", 0.5, 3)
    assert len(before_after) == 2
    with pytest.raises(Exception, match="init_image: drop an input image first"):
        client.predict(None, "x", "", 0.5, *params(), api_name="/img2img")


def test_inpaint_keeps_pixels_outside_the_painted_mask(client, source_png, tmp_path):
    stroke = np.zeros((64, 64, 4), np.uint8)
    stroke[20:44, 20:44] = (255, 255, 255, 255)
    layer = tmp_path / "layer.png"
    Image.fromarray(stroke, "RGBA").save(layer)
    editor = {"background": handle_file(str(source_png)), "layers": [handle_file(str(layer))], "composite": None}
    preview, gallery, status, before_after = client.predict(
        editor, "a blue star on a white background", "", 1.0, 0, 0, *params(seed=8), api_name="/inpaint")
    assert status.startswith("Done")
    result = np.asarray(Image.open(gallery_paths(gallery)[0]).convert("RGB")).astype(int)
    original = np.asarray(Image.open(source_png).convert("RGB")).astype(int)
    outside = np.ones((64, 64), bool)
    outside[20:44, 20:44] = False
    assert np.abs(result - original)[outside].max() == 0
    empty = {"background": handle_file(str(source_png)), "layers": [], "composite": None}
    with pytest.raises(Exception, match="mask_image: paint over the region"):
        client.predict(empty, "x", "", 1.0, 0, 0, *params(), api_name="/inpaint")


def test_controlnet_generates_from_a_control_input(client, source_png):
    preview, gallery, status = client.predict(
        handle_file(str(source_png)), "canny", True, 100, 200, "a blue circle on a black background", "", 1.0, 0.0,
        1.0, *params(seed=2), api_name="/controlnet")
    assert status.startswith("Done") and len(gallery) == 1
    with pytest.raises(Exception, match="control_end: must be greater than control_start"):
        client.predict(handle_file(str(source_png)), "canny", True, 100, 200, "x", "", 1.0, 0.5, 0.5, *params(),
                       api_name="/controlnet")


def test_compare_over_strength_uses_the_input_image(client, source_png):
    status, grid = client.predict("a blue circle on a white background", "", "strength", "0.4, 0.8", "(none)", "",
                                  handle_file(str(source_png)), *params(seed=4), api_name="/compare")
    assert status.startswith("2 cells")
    with pytest.raises(Exception, match="strength: with 3 steps, strength 0.2 runs no denoising step"):
        client.predict("a blue circle", "", "strength", "0.2, 0.8", "(none)", "", handle_file(str(source_png)),
                       *params(seed=4), api_name="/compare")


def test_compare_makes_a_labelled_grid_of_real_cells(client):
    status, grid = client.predict("a red circle on a white background", "", "guidance", "1, 7", "steps", "2, 3",
                                  None, *params(seed=4), api_name="/compare")
    assert status.startswith("4 cells")
    image = Image.open(grid["path"])
    assert image.width >= 2 * 64 and image.height >= 2 * 64
    with pytest.raises(Exception, match="x_values: values for steps must be ints"):
        client.predict("x", "", "steps", "two, three", "(none)", "", None, *params(), api_name="/compare")
    with pytest.raises(Exception, match="does not occur in the prompt"):
        client.predict("a red star", "", "prompt S/R", "blue, green", "(none)", "", None, *params(),
                       api_name="/compare")
    with pytest.raises(Exception, match="init_image: the strength axis"):
        client.predict("a red star", "", "strength", "0.3, 0.6", "(none)", "", None, *params(), api_name="/compare")


def test_training_runs_with_live_status_and_the_lora_is_usable_at_once(client, server):
    _, studio = server
    with pytest.raises(Exception, match="name: use 1-48 letters"):
        client.predict("builtin:shapes", "bad name!", "shapes world", None, "", 2, 10, 1e-3, 2, 0,
                       "all attention", False, api_name="/train_start")
    client.predict("builtin:shapes", "ui-lora", "shapes world", None, "", 2, 12, 1e-3, 2, 6,
                   "cross-attention keys/values", True, api_name="/train_start")
    deadline = time.time() + 240
    seen_steps = set()
    while True:
        _, text, loss, grad, lr, stability, samples = client.predict(api_name="/train_status")
        if loss and loss.get("data"):
            seen_steps.add(len(loss["data"]))
        if "✅ LoRA saved" in text or "failed" in text:
            break
        assert time.time() < deadline, text
        time.sleep(0.5)
    assert "done" in text and "step 12/12" in text, text
    assert len(loss["data"]) == 12 and len(seen_steps) >= 2  # the plot grew while it trained
    assert samples  # sample images every 6 steps
    assert "ui-lora" in studio.loras()
    trained = load_file(Path(studio.config.data_dir) / "loras" / "ui-lora.safetensors")
    assert any(key.startswith("text_encoder.") for key in trained)  # "Text encoder too"
    adapted = {key.split(".lora")[0].rsplit(".", 1)[-1] for key in trained if key.startswith("unet.")}
    assert adapted == {"to_k", "to_v"}
    _, gallery, status = client.predict("a red circle on a white background", "", 1,
                                           *params(loras=["ui-lora:0.8"]), api_name="/generate")
    assert status.startswith("Done")
    assert request_from_png(Image.open(gallery_paths(gallery)[0])).loras[0].weight == 0.8


def test_history_lists_results_and_png_info_reads_them(client, source_png):
    client.predict("a yellow triangle on a gray background", "", 1, *params(seed=77), api_name="/generate")
    gallery, message = client.predict("yellow triangle", "any", "any", "today", api_name="/history")
    assert len(gallery) >= 1 and "image(s)" in message
    parameters, text = client.predict(handle_file(gallery_paths(gallery)[0]), api_name="/png_info")
    assert parameters["prompt"] == "a yellow triangle on a gray background" and parameters["seed"] == 77
    assert "Steps: 3" in text
    nothing, message = client.predict("no such prompt at all", "any", "any", "any time", api_name="/history")
    assert nothing == [] and message.startswith("0 image(s)")


def test_system_shows_device_queue_and_models(client):
    device, service, loaded, _, errors, workers = client.predict(api_name="/system")
    assert "**Device:** cpu" in device and "Queue:" in service and "(local executor)" in service
    assert [row[:2] for row in workers["data"]] == [["local-0", "cpu"]]
    assert re.search(r"Last hour:\*\* [1-9]\d* done", service), service  # the jobs this module ran
    assert any(row[0] == "builtin:shapes" for row in loaded["data"])
