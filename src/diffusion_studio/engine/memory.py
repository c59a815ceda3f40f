"""Memory: the peak a run reached, and a guard that refuses a run that would not fit before it starts.

The guard's estimate is deliberately simple (no model profiling): inference keeps the UNet's skip connections
alive (about a dozen feature maps of the first level's width over the latent grid, per row of the batch, two rows
per image with guidance), and the autoencoder decodes one image at a time at full resolution with its widest
last level (a few such maps alive at once). Whichever is larger, plus a margin, must fit in what the device has
free. bench/engine.py prints the estimate beside the measured peak.
"""

from __future__ import annotations

import psutil
import torch

from ..requests import RequestError

UNET_LIVE_MAPS = 12
VAE_LIVE_MAPS = 8
MARGIN = 1.25


def available_bytes(device: torch.device) -> int:
    """What the device can still give: free CUDA memory plus the allocator's cached-but-unused part, or RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return int(psutil.virtual_memory().available)


def estimate_run_bytes(pipeline, width: int, height: int, images: int, guidance: float) -> int:
    """Activation memory of one run (weights are already loaded and counted elsewhere)."""
    element = next(pipeline.unet.parameters()).element_size()
    factor = pipeline.vae_scale_factor
    rows = images * (2 if guidance > 1 else 1)
    unet = rows * (width // factor) * (height // factor) * pipeline.unet.config.block_out_channels[0]
    vae_width = pipeline.vae.config.block_out_channels[0]
    if getattr(pipeline.vae, "use_tiling", False):  # decoded in tiles: the tile bounds the full-size maps
        tile = pipeline.vae.tile_sample_min_size
        width, height = min(width, tile), min(height, tile)
    vae = width * height * vae_width
    return int(MARGIN * element * max(UNET_LIVE_MAPS * unet, VAE_LIVE_MAPS * vae))


def check_fits(pipeline, device: torch.device, width: int, height: int, images: int, guidance: float) -> None:
    needed = estimate_run_bytes(pipeline, width, height, images, guidance)
    free = available_bytes(device)
    if needed > free:
        field = "batch_size" if images > 1 else "width"
        raise RequestError(field, f"{images} image(s) of {width}x{height} need about {needed / 2**30:.1f} GiB but "
                                  f"the {device.type} has {free / 2**30:.1f} GiB free; use a smaller size or batch, "
                                  "or enable memory.vae_tiling")


class MemorySampler:
    """Peak memory over a run: CUDA's own counter on GPU, RSS sampled at every step on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process = psutil.Process()
        self.peak = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)

    def result(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        self.sample()
        return self.peak
