"""Hires fix: a first pass at the base size, an upscale (latent, pixel or an upscaler model), a second img2img
pass; one run of step events; reproducible; refused beyond the limits; A1111's PNG parameters."""

import numpy as np
import pytest
from PIL import Image

from diffusion_studio.engine.metadata import a1111_parameters, parse_a1111
from diffusion_studio.engine.runner import Engine, second_pass_steps
from diffusion_studio.requests import GenerationRequest, HiresFix, RequestError

PROMPT = "a red circle on a white background"


def run(engine, events=None, **fields):
    request = GenerationRequest(**{"prompt": PROMPT, "steps": 3, "seed": 5, "width": 32, "height": 32, **fields})
    return engine.run(request, on_step=events.append if events is not None else None)


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos", "None"])
def test_hires_doubles_the_size_and_counts_both_passes_as_one_run(engine, upscaler):
    events = []
    result = run(engine, events, hires={"upscaler": upscaler, "steps": 4, "denoising_strength": 0.5})
    assert result.images[0].size == (64, 64)
    second = second_pass_steps(result.request.hires, 3)
    assert second == 2  # diffusers runs int(4 x 0.5) of the 4 steps
    assert [event.step for event in events] == list(range(1, 3 + second + 1))
    assert all(event.total == 3 + second for event in events)
    assert len(result.timings.step_s) == 3 + second


def test_hires_is_reproducible_and_differs_from_a_plain_upscale(engine):
    first = run(engine, hires={"upscaler": "Latent"})
    again = run(engine, hires={"upscaler": "Latent"})
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    plain = run(engine).images[0].resize((64, 64), Image.LANCZOS)
    assert np.abs(np.asarray(plain, int) - np.asarray(first.images[0], int)).mean() > 1  # the second pass repaints


def test_hires_resize_sets_the_final_size_and_keeps_the_aspect_ratio(engine):
    assert run(engine, hires={"width": 48, "height": 64, "upscaler": "Lanczos"}).images[0].size == (48, 64)
    assert HiresFix(width=96).target_size(32, 48) == (96, 144)
    assert HiresFix(scale=1.5).target_size(36, 36) == (48, 48)  # 54 rounded down to a multiple of 8


def test_hires_over_the_maximum_size_is_refused_naming_the_field(engine, make_config):
    limits = {"max_width": 96, "max_height": 96}
    with pytest.raises(ValueError, match="hires.scale: the final width 128 is more than the allowed 96"):
        GenerationRequest.model_validate({"width": 64, "height": 64, "hires": {"scale": 2}},
                                         context={"limits": make_config(limits=limits).limits})
    with pytest.raises(ValueError, match="hires.height: the final width 160 .*lower hires.height"):  # sizes known: at validation
        GenerationRequest.model_validate({"width": 64, "height": 64, "hires": {"height": 160}},
                                         context={"limits": make_config(limits=limits).limits})
    small = Engine(make_config(limits=limits))
    with pytest.raises(RequestError) as error:  # native size: when the engine knows it
        small.run(GenerationRequest(prompt=PROMPT, steps=2, hires={"scale": 2}))
    assert error.value.field == "hires.scale" and "128x128" in error.value.message


def test_unknown_upscaler_is_refused_at_submit_listing_the_known_ones(engine):
    with pytest.raises(RequestError) as error:
        engine.check(GenerationRequest(prompt=PROMPT, hires={"upscaler": "4x-UltraSharp"}))
    assert error.value.field == "hires.upscaler" and "Latent (bicubic antialiased)" in error.value.message


def test_hires_is_refused_for_inpainting(shape_image, center_mask):
    with pytest.raises(ValueError, match="inpaint_area 'masked'"):
        GenerationRequest(mode="inpaint", init_image=shape_image, mask_image=center_mask, hires={})


def test_hires_runs_after_a_controlnet_and_img2img_first_pass(engine, shape_image):
    control = run(engine, mode="controlnet", control_image=shape_image, hires={"upscaler": "Lanczos"})
    assert control.images[0].size == (64, 64)
    image = run(engine, mode="img2img", init_image=shape_image, strength=0.6, hires={"scale": 1.5})
    assert image.images[0].size == (48, 48)


def test_png_parameters_carry_a1111_hires_keys_and_read_back():
    request = GenerationRequest(prompt=PROMPT, width=64, height=64, steps=4,
                                hires={"scale": 2, "upscaler": "Latent (bicubic)", "steps": 6,
                                       "denoising_strength": 0.45})
    text = a1111_parameters(request, 7, 128, 128, "builtin:shapes")
    assert "Size: 64x64" in text  # A1111's Size is the first pass's
    assert "Denoising strength: 0.45, Hires upscale: 2, Hires steps: 6, Hires upscaler: Latent (bicubic)" in text
    back = GenerationRequest.model_validate(parse_a1111(text), context={"require_images": False})
    assert back.hires == request.hires and back.width == 64


def test_batched_hires_requests_keep_their_own_seeds(engine):
    from diffusion_studio.engine.runner import WorkItem

    requests = [GenerationRequest(prompt=PROMPT, steps=2, seed=seed, width=32, height=32,
                                  hires={"upscaler": "Latent"}) for seed in (1, 2)]
    together = engine.run_batch([WorkItem(request) for request in requests])
    alone = [engine.run(request) for request in requests]
    for one, other in zip(together, alone):
        assert one.images[0].size == (64, 64)
        assert np.abs(np.asarray(one.images[0], int) - np.asarray(other.images[0], int)).max() <= 2


def test_an_upscaler_model_file_is_part_of_the_weights_identity(make_config, tmp_path):
    from test_upscale import tiny_esrgan

    folder = tmp_path / "flat"
    (folder / "upscalers").mkdir(parents=True)
    path = tiny_esrgan(folder / "upscalers" / "4x_tiny.pth")
    engine = Engine(make_config(models_dirs=[folder]))
    request = GenerationRequest(prompt=PROMPT, width=32, height=32, steps=2, hires={"upscaler": "4x_tiny"})
    before = engine.weights_identity(request)
    assert before != engine.weights_identity(request.model_copy(update={"hires": HiresFix(upscaler="Lanczos")}))
    result = engine.run(request)
    assert result.images[0].size == (64, 64)  # 4x by the model, then down to the hires size
    tiny_esrgan(path, scale=2)  # replaced: other weights, another cache key
    assert engine.weights_identity(request) != before
