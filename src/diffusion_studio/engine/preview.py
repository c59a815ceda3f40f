"""Cheap previews, never the full VAE per step: a linear latent -> RGB map, or a tiny distilled decoder.

Linear maps (latent size): known ones for the real SD and SDXL VAEs; any other VAE (the built-ins) gets a map
fitted once by least squares from latents of a few synthetic images to those images downsampled to latent size.
Tiny decoder (full image size): only for the built-ins' VAE, which builtin/preview_decoder.py distils it from and
recognises by config and weights; `preview_decoder(vae)` is None for every other VAE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


# rows: latent channels (+ bias row); columns: R, G, B. Output is in [-1, 1].
SD_MAP = [[.3512, .2297, .3227], [.3250, .4974, .2350], [-.2829, .1762, .2721], [-.2120, -.2616, -.7177],
          [0.0, 0.0, 0.0]]
SDXL_MAP = [[.3651, .4232, .4341], [-.2533, -.0042, .1068], [.1076, .1111, -.0362], [-.3165, -.2492, -.2188],
            [.1084, -.0175, -.0011]]
REAL_VAE_WIDTHS = [128, 256, 512, 512]


def preview_map(vae) -> torch.Tensor:
    """(latent_channels + 1) x 3 map for this VAE, for latents as they are inside the denoising loop."""
    import torch
    config = vae.config
    if list(config.block_out_channels) == REAL_VAE_WIDTHS and config.latent_channels == 4:
        return torch.tensor(SDXL_MAP if abs(config.scaling_factor - 0.13025) < 1e-4 else SD_MAP)
    return fit_preview_map(vae)


def fit_preview_map(vae, size: int = 64, count: int = 16, seed: int = 0) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return _fit_preview_map(vae, size, count, seed)


def _fit_preview_map(vae, size: int, count: int, seed: int) -> torch.Tensor:
    import torch
    generator = torch.Generator().manual_seed(seed)
    # Synthetic images: flat colours with a block of another colour, so the fit sees both hue and structure.
    images = torch.rand(count, 3, 1, 1, generator=generator).expand(count, 3, size, size).clone()
    half = size // 2
    images[:, :, :half, :half] = torch.rand(count, 3, 1, 1, generator=generator)
    images = images * 2 - 1
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mean.float().cpu()
    latents = latents * vae.config.scaling_factor
    small = torch.nn.functional.interpolate(images, size=latents.shape[-2:], mode="area")
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = small.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x, y).solution


def latents_to_preview(latents: torch.Tensor, mapping: torch.Tensor) -> Image.Image:
    """First latent of a batch -> small RGB image."""
    import torch
    lat = latents[0].float().cpu().permute(1, 2, 0)
    rgb = lat @ mapping[:-1] + mapping[-1]
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def preview_decoder(vae) -> torch.nn.Module | None:
    """The tiny decoder distilled from this very VAE (recognised by its config and weights, not its name), else
    None. Loaded once and shared: its forward changes no state, so several threads may decode at once."""
    from ..builtin.preview_decoder import decoder_for  # torch modules: imported by the first preview, not the start

    return decoder_for(vae)


def latents_to_image(latents: torch.Tensor, decoder: torch.nn.Module) -> Image.Image:
    """First latent of a batch -> RGB image at the full image size, through `decoder` (from preview_decoder)."""
    import torch
    parameter = next(decoder.parameters())
    with torch.inference_mode():
        rgb = decoder(latents[:1].to(parameter.device, parameter.dtype))[0]
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))
