"""kohya/A1111-format LoRA and LyCORIS files for the built-in models, written from the architecture's own module
names (as kohya's sd-scripts name them: the diffusers module path with '_' for '.', `lora_te_text_model_...`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _pairs(prefix: str, modules, rank: int, generator: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, module in modules:
        key = prefix + path.replace(".", "_")
        out_features, in_features = module.weight.shape
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * scale
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * scale
        tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    return tensors


def _text_modules(encoder):
    # kohya names CLIP's modules from the transformers 4 layout, under `text_model.`
    return [(f"text_model.{path.removeprefix('text_model.')}", module) for path, module in encoder.named_modules()
            if path.rsplit(".", 1)[-1] in TEXT_TARGETS]


def kohya_lora(pipe, path: Path, unet: bool = True, text: bool = True, rank: int = 4, seed: int = 0,
               scale: float = 0.3) -> Path:
    """A kohya LoRA for `pipe`'s architecture: UNet attention projections and the text encoders' attention
    (SD: `lora_te_`; SDXL: `lora_te1_` and `lora_te2_`), random small up/down weights and an alpha."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    if unet:
        modules = [(p, m) for p, m in pipe.unet.named_modules()
                   if any(p.endswith("." + t) for t in UNET_TARGETS) and isinstance(m, torch.nn.Linear)]
        tensors |= _pairs("lora_unet_", modules, rank, generator, scale)
    if text:
        if getattr(pipe, "text_encoder_2", None) is not None:
            tensors |= _pairs("lora_te1_", _text_modules(pipe.text_encoder), rank, generator, scale)
            tensors |= _pairs("lora_te2_", _text_modules(pipe.text_encoder_2), rank, generator, scale)
        else:
            tensors |= _pairs("lora_te_", _text_modules(pipe.text_encoder), rank, generator, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def loha_file(pipe, path: Path) -> Path:
    """A LyCORIS LoHa file (hada_w1_a/b, hada_w2_a/b) on the UNet's first attention projection."""
    name, module = next((p, m) for p, m in pipe.unet.named_modules() if p.endswith(".to_q"))
    out_features, in_features = module.weight.shape
    key = "lora_unet_" + name.replace(".", "_")
    tensors = {f"{key}.hada_w1_a": torch.randn(out_features, 2), f"{key}.hada_w1_b": torch.randn(2, in_features),
               f"{key}.hada_w2_a": torch.randn(out_features, 2), f"{key}.hada_w2_b": torch.randn(2, in_features),
               f"{key}.alpha": torch.tensor(2.0)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
