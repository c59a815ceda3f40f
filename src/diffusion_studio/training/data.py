"""Training data as a pool of VAE latents + captions: shapes world (endless, a fresh pool each run) or a folder of
user images with captions (`name.txt` beside `name.png`) or one instance prompt.

Encoding once, up front, keeps the VAE out of every step: on CPU it would cost as much as the UNet step itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..builtin.shapes import ShapesWorld, blob_mask

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class DatasetError(ValueError):
    """The dataset can't be used (names the field `dataset` or `instance_prompt`)."""


@dataclass
class LatentPool:
    latents: torch.Tensor  # N x C x h x w, already multiplied by the VAE scaling factor
    captions: list[str]
    images: list[Image.Image]  # kept for ControlNet conditions and for showing what was trained on
    conditions: torch.Tensor | None = None  # ControlNet training: N x 3 x H x W control maps in [0, 1]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], list[int]]:
        index = torch.randint(0, len(self), (size,), generator=generator).tolist()
        return self.latents[index], [self.captions[i] for i in index], index


def control_maps(images: list[Image.Image], make_map: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    """Control maps as the ControlNet pipelines feed them: RGB in [0, 1]."""
    return (to_tensor([make_map(image) for image in images]) + 1) / 2


def inpainting_mask(image: Image.Image, rng: random.Random) -> Image.Image:
    """A training hole for an inpainting ControlNet: 45% the foreground's box grown by a margin (replace the
    object: what a user masks most), 45% a random rectangle, 10% everything (plain generation from the prompt)."""
    width, height = image.size
    mask = Image.new("L", image.size, 0)
    choice = rng.random()
    foreground = blob_mask(image) if 0.1 <= choice < 0.55 else None  # only the object-box branch needs it
    if choice < 0.1:
        mask.paste(255, (0, 0, width, height))
    elif foreground is not None:
        ys, xs = np.nonzero(foreground)
        margin = [rng.randint(1, width // 6) for _ in range(4)]
        mask.paste(255, (max(xs.min() - margin[0], 0), max(ys.min() - margin[1], 0),
                         min(xs.max() + 1 + margin[2], width), min(ys.max() + 1 + margin[3], height)))
    else:
        w, h = rng.randint(width // 4, width * 3 // 4), rng.randint(height // 4, height * 3 // 4)
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        mask.paste(255, (left, top, left + w, top + h))
    return mask


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def encode(vae, images: list[Image.Image], batch: int = 64) -> torch.Tensor:
    """Latent means (not samples: a tiny VAE's posterior noise drowns the signal) times the scaling factor."""
    param = next(vae.parameters())
    chunks = []
    for start in range(0, len(images), batch):
        pixels = to_tensor(images[start:start + batch]).to(param.device, param.dtype)
        chunks.append(vae.encode(pixels).latent_dist.mean.float().cpu())
    return torch.cat(chunks) * vae.config.scaling_factor


def shapes_pool(vae, count: int, resolution: int, seed: int) -> LatentPool:
    images, captions = ShapesWorld(seed=seed, size=resolution).batch(count)
    return LatentPool(encode(vae, images), captions, images)


def folder_pool(vae, folder: Path, resolution: int, instance_prompt: str | None,
                warn: Callable[[str], None]) -> LatentPool:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset: '{folder}' is neither 'shapes' nor a folder")
    images, captions = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as opened:
                image = ImageOps.fit(opened.convert("RGB"), (resolution, resolution), Image.LANCZOS)
        except (UnidentifiedImageError, OSError) as exc:
            warn(f"skipped {path.name}: not a readable image ({exc})")
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else instance_prompt
        if not caption:
            warn(f"skipped {path.name}: no {caption_file.name} and no instance_prompt")
            continue
        images.append(image)
        captions.append(caption)
    if not images:
        raise DatasetError(f"dataset: no usable images in '{folder}' (PNG/JPEG/WEBP/BMP, each with a .txt caption "
                           "or an instance_prompt)")
    return LatentPool(encode(vae, images), captions, images)
