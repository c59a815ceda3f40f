"""Outpainting, only-masked inpainting, fill modes and mask invert: what the pipeline gets, and that every pixel
outside the mask comes back exactly."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusion_studio.engine.inpaint_area import crop_box, plan_inpaint
from diffusion_studio.engine.metadata import a1111_parameters, parse_a1111
from diffusion_studio.requests import GenerationRequest

PROMPT = "a blue square on a white background"


def picture(size=64):
    image = Image.new("RGB", (size, size), (250, 250, 250))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, size // 2, size // 2), fill=(220, 35, 35))
    return image


def box_mask(size, box):
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def inpaint(**fields):
    return GenerationRequest(**{"mode": "inpaint", "prompt": PROMPT, "steps": 3, "seed": 4, "strength": 1.0,
                                "mask_blur": 0, **fields})


def test_crop_box_takes_the_mask_box_plus_padding_at_the_output_aspect_and_stays_inside():
    mask = np.zeros((200, 300), np.uint8)
    mask[90:110, 140:160] = 255
    assert crop_box(mask, 10, (64, 64), (300, 200)) == (130, 80, 170, 120)
    assert crop_box(mask, 10, (128, 64), (300, 200)) == (110, 80, 190, 120)  # widened to 2:1
    mask[:] = 0
    mask[0:10, 290:300] = 255  # a corner: the box is moved inside, not shrunk
    assert crop_box(mask, 10, (64, 64), (300, 200)) == (270, 0, 300, 30)


def test_only_masked_inpaints_a_small_region_of_a_big_image_and_keeps_the_rest_exactly(engine):
    image = picture(160)
    mask = box_mask(160, (100, 100, 124, 124))
    request = inpaint(init_image=image, mask_image=mask, inpaint_area="masked", inpaint_padding=8)
    plan = plan_inpaint(request, (64, 64), (1024, 1024))
    assert plan.box == (92, 92, 132, 132) and plan.size == (64, 64)  # the crop is worked on at the model's size
    result = engine.run(request).images[0]
    assert result.size == (160, 160)  # the picture keeps its own size
    before, after = np.asarray(image, int), np.asarray(result, int)
    outside = np.asarray(mask) == 0
    assert np.array_equal(before[outside], after[outside])
    assert np.abs(before - after)[~outside].mean() > 10  # the region was repainted


def test_outpainting_extends_the_canvas_keeps_the_old_pixels_and_prefills_from_the_edges(engine):
    image = picture(48)
    request = inpaint(init_image=image, width=48, height=48, outpaint={"left": 16, "bottom": 8})
    plan = plan_inpaint(request, (48, 48), (1024, 1024), seed=4)
    assert plan.canvas.size == (64, 56)
    new_area = np.asarray(plan.canvas_mask) > 0
    assert new_area[:, :16].all() and new_area[48:, :].all() and not new_area[:48, 16:].any()
    prefill = np.asarray(plan.canvas, int)[:48, :16]
    edge = np.asarray(image, int)[:, :1]
    assert np.abs(prefill.mean(axis=(0, 1)) - edge.mean(axis=(0, 1))).max() < 30  # edge colours stretched out
    assert prefill.std() > 3  # noised, not flat
    result = engine.run(request).images[0]
    assert result.size == (64, 56)
    assert np.array_equal(np.asarray(result)[:48, 16:], np.asarray(image))


def test_outpainting_beyond_the_maximum_size_and_outside_inpaint_mode_is_refused(make_config):
    with pytest.raises(ValueError, match="outpaint: extends the canvas in mode 'inpaint' only"):
        GenerationRequest(outpaint={"left": 8})
    request = inpaint(init_image=picture(64), width=64, height=64, outpaint={"right": 64})
    with pytest.raises(ValueError, match="outpaint: the extended canvas is 128x64, more than the allowed 96x96"):
        plan_inpaint(request, (64, 64), (96, 96))


def test_an_empty_mask_is_refused_naming_the_mask(engine):
    with pytest.raises(ValueError, match="mask_image: is empty"):
        engine.run(inpaint(init_image=picture(), mask_image=Image.new("L", (64, 64), 0)))


def test_mask_invert_repaints_the_black_area_and_keeps_the_white(engine):
    mask = box_mask(64, (16, 16, 48, 48))
    image = picture()
    result = engine.run(inpaint(init_image=image, mask_image=mask, mask_invert=True)).images[0]
    white = np.asarray(mask) > 0
    before, after = np.asarray(image, int), np.asarray(result, int)
    assert np.array_equal(before[white], after[white])
    assert np.abs(before - after)[~white].mean() > 5


@pytest.mark.parametrize("fill", ["fill", "latent noise", "latent nothing"])
def test_fill_modes_change_only_where_the_mask_is(engine, fill):
    mask = box_mask(64, (8, 8, 40, 40))
    request = inpaint(init_image=picture(), mask_image=mask, inpaint_fill=fill, strength=0.6)
    original = np.asarray(picture(), int)
    with engine.manager.use("builtin:shapes") as (base, _):
        start = np.asarray(plan_inpaint(request, (64, 64), (1024, 1024), engine._latent_decoder(base, None, 4),
                                        4).image, int)
    inside = np.asarray(mask) > 0
    assert np.array_equal(start[~inside], original[~inside])
    assert np.abs(start[inside] - original[inside]).mean() > 5
    result = engine.run(request).images[0]
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(result, int)[outside], original[outside])


def test_fill_modes_start_from_different_pictures(engine):
    mask = box_mask(64, (8, 8, 40, 40))
    results = {fill: np.asarray(engine.run(inpaint(init_image=picture(), mask_image=mask, inpaint_fill=fill,
                                                   strength=0.5)).images[0], int)
               for fill in ("original", "fill", "latent noise", "latent nothing")}
    inside = np.asarray(mask) > 0
    fills = list(results)
    for i, one in enumerate(fills):
        for other in fills[i + 1:]:
            assert np.abs(results[one] - results[other])[inside].mean() > 1, (one, other)


def test_inpaint_options_are_written_to_the_png_as_a1111_names_them_and_read_back():
    request = inpaint(init_image=picture(), mask_image=box_mask(64, (0, 0, 8, 8)), inpaint_area="masked",
                      inpaint_padding=24, mask_invert=True, inpaint_fill="latent noise",
                      outpaint={"left": 8, "top": 16})
    text = a1111_parameters(request, 4, 72, 80, "builtin:shapes")
    for part in ("Inpaint area: Only masked", "Masked area padding: 24", "Mask mode: Inpaint not masked",
                 "Masked content: latent noise", "Outpaint: 8 0 16 0"):
        assert part in text
    back = GenerationRequest.model_validate(parse_a1111(text), context={"require_images": False})
    assert (back.inpaint_area, back.inpaint_padding, back.mask_invert, back.inpaint_fill) == \
        ("masked", 24, True, "latent noise")
    assert back.outpaint == request.outpaint
