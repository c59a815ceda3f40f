"""A1111's body fields -> GenerationRequest fields (no server): inpainting, hires fix, schedules, what is kept from
override_settings; and the per-user preferences file."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from diffusion_studio.api.a1111_fields import Defaults, Img2ImgBody, Txt2ImgBody, translate
from diffusion_studio.requests import GenerationRequest, RequestError, image_to_base64
from diffusion_studio.service.preferences import MAX_KEYS_PER_USER, Preferences

IMAGE = "data:image/png;base64," + image_to_base64(Image.new("RGB", (8, 8), "red"))  # as webuiapi sends it


@pytest.mark.parametrize("fill, studio_fill", [(0, "fill"), (1, "original"), (2, "latent noise"),
                                               (3, "latent nothing")])
def test_inpainting_fields(fill, studio_fill):
    body = Img2ImgBody(init_images=[IMAGE], mask=IMAGE, inpainting_fill=fill, inpaint_full_res=True,
                       inpaint_full_res_padding=24, inpainting_mask_invert=1, mask_blur=6, denoising_strength=0.5)
    fields = translate(body, Defaults("builtin:shapes")).fields
    assert {k: fields[k] for k in ("mode", "inpaint_fill", "inpaint_area", "inpaint_padding", "mask_invert",
                                   "mask_blur", "strength")} == {
        "mode": "inpaint", "inpaint_fill": studio_fill, "inpaint_area": "masked", "inpaint_padding": 24,
        "mask_invert": True, "mask_blur": 6, "strength": 0.5}
    request = GenerationRequest(**fields)
    assert request.inpaint_fill == studio_fill and request.init_image.mode == "RGB"  # a data URL decodes


def test_a1111_inpainting_defaults_and_whole_picture():
    defaults = translate(Img2ImgBody(init_images=[IMAGE], mask=IMAGE), Defaults("m")).fields
    # A1111's API defaults: only masked, padding 0, fill, blur 4 (mask_blur_x/y)
    assert (defaults["inpaint_area"], defaults["inpaint_padding"], defaults["inpaint_fill"], defaults["mask_blur"]) \
        == ("masked", 0, "fill", 4)
    whole = translate(Img2ImgBody(init_images=[IMAGE], mask=IMAGE, inpaint_full_res=False), Defaults("m"))
    assert whole.fields["inpaint_area"] == "whole" and whole.unhonoured == {}
    uneven = translate(Img2ImgBody(init_images=[IMAGE], mask=IMAGE, mask_blur_x=2, mask_blur_y=8), Defaults("m"))
    assert uneven.fields["mask_blur"] == 8 and "mask_blur_x" in uneven.unhonoured
    plain = translate(Img2ImgBody(init_images=[IMAGE, IMAGE]), Defaults("m"))
    assert plain.fields["mode"] == "img2img" and "mask_image" not in plain.fields
    assert plain.unhonoured == {"init_images": "only the first of 2 images was used"}
    with pytest.raises(RequestError) as refused:
        translate(Img2ImgBody(prompt="no image"), Defaults("m"))
    assert refused.value.field == "init_images"


def test_hires_fields():
    body = Txt2ImgBody(enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", hr_second_pass_steps=3,
                       hr_resize_x=96, denoising_strength=0.4, hr_prompt="other", hr_sampler_name="Use same sampler")
    translation = translate(body, Defaults("m"))
    assert translation.fields["hires"] == {"scale": 1.5, "upscaler": "Lanczos", "steps": 3,
                                           "denoising_strength": 0.4, "width": 96}
    assert set(translation.unhonoured) == {"hr_prompt"}
    webuiapi_style = translate(Txt2ImgBody(enable_hr=True, hr_upscaler=None, denoising_strength=None,
                                           hr_checkpoint_name=None, hr_prompt=""), Defaults("m"))
    assert webuiapi_style.fields["hires"] == {"scale": 2.0, "upscaler": "Latent", "steps": 0,
                                              "denoising_strength": 0.7}
    assert "hires" not in translate(Txt2ImgBody(hr_scale=3), Defaults("m")).fields  # enable_hr off: ignored


@pytest.mark.parametrize("sampler, schedule, studio, reported", [
    ("DPM++ 2M", "karras", "DPM++ 2M Karras", False),
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras", False),  # the label, as A1111 1.9 UIs saved it
    ("k_dpmpp_2m", None, "DPM++ 2M", False),  # A1111's old alias
    ("euler a", "automatic", "Euler a", False),
    ("Euler", "karras", "Euler", True),  # no Karras variant here: said so
    ("DDIM", "sgm_uniform", "DDIM", True),
    ("DDIM", "SGMUniform", "DDIM", True),  # an alias
])
def test_sampler_and_schedule(sampler, schedule, studio, reported):
    translation = translate(Txt2ImgBody(sampler_name=sampler, scheduler=schedule), Defaults("m"))
    assert translation.fields["scheduler"] == studio and ("scheduler" in translation.unhonoured) == reported


def test_user_defaults_and_overrides():
    defaults = Defaults("user-model", vae="user-vae", clip_skip=2)
    plain = translate(Txt2ImgBody(prompt="x"), defaults)
    assert (plain.fields["model"], plain.fields["vae"], plain.fields["clip_skip"]) == ("user-model", "user-vae", 2)
    assert plain.kept == {}
    overridden = translate(Txt2ImgBody(override_settings={"sd_model_checkpoint": "other.safetensors [0123456789]",
                                                          "sd_vae": "None", "CLIP_stop_at_last_layers": 3,
                                                          "eta_noise_seed_delta": 31337}), defaults)
    assert (overridden.fields["model"], overridden.fields.get("vae"), overridden.fields["clip_skip"]) == \
        ("other.safetensors", None, 3)
    assert overridden.kept == {} and set(overridden.unhonoured) == {"override_settings.eta_noise_seed_delta"}
    kept = translate(Txt2ImgBody(override_settings={"CLIP_stop_at_last_layers": 3},
                                 override_settings_restore_afterwards=False), defaults)
    assert kept.kept == {"CLIP_stop_at_last_layers": 3}


def test_preferences_persist_per_user(tmp_path):
    path = tmp_path / "preferences.json"
    preferences = Preferences(path)
    assert preferences.get("alice") == {}
    preferences.update("alice", {"model": "a", "clip_skip": 2})
    preferences.update("bob", {"model": "b"})
    assert preferences.update("alice", {"clip_skip": None, "vae": "v"}) == {"model": "a", "vae": "v"}
    again = Preferences(path)  # a restart
    assert again.get("alice") == {"model": "a", "vae": "v"} and again.get("bob") == {"model": "b"}
    assert not path.with_suffix(".tmp").exists() and json.loads(path.read_text())["bob"] == {"model": "b"}
    with pytest.raises(ValueError):
        again.update("bob", {f"key{i}": i for i in range(MAX_KEYS_PER_USER + 1)})
    assert Preferences(path).get("bob") == {"model": "b"}  # a refused update wrote nothing
    path.write_text("{not json")
    assert Preferences(path).get("alice") == {}  # an unreadable file: start empty, never fail requests
