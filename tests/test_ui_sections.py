"""The hires fix section, the inpaint options and outpainting, the Upscale action under a result, and sizes stated
under results: each section's values become the request's fields, and the tabs' handlers run them for real
(gradio_client against the served studio, built-in model, 64 px)."""

import gradio as gr
import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from diffusion_studio.engine.metadata import request_from_png
from diffusion_studio.requests import INPAINT_FILLS, GenerationRequest, HiresFix
from diffusion_studio.ui.panels import Hires, hires_panel, hires_values, upscaler_names
from diffusion_studio.ui.tabs.inpaint import InpaintOptions, inpaint_options

from test_app import HIRES, INPAINT, PANEL  # the public endpoints' argument names, in order


def panel(steps=3, seed=1, model="builtin:shapes"):
    """The parameter panel's values in its order (model's native size, one image, the model's VAE)."""
    return [model, steps, 7.0, 0, 0, seed, "Euler", 1, [], 1, "Automatic", 1]


def hires(enable=True, upscaler="Latent", scale=2.0, width=0, height=0, steps=0, denoising=0.6):
    return [enable, upscaler, scale, width, height, steps, denoising]


def component_values(section) -> dict:
    """A section's values by name as the page starts them (what a handler gets before anything is touched)."""
    return {name: component.value for name, component in section.named().items()}


@pytest.fixture(scope="module")
def studio(server):
    return server[1]


def image_of(gallery_item) -> Image.Image:
    return Image.open(gallery_item["image"]["path"])


def test_hires_section_gives_the_request_hires(studio):
    with gr.Blocks():
        section = hires_panel(studio)
    values = component_values(section)
    assert list(values) == HIRES
    assert Hires.fields(values) == {"hires": None}  # off until enabled
    enabled = Hires.fields({**values, "hires_enable": True})["hires"]
    assert HiresFix(**enabled) == HiresFix()  # the section starts at the request's defaults
    chosen = {**values, "hires_enable": True, "hires_upscaler": "Lanczos", "hires_scale": 1.5, "hires_width": 96,
              "hires_height": 0, "hires_steps": 5, "hires_denoising_strength": 0.45}
    request = studio.validate({"mode": "txt2img", "prompt": "a red circle", "width": 64, "height": 64,
                               **Hires.fields(chosen)})
    assert request.hires == HiresFix(upscaler="Lanczos", scale=1.5, width=96, height=None, steps=5,
                                     denoising_strength=0.45)
    assert request.hires.target_size(64, 64) == (96, 96)  # a width alone keeps the aspect ratio
    assert hires_values(request.model_dump()) == {name: chosen[name] for name in HIRES}  # the inverse
    assert hires_values({"hires": None}) == values  # off, at the section's defaults: every component has a value


def test_the_hires_upscalers_are_all_the_studios_latent_ones_first(studio):
    with gr.Blocks():
        section = hires_panel(studio)
    offered = [value for _, value in section.hires_upscaler.choices]
    rows = studio.upscalers()
    assert offered == [row["name"] for row in rows] and len(offered) >= 9
    kinds = [next(row["kind"] for row in rows if row["name"] == name) for name in offered]
    assert kinds == sorted(kinds, key=["latent", "pixel", "model"].index)
    assert "Latent" not in upscaler_names(studio, ("pixel", "model")) and "Lanczos" in upscaler_names(studio)


def test_inpaint_options_give_area_fill_invert_and_outpaint(studio):
    with gr.Blocks():
        options = inpaint_options()
    values = component_values(options)
    assert list(values) == INPAINT
    defaults = GenerationRequest.model_fields
    assert InpaintOptions.fields(values) == {
        "inpaint_area": defaults["inpaint_area"].default, "inpaint_padding": defaults["inpaint_padding"].default,
        "inpaint_fill": defaults["inpaint_fill"].default, "mask_invert": False, "outpaint": None}
    assert [value for _, value in options.inpaint_fill.choices] == list(INPAINT_FILLS)
    chosen = {**values, "inpaint_area": "masked", "inpaint_padding": 16, "inpaint_fill": "latent noise",
              "mask_mode": "Inpaint not masked", "outpaint_left": 16, "outpaint_bottom": 8}
    fields = InpaintOptions.fields(chosen)
    image = Image.new("RGB", (64, 64), "white")
    request = studio.validate({"mode": "inpaint", "prompt": "x", "init_image": image, **fields})  # no mask: outpaint
    assert (request.inpaint_area, request.inpaint_padding, request.inpaint_fill, request.mask_invert) == (
        "masked", 16, "latent noise", True)
    assert (request.outpaint.left, request.outpaint.right, request.outpaint.top, request.outpaint.bottom) == (
        16, 0, 0, 8)


