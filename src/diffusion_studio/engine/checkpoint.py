"""Export an SD-family diffusers folder as one original-format (LDM) checkpoint, as A1111 and ComfyUI load it.

The key renaming is the inverse of diffusers' own `convert_ldm_*_checkpoint` (loaders/single_file_utils.py), so
`from_single_file` reads our files back exactly; it follows each model's config (block counts, layers per block)
rather than SD 1.5's fixed numbers, so tiny models export too. SDXL's OpenCLIP text encoder is not covered.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from transformers import CLIPTextModel

RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
VAE_ATTENTION_NAMES = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                       ("to_out.0.", "proj_out.")]


def _rename(text: str, pairs) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    config = unet.config
    if config.addition_embed_type is not None:
        raise ValueError("single-file export covers SD 1.x/2.x UNets, not SDXL's")
    stride = config.layers_per_block + 1
    fixed = {k: v for k, v in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    up_has_attention = {i: "CrossAttn" in kind for i, kind in enumerate(config.up_block_types)}
    out = {}
    for key, tensor in unet.state_dict().items():
        if key in fixed:
            ldm = fixed[key]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            ldm = f"input_blocks.{stride * b + j + 1}.0.{_rename(rest, RESNET_NAMES)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            ldm = f"input_blocks.{stride * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            ldm = f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            ldm = f"middle_block.{2 * int(m[1])}.{_rename(m[2], RESNET_NAMES)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            ldm = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            ldm = f"output_blocks.{stride * int(m[1]) + int(m[2])}.0.{_rename(m[3], RESNET_NAMES)}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            ldm = f"output_blocks.{stride * int(m[1]) + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            ldm = f"output_blocks.{stride * b + stride - 1}.{2 if up_has_attention[b] else 1}.conv.{m[2]}"
        else:
            raise ValueError(f"no original-format name for UNet weight '{key}'")
        out["model.diffusion_model." + ldm] = tensor
    return out


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    fixed = {k: v for k, v in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    levels = len(vae.config.up_block_types)
    out = {}
    for key, tensor in vae.state_dict().items():
        if key in fixed:
            ldm = fixed[key]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            ldm = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            ldm = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            ldm = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            ldm = f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION_NAMES)}"
            if tensor.ndim == 2:  # the original attention uses 1x1 convolutions
                tensor = tensor[:, :, None, None]
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            ldm = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            ldm = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        else:
            raise ValueError(f"no original-format name for VAE weight '{key}'")
        out["first_stage_model." + ldm] = tensor
    return out


def export_single_file(pipeline_folder: Path, target: Path) -> Path:
    """Write `target` (.safetensors) holding UNet, VAE and text encoder in the original layout."""
    folder = Path(pipeline_folder)
    tensors = {
        **unet_to_ldm(UNet2DConditionModel.from_pretrained(folder, subfolder="unet")),
        **vae_to_ldm(AutoencoderKL.from_pretrained(folder, subfolder="vae")),
    }
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    for key, tensor in text_encoder.state_dict().items():
        # Original checkpoints nest CLIP under text_model.; transformers 5 state dicts no longer do.
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        tensors[f"cond_stage_model.transformer.{key}"] = tensor
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target))
    return target
