"""Memory: the peak a run reached, and a guard that refuses a run that would not fit before it starts.

The peak is each run's own: sampled at the run's start, after every step and at its end. Nothing resets CUDA's
process-wide peak counter, since several workers run at once and a reset by one would erase another's peak.

The guard's estimate is deliberately simple (no model profiling): inference keeps the UNet's skip connections
alive (about a dozen feature maps of the first level's width over the latent grid, per row of the batch, two rows
per image with guidance), and the autoencoder decodes one image at a time at full resolution with its widest
last level (a few such maps alive at once). Whichever is larger, plus a margin, must fit in what the device has
free. bench/engine.py prints the estimate beside the measured peak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil

from ..requests import RequestError

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

UNET_LIVE_MAPS = 12
VAE_LIVE_MAPS = 8
MARGIN = 1.25


def available_bytes(device: torch.device) -> int:
    """What the device can still give: free CUDA memory plus the allocator's cached-but-unused part, or RAM."""
    import torch
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return int(psutil.virtual_memory().available)


def estimate_run_bytes(pipeline, width: int, height: int, images: int, guidance: float,
                       tiled: bool | None = None) -> int:
    """Activation memory of one run (weights are already loaded and counted elsewhere). `tiled`: whether the
    decode goes in tiles (None: as the VAE is set)."""
    element = next(pipeline.unet.parameters()).element_size()
    factor = pipeline.vae_scale_factor
    rows = images * (2 if guidance > 1 else 1)
    unet = rows * (width // factor) * (height // factor) * pipeline.unet.config.block_out_channels[0]
    vae_width = pipeline.vae.config.block_out_channels[0]
    if tiled or (tiled is None and getattr(pipeline.vae, "use_tiling", False)):  # tiles bound the full-size maps
        tile = pipeline.vae.tile_sample_min_size
        width, height = min(width, tile), min(height, tile)
    vae = width * height * vae_width
    return int(MARGIN * element * max(UNET_LIVE_MAPS * unet, VAE_LIVE_MAPS * vae))


def check_fits(pipeline, device: torch.device, width: int, height: int, images: int, guidance: float,
               tile_when_needed: bool = False) -> bool:
    """Refuse a run that would not fit; returns whether its decode must go in tiles to fit (only when
    `tile_when_needed` and the VAE is not tiling already: a tiled decode blends seams, so only then)."""
    free = available_bytes(device)
    needed = estimate_run_bytes(pipeline, width, height, images, guidance)
    if needed <= free:
        return False
    if tile_when_needed and estimate_run_bytes(pipeline, width, height, images, guidance, tiled=True) <= free:
        return True
    field = "batch_size" if images > 1 else "width"
    raise RequestError(field, f"{images} image(s) of {width}x{height} need about {needed / 2**30:.1f} GiB but "
                              f"the {device.type} has {free / 2**30:.1f} GiB free; use a smaller size or batch, "
                              "or enable memory.vae_tiling")


class MemorySampler:
    """Peak memory seen while one run was going: on CUDA the allocated bytes, elsewhere the process's RSS, sampled
    at start, at every step (`sample()`, from the step callback) and at the end (`result()`).

    Samples taken between steps miss the activations freed within a step, so on CUDA the process-wide high-water
    mark is read too, without resetting it: if it rose while this run was going, that level was reached during the
    run and counts as the run's peak. Concurrent runs share the device, so a peak is that of the memory in use
    while the run was going, its own and its neighbours'; never a figure left over from an earlier run."""

    def __init__(self, device: torch.device):
        import torch
        self.device = device
        self.process = psutil.Process()
        self.peak = 0
        self._cuda = device.type == "cuda"
        self._high_water_at_start = int(torch.cuda.max_memory_allocated(device)) if self._cuda else 0
        self.sample()

    def sample(self) -> None:
        import torch
        now = torch.cuda.memory_allocated(self.device) if self._cuda else self.process.memory_info().rss
        self.peak = max(self.peak, int(now))

    def result(self) -> int:
        import torch
        self.sample()
        if self._cuda:
            high_water = int(torch.cuda.max_memory_allocated(self.device))
            if high_water > self._high_water_at_start:  # a new process-wide maximum, set during this run
                self.peak = max(self.peak, high_water)
        return self.peak
