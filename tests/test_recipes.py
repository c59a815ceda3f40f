"""The one command that rebuilds the built-ins (`train builtin --name ...`), run end to end on tiny budgets into a
scratch models folder: it builds, checkpoints, resumes, installs, and what it installs loads and generates."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusion_studio.workshop import recipes
from diffusion_studio.workshop.recipes import train_builtin
from diffusion_studio.training.trainer import TrainingError

STEPS = 201  # the recipes warm up for 200 steps; a run must be longer


@pytest.fixture
def models(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    monkeypatch.setattr(recipes, "COMMITTED_DIR", folder)
    return folder


def steps_logged(work, kind):
    return [event["step"] for event in map(json.loads, (work / "log.jsonl").read_text().splitlines())
            if event["kind"] == kind or event.get("message") == kind]


def test_shapes_then_canny_and_xl_build_resume_and_install(models, tmp_path):
    with pytest.raises(TrainingError, match="train shapes first"):
        train_builtin("shapes-canny", tmp_path / "canny", unet_steps=STEPS, batch_size=2, pool_size=8)

    # 1. shapes from scratch: autoencoder, latent scale, UNet + text encoder; installed with its progress.
    work = tmp_path / "shapes"
    installed = train_builtin("shapes", work, vae_steps=2, unet_steps=STEPS, batch_size=2, pool_size=8)
    assert installed == models / "shapes"
    assert json.loads((installed / "training.json").read_text()) == {"unet_step": STEPS, "finished": True}
    pipe = DiffusionPipeline.from_pretrained(installed)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae.config.scaling_factor != 1.0  # measured from the autoencoder's latents
    # img2img and inpainting sample the posterior: pinned to its mean, it adds no noise the UNet never saw.
    assert pipe.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.std.max() < 1e-3
    image = pipe("a red circle on a white background", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)

    # 2. asked for more steps, the same run continues from its checkpoint (not from step 0, not warm).
    train_builtin("shapes", work, vae_steps=2, unet_steps=STEPS + 2, batch_size=2, pool_size=8)
    assert steps_logged(work, "resumed") == [STEPS]
    assert json.loads((installed / "training.json").read_text())["unet_step"] == STEPS + 2

    # 3. the ControlNets beside it (canny, inpainting) and the SDXL-architecture model reusing its autoencoder.
    canny = train_builtin("shapes-canny", tmp_path / "canny", unet_steps=101, batch_size=2, pool_size=8)
    assert (canny / "config.json").exists() and (canny / "diffusion_pytorch_model.safetensors").exists()
    inpaint = train_builtin("shapes-inpaint", tmp_path / "inpaint", unet_steps=101, batch_size=2, pool_size=8)
    assert inpaint == models / "shapes-inpaint" and (inpaint / "diffusion_pytorch_model.safetensors").exists()
    xl = train_builtin("shapes-xl", tmp_path / "xl", unet_steps=STEPS, batch_size=2, pool_size=8)
    xl_pipe = DiffusionPipeline.from_pretrained(xl)
    assert xl_pipe.text_encoder_2 is not None and xl_pipe.unet.config.addition_embed_type == "text_time"
    assert xl_pipe.vae.config.scaling_factor == pipe.vae.config.scaling_factor