def test_sections_follow_the_panel_in_each_endpoints_arguments(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]

    def arguments(name):
        return [p["parameter_name"] for p in endpoints[name]["parameters"]]

    for name in ("/generate", "/batch", "/img2img", "/controlnet"):
        assert arguments(name)[-len(PANEL) - len(HIRES):] == PANEL + HIRES, name
    assert arguments("/inpaint") == ["editor", "prompt", "negative", "strength", "blur", "grow", *PANEL, *INPAINT]
    assert arguments("/upscale") == ["gallery", "upscaler", "scale"]


def test_results_state_their_real_size(client):
    _, gallery, status = client.predict("a red circle on a white background", "", 1, *panel(seed=3),
                                        api_name="/generate")
    assert status.startswith("Done")
    assert gallery[0]["caption"] == "64×64 px" and image_of(gallery[0]).size == (64, 64)


def test_generate_with_hires_fix_doubles_the_size(client):
    _, gallery, status = client.predict("a blue star on a black background", "", 1, *panel(seed=5),
                                        *hires(scale=2.0, denoising=0.6), api_name="/generate")
    assert status.startswith("Done")
    image = image_of(gallery[0])
    assert image.size == (128, 128) and gallery[0]["caption"] == "128×128 px"
    request = request_from_png(image)
    assert request.hires is not None and request.hires.scale == 2.0 and request.hires.upscaler == "Latent"


def test_img2img_with_hires_fix_by_a_pixel_upscaler(client, source_png):
    _, gallery, status, before_after = client.predict(
        handle_file(str(source_png)), "a blue circle on a white background", "", 0.6, *panel(seed=2),
        *hires(upscaler="Lanczos", width=96, height=96), api_name="/img2img")
    assert status.startswith("Done") and image_of(gallery[0]).size == (96, 96)
    assert [Image.open(item["path"]).size for item in before_after] == [(96, 96)] * 2  # the slider lines up


def test_controlnet_and_batch_with_hires_fix(client, source_png):
    _, gallery, status = client.predict(handle_file(str(source_png)), "canny", True, 100, 200,
                                        "a blue circle on a black background", "", 1.0, 0.0, 1.0, *panel(steps=2),
                                        *hires(upscaler="Latent (nearest)", scale=1.5), api_name="/controlnet")
    assert status.startswith("Done") and image_of(gallery[0]).size == (96, 96)
    overall, table, gallery, _ = client.predict("a red circle on a white background\na blue star", None, "",
                                                *panel(steps=2), *hires(scale=2.0, steps=2, denoising=0.5),
                                                api_name="/batch")
    assert overall.startswith("**2/2**") and [image_of(item).size for item in gallery] == [(128, 128)] * 2
    assert [item["caption"] for item in gallery] == ["128×128 px"] * 2


def test_compare_with_hires_fix_gives_every_cell_the_second_pass(client, studio):
    status, grid = client.predict("a red circle on a white background", "", "guidance", "3, 7", "(none)", "", None,
                                  *panel(steps=2, seed=9), *hires(upscaler="Lanczos", scale=2.0, steps=2),
                                  api_name="/compare")
    assert status.startswith("2 cells · seed 9") and Image.open(grid["path"]).width > 2 * 128
    cells = [job for job in studio.history("local", limit=2)]
    assert all(job.request["hires"]["upscaler"] == "Lanczos" for job in cells)
    assert [Image.open(studio.image_paths(job.result["image_ids"])[0]).size for job in cells] == [(128, 128)] * 2


def test_upscale_under_a_result_doubles_it(client, source_png):
    _, gallery, _ = client.predict("a green square on a gray background", "", 1, *panel(seed=4),
                                   api_name="/generate")
    first = image_of(gallery[0])
    items = [{"image": handle_file(item["image"]["path"]), "caption": item["caption"]} for item in gallery]
    upscaled, line = client.predict(items, "Lanczos", 2, api_name="/upscale")
    result = Image.open(upscaled["path"])
    assert result.size == (2 * first.width, 2 * first.height) == (128, 128)
    assert line.startswith("**128×128 px**") and "from 64×64 px" in line
    # Lanczos, not a blocky repeat: the upscaled image, shrunk back, is close to the original.
    back = np.asarray(result.convert("RGB").resize(first.size, Image.LANCZOS), dtype=int)
    assert np.abs(back - np.asarray(first.convert("RGB"), dtype=int)).mean() < 6
    with pytest.raises(Exception, match="greater than maximum value 8"):
        client.predict(items, "Lanczos", 9, api_name="/upscale")
    with pytest.raises(Exception, match="upscaler"):
        client.predict(items, "No such upscaler", 2, api_name="/upscale")
    with pytest.raises(Exception, match="gallery: generate something first"):
        client.predict([], "Lanczos", 2, api_name="/upscale")


