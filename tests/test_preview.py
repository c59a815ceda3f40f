"""Cheap previews: known maps for the real SD/SDXL VAEs, a least-squares fit for any other VAE."""

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion_studio.engine.preview import SD_MAP, SDXL_MAP, fit_preview_map, latents_to_preview, preview_map


class LinearVAE(torch.nn.Module):
    """A VAE stand-in whose latents are a known linear function of the 4x-downsampled image."""

    def __init__(self):
        super().__init__()
        self.mix = torch.tensor([[0.5, -0.2, 0.1, 0.3], [0.1, 0.6, -0.3, 0.2], [-0.4, 0.2, 0.7, 0.1]])
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(block_out_channels=[32, 64, 64], latent_channels=4, scaling_factor=0.5)

    def encode(self, images):
        small = torch.nn.functional.avg_pool2d(images, 4)
        latents = torch.einsum("bchw,cd->bdhw", small, self.mix) + 0.25
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=latents))


def test_fitted_map_recovers_colours():
    vae = LinearVAE()
    mapping = fit_preview_map(vae)
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill="blue")
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    preview = np.asarray(latents_to_preview(latents, mapping)).astype(int)
    expected = np.asarray(image.resize((16, 16), Image.BOX)).astype(int)
    assert preview.shape == (16, 16, 3)
    assert np.abs(preview - expected).max() <= 2


def test_real_vaes_use_their_known_maps():
    real = dict(block_out_channels=[128, 256, 512, 512], latent_channels=4)
    sd = SimpleNamespace(config=SimpleNamespace(**real, scaling_factor=0.18215))
    sdxl = SimpleNamespace(config=SimpleNamespace(**real, scaling_factor=0.13025))
    assert preview_map(sd).tolist() == torch.tensor(SD_MAP).tolist()
    assert preview_map(sdxl).tolist() == torch.tensor(SDXL_MAP).tolist()
