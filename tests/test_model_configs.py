"""The shipped config folders describe exactly the published models: parameter counts match the published figures."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    SchedulerMixin,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion_studio.engine.model_configs import CONFIGS_DIR, VARIANTS, config_folder

SD1_UNET, SD2_UNET, XL_UNET, REFINER_UNET = 859_520_964, 865_910_724, 2_567_463_684, 2_259_526_660
INPAINT_EXTRA = 320 * 5 * 3 * 3  # conv_in takes 9 channels (latents, mask, masked-image latents) instead of 4
VAE = 83_653_863
CLIP_L, OPENCLIP_H, OPENCLIP_BIGG = 123_060_480, 340_387_840, 694_659_840

PUBLISHED = {  # variant: (UNet, text encoder, text encoder 2)
    "v1": (SD1_UNET, CLIP_L, None),
    "inpainting": (SD1_UNET + INPAINT_EXTRA, CLIP_L, None),
    "v2": (SD2_UNET, OPENCLIP_H, None),
    "v2_base": (SD2_UNET, OPENCLIP_H, None),
    "inpainting_v2": (SD2_UNET + INPAINT_EXTRA, OPENCLIP_H, None),
    "xl_base": (XL_UNET, CLIP_L, OPENCLIP_BIGG),
    "xl_inpaint": (XL_UNET + INPAINT_EXTRA, CLIP_L, OPENCLIP_BIGG),
    "xl_refiner": (REFINER_UNET, None, OPENCLIP_BIGG),
}
CONTROLNETS = {"controlnet": 361_279_120, "controlnet_xl": 1_251_014_160}
PREDICTION = {"v2": "v_prediction"}  # every other shipped base predicts noise


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def text_encoder(folder):
    config = CLIPTextConfig.from_pretrained(folder)
    cls = CLIPTextModelWithProjection if config.architectures == ["CLIPTextModelWithProjection"] else CLIPTextModel
    return cls(config)


def test_every_variant_is_shipped():
    assert sorted(VARIANTS) == sorted([*PUBLISHED, *CONTROLNETS])
    assert config_folder("controlnet_xl_large") == CONFIGS_DIR / "controlnet_xl"  # diffusers' name for it
    with pytest.raises(KeyError, match="no shipped config for 'sd3'"):
        config_folder("sd3")


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_pipeline_configs_build_the_published_architecture(variant):
    folder = config_folder(variant)
    unet_params, te_params, te2_params = PUBLISHED[variant]
    with torch.device("meta"):  # no memory, even for SDXL
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        assert count(unet) == unet_params
        assert unet.config.in_channels == (9 if "inpaint" in variant else 4)
        assert count(AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))) == VAE
        for name, expected in (("text_encoder", te_params), ("text_encoder_2", te2_params)):
            assert (folder / name).exists() == (expected is not None)
            if expected is not None:
                assert count(text_encoder(folder / name)) == expected


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_pipeline_index_and_scheduler(variant):
    folder = config_folder(variant)
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_cls = getattr(diffusers, index["_class_name"])
    listed = {name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None}
    on_disk = {p.name for p in folder.iterdir() if p.is_dir()}
    assert listed == on_disk, "every listed component has its config folder and no folder is unlisted"
    assert "Inpaint" in pipeline_cls.__name__ or "inpaint" not in variant
    sched_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sched_config["_class_name"]).from_config(sched_config)
    assert isinstance(scheduler, SchedulerMixin)
    assert scheduler.config.prediction_type == PREDICTION.get(variant, "epsilon")
    assert (scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.beta_end) == (
        "scaled_linear", 0.00085, 0.012)
    assert scheduler.config.steps_offset == 1 and scheduler.config.timestep_spacing == "leading"
    unet = UNet2DConditionModel.load_config(folder / "unet")
    assert unet["sample_size"] == {"v2": 96}.get(variant, 128 if variant.startswith("xl") else 64)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (folder / tokenizer).exists():
            assert {p.name for p in (folder / tokenizer).iterdir()} == {"tokenizer_config.json",
                                                                       "special_tokens_map.json"}
            # OpenCLIP pads with "!" (id 0), OpenAI's CLIP with its end token.
            openclip = tokenizer == "tokenizer_2" or variant in {"v2", "v2_base", "inpainting_v2"}
            pad = json.loads((folder / tokenizer / "special_tokens_map.json").read_text())["pad_token"]
            assert pad == ("!" if openclip else "<|endoftext|>")


@pytest.mark.parametrize("variant", sorted(CONTROLNETS))
def test_controlnet_configs_build_the_published_architecture(variant):
    with torch.device("meta"):
        model = ControlNetModel.from_config(ControlNetModel.load_config(config_folder(variant)))
    assert count(model) == CONTROLNETS[variant]


def test_no_machine_paths_in_the_configs():
    for path in CONFIGS_DIR.rglob("*.json"):
        assert "_name_or_path" not in json.loads(path.read_text()), path