def editor_of(source_png, tmp_path, box=None):
    layers = []
    if box is not None:
        stroke = np.zeros((64, 64, 4), np.uint8)
        stroke[box[1]:box[3], box[0]:box[2]] = (255, 255, 255, 255)
        Image.fromarray(stroke, "RGBA").save(tmp_path / "layer.png")
        layers = [handle_file(str(tmp_path / "layer.png"))]
    return {"background": handle_file(str(source_png)), "layers": layers, "composite": None}


def inpaint_options_values(area="whole", padding=32, fill="original", mode="Inpaint masked", left=0, right=0, top=0,
                           bottom=0):
    return [area, padding, fill, mode, left, right, top, bottom]


def test_outpaint_extends_the_canvas_with_an_empty_mask(client, source_png, tmp_path):
    _, gallery, status, before_after = client.predict(
        editor_of(source_png, tmp_path), "a red circle on a white background", "", 1.0, 0, 0, *panel(seed=6),
        *inpaint_options_values(left=16, bottom=8), api_name="/inpaint")
    assert status.startswith("Done") and gallery[0]["caption"] == "80×72 px"
    before, after = (Image.open(item["path"]) for item in before_after)
    assert before.size == after.size == (80, 72)  # Before / after compares the same canvas
    result = np.asarray(image_of(gallery[0]).convert("RGB"), dtype=int)
    assert result.shape[:2] == (64 + 8, 64 + 16)
    original = np.asarray(Image.open(source_png).convert("RGB"), dtype=int)
    assert np.abs(result[:64, 16:] - original).max() == 0  # the old canvas kept exactly
    with pytest.raises(Exception, match="mask_image: paint over the region"):
        client.predict(editor_of(source_png, tmp_path), "x", "", 1.0, 0, 0, *panel(),
                       *inpaint_options_values(), api_name="/inpaint")


def test_only_masked_inverted_inpainting_keeps_the_masked_pixels(client, source_png, tmp_path):
    _, gallery, status, _ = client.predict(
        editor_of(source_png, tmp_path, box=(20, 20, 44, 44)), "a red circle on a white background", "", 1.0, 0, 0,
        *panel(seed=7), *inpaint_options_values(area="masked", padding=8, fill="latent noise",
                                                mode="Inpaint not masked"), api_name="/inpaint")
    assert status.startswith("Done")
    request = request_from_png(image_of(gallery[0]))
    assert (request.inpaint_area, request.inpaint_fill, request.mask_invert) == ("masked", "latent noise", True)
    result = np.asarray(image_of(gallery[0]).convert("RGB"), dtype=int)
    original = np.asarray(Image.open(source_png).convert("RGB"), dtype=int)
    assert np.abs(result[20:44, 20:44] - original[20:44, 20:44]).max() == 0  # inverted: the painted box is kept


def test_mask_preview_shows_the_inverted_mask_the_new_canvas_and_the_crop():
    from diffusion_studio.ui.tabs.inpaint import mask_preview

    background = np.zeros((64, 64, 4), np.uint8)
    background[..., :3], background[..., 3] = 255, 255  # white
    stroke = np.zeros((64, 64, 4), np.uint8)
    stroke[24:40, 24:40] = 255
    value = {"background": background, "layers": [stroke]}
    plain = np.asarray(mask_preview(value, 0, 0), dtype=int)
    assert plain.shape == (64, 64, 3) and (plain[32, 32] != 255).any() and (plain[2, 2] == 255).all()
    inverted = np.asarray(mask_preview(value, 0, 0, invert=True), dtype=int)
    assert (inverted[32, 32] == 255).all() and (inverted[2, 2] != 255).any()
    extended = np.asarray(mask_preview(value, 0, 0, outpaint={"left": 16, "right": 0, "top": 0, "bottom": 8}))
    assert extended.shape == (72, 80, 3)
    assert (extended[70, 40] != 255).any() and (extended[30, 4] != 255).any()  # the new strips are repainted
    assert (extended[2, 18] == 255).all()  # the old canvas, unmasked, as it was
    cropped = np.asarray(mask_preview(value, 0, 0, area="masked", padding=8))
    assert tuple(cropped[16, 30]) == (0, 160, 255) and tuple(cropped[30, 16]) == (0, 160, 255)  # the crop's outline
    assert (cropped[10, 30] == 255).all()  # outside it
