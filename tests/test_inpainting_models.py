"""Inpainting checkpoints (9-channel UNets) in every mode, as A1111 runs them: the inpainting pipeline, with the
whole image masked outside inpaint mode; and the SDXL refiner refused where it can't start an image."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

from diffusion_studio.builtin.architectures import TinySize, build_sd_pipeline
from diffusion_studio.engine.runner import Engine
from diffusion_studio.requests import GenerationRequest, RequestError


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory):
    """A tiny SD pipeline whose UNet takes 9 channels (latents, mask, masked-image latents), saved and loaded back."""
    pipe = build_sd_pipeline(seed=3, size=TinySize(image_px=32))
    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})
    folder = tmp_path_factory.mktemp("models") / "tiny-inpainting"
    StableDiffusionInpaintPipeline(**{**pipe.components, "unet": unet}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_an_inpainting_model_runs_every_mode(make_config, inpainting_folder, shape_image, center_mask, mode):
    engine = Engine(make_config())
    fields = {"model": str(inpainting_folder), "mode": mode, "prompt": "a red circle", "steps": 2, "seed": 4}
    if mode != "txt2img":
        fields["init_image"] = shape_image.resize((32, 32))
    if mode == "inpaint":
        fields["mask_image"] = center_mask.resize((32, 32))
    result = engine.run(GenerationRequest(**fields))
    again = engine.run(GenerationRequest(**fields))
    assert result.images[0].size == (32, 32)
    assert result.images[0].tobytes() == again.images[0].tobytes()  # reproducible, as every mode is
    loaded = engine.manager.loaded()[0]
    assert loaded["name"] == str(inpainting_folder)


def test_the_refiner_refuses_to_start_an_image(make_config, engine):
    """A loaded base without a CLIP-L encoder (the SDXL refiner's layout) is refused for txt2img by name."""
    with engine.manager.use("builtin:shapes-xl") as (base, _):
        refiner_like = type(base)(base.source, pipeline=type(base.pipeline)(**{**base.pipeline.components,
                                                                                "text_encoder": None,
                                                                                "tokenizer": None}))
        with pytest.raises(RequestError, match="SDXL refiner: it refines an image"):
            engine.manager.view(refiner_like, GenerationRequest().mode, "Euler")
