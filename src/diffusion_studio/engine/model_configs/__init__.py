"""The published architectures of the SD families, as small diffusers config folders shipped with the package.

A single-file checkpoint carries only tensors; these folders give `from_single_file(config=...)` the rest
(UNet/VAE/text encoder configs, scheduler, tokenizer settings) with no network. Folders are named after diffusers'
`infer_diffusers_model_type`, except where diffusers has one name for two published models or a longer name.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = Path(__file__).parent

# diffusers' model type -> folder, where they differ. SD 2.x 512-ε and 768-v have the same tensors, so diffusers
# calls both "v2" (and fetches the 768-v configs); "v2_base" is the 512 ε-prediction model (stable-diffusion-2-1-base).
FOLDER_OF_MODEL_TYPE = {"controlnet_xl_large": "controlnet_xl"}

VARIANTS = ("v1", "v2", "v2_base", "inpainting", "inpainting_v2", "xl_base", "xl_refiner", "xl_inpaint",
            "controlnet", "controlnet_xl")


def config_folder(variant: str) -> Path:
    """The shipped config folder for a diffusers model type (or one of our folder names); KeyError if none."""
    name = FOLDER_OF_MODEL_TYPE.get(variant, variant)
    if name not in VARIANTS:
        raise KeyError(f"no shipped config for '{variant}' (have: {', '.join(VARIANTS)})")
    return CONFIGS_DIR / name
