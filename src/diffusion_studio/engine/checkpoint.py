"""Export SD-family diffusers models as one original-format (LDM) checkpoint, as A1111 and ComfyUI load it.

Every renaming here is the inverse of diffusers' own single-file conversion (loaders/single_file_utils.py:
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`, `convert_controlnet_checkpoint`), so `from_single_file` reads our files back to the
same tensors. It follows each model's config (block counts, layers per block) rather than SD 1.5's fixed numbers, so
tiny models export too, and it only renames, concatenates and transposes: models built on the meta device export
their full-size key layout at no memory cost.

Where each part lives in the original files:
  SD 1.x    cond_stage_model.transformer.text_model.*   (OpenAI CLIP ViT-L/14, transformers' names)
  SD 2.x    cond_stage_model.model.*                    (OpenCLIP ViT-H: transformer.resblocks.N.attn.in_proj_*)
  SDXL      conditioner.embedders.0.transformer.*       (CLIP ViT-L/14) + conditioner.embedders.1.model.* (bigG)
  refiner   conditioner.embedders.0.model.*             (OpenCLIP bigG only)
  all       model.diffusion_model.* (UNet), first_stage_model.* (VAE)
  ControlNet (SD) control_model.*; ControlNet (SDXL): diffusers' own names, as the published SDXL ControlNet files
  have them — diffusers' `convert_controlnet_checkpoint` passes those through and drops an original-layout file's
  `label_emb` (SDXL's added embedding), so that is the only SDXL layout it loads whole.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    LDM_CONTROLNET_KEY,
    LDM_UNET_KEY,
)
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
VAE_ATTENTION_NAMES = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                       ("to_out.0.", "proj_out.")]
OPENCLIP_LAYER_NAMES = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                        ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]
OPENCLIP_FIXED = {k: v for k, v in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}

SD_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
XL_TEXT_L = "conditioner.embedders.0.transformer."
XL_TEXT_G = "conditioner.embedders.1.model."
REFINER_TEXT_G = "conditioner.embedders.0.model."


def _rename(text: str, pairs) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _unet_block_name(key: str, config, up_has_attention: dict[int, bool]) -> str | None:
    """The original name of a UNet/ControlNet down, mid or up block weight (without prefix), None if not one."""
    stride = config.layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"input_blocks.{stride * int(m[1]) + int(m[2]) + 1}.0.{_rename(m[3], RESNET_NAMES)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{stride * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename(m[2], RESNET_NAMES)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{stride * int(m[1]) + int(m[2])}.0.{_rename(m[3], RESNET_NAMES)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{stride * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        return f"output_blocks.{stride * b + stride - 1}.{2 if up_has_attention[b] else 1}.conv.{m[2]}"
    return None


def _embedding_names(kind: str) -> dict[str, str]:
    """Time, class and added (SDXL's text_time) embeddings, conv_in/out: one table per model kind."""
    tables = DIFFUSERS_TO_LDM_MAPPING[kind]
    return {**tables["layers"], **tables["class_embed_type"], **tables["addition_embed_type"]}


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """SD 1.x/2.x/SDXL/refiner UNets, 4- or 9-channel, as `model.diffusion_model.*`."""
    config = unet.config
    fixed = _embedding_names("unet")
    up_has_attention = {i: "CrossAttn" in kind for i, kind in enumerate(config.up_block_types)}
    out = {}
    for key, tensor in unet.state_dict().items():
        ldm = fixed.get(key) or _unet_block_name(key, config, up_has_attention)
        if ldm is None:
            raise ValueError(f"no original-format name for UNet weight '{key}'")
        out[LDM_UNET_KEY + ldm] = tensor
    return out


def controlnet_to_ldm(controlnet: ControlNetModel) -> dict[str, torch.Tensor]:
    """An SD ControlNet as `control_model.*`; an SDXL one in diffusers' names (see the module's docstring)."""
    if controlnet.config.addition_embed_type is not None:
        return dict(controlnet.state_dict())
    fixed = _embedding_names("controlnet")
    out = {}
    for key, tensor in controlnet.state_dict().items():
        ldm = fixed.get(key) or _unet_block_name(key, controlnet.config, {})
        if ldm is None and (m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key)):
            ldm = f"zero_convs.{m[1]}.0.{m[2]}"
        elif ldm is None and (m := re.match(r"controlnet_mid_block\.(.*)", key)):
            ldm = f"middle_block_out.0.{m[1]}"
        elif ldm is None and (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key)):
            ldm = f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"  # the original interleaves SiLUs
        if ldm is None:
            raise ValueError(f"no original-format name for ControlNet weight '{key}'")
        out[LDM_CONTROLNET_KEY + ldm] = tensor
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


def _text_state(text_encoder) -> dict[str, torch.Tensor]:
    # Original checkpoints nest CLIP under text_model.; transformers 5's CLIPTextModel state dict no longer does.
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in text_encoder.state_dict().items()}


def clip_to_ldm(text_encoder: CLIPTextModel, prefix: str = SD_TEXT) -> dict[str, torch.Tensor]:
    """OpenAI's CLIP text model (SD 1.x, SDXL's first): the original files keep transformers' own names."""
    return {prefix + key: tensor for key, tensor in _text_state(text_encoder).items()}


def openclip_to_ldm(text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
                    prefix: str = SD2_TEXT) -> dict[str, torch.Tensor]:
    """An OpenCLIP text model (SD 2.x's ViT-H, SDXL's bigG) in open_clip's names: q, k, v as one in_proj, the
    projection as a bare (transposed) matrix."""
    out = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _text_state(text_encoder).items():
        if key in OPENCLIP_FIXED:
            out[prefix + OPENCLIP_FIXED[key]] = tensor.T if key == "text_projection.weight" else tensor
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault(f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = tensor
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key):
            out[f"{prefix}transformer.resblocks.{m[1]}.{_rename(m[2], OPENCLIP_LAYER_NAMES)}"] = tensor
        else:
            raise ValueError(f"no original-format name for OpenCLIP weight '{key}'")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def is_openclip(text_encoder) -> bool:
    """OpenCLIP models use exact GELU; OpenAI's CLIP the quick approximation (its config says which)."""
    return text_encoder.config.hidden_act != "quick_gelu"


def pipeline_to_ldm(unet, vae, text_encoder=None, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """One original-format state dict for an SD 1.x/2.x, SDXL base/inpainting or SDXL refiner pipeline."""
    tensors = {**unet_to_ldm(unet), **vae_to_ldm(vae)}
    if text_encoder_2 is None:  # SD 1.x (OpenAI CLIP) or SD 2.x (OpenCLIP ViT-H)
        if is_openclip(text_encoder):
            tensors.update(openclip_to_ldm(text_encoder, SD2_TEXT))
        else:
            tensors.update(clip_to_ldm(text_encoder, SD_TEXT))
    elif text_encoder is None:  # the SDXL refiner: bigG alone, in the first embedder slot
        tensors.update(openclip_to_ldm(text_encoder_2, REFINER_TEXT_G))
    else:
        tensors.update(clip_to_ldm(text_encoder, XL_TEXT_L))
        tensors.update(openclip_to_ldm(text_encoder_2, XL_TEXT_G))
    return tensors


def _load_pipeline_parts(folder: Path) -> dict:
    index = json.loads((folder / "model_index.json").read_text())
    parts = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
             "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae")}
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    for name in ("text_encoder", "text_encoder_2"):
        spec = index.get(name) or [None, None]
        if spec[1] is not None:
            parts[name] = classes[spec[1]].from_pretrained(folder, subfolder=name)
    return parts


def export_single_file(folder: Path, target: Path, dtype: torch.dtype | None = None) -> Path:
    """Write `target` (.safetensors) from a diffusers pipeline folder (UNet, VAE, text encoders) or a ControlNet
    folder (its config.json), in the original layout; `dtype` casts the weights (default: as saved)."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        tensors = pipeline_to_ldm(**_load_pipeline_parts(folder))
    else:
        tensors = controlnet_to_ldm(ControlNetModel.from_pretrained(folder))
    save_file({k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in tensors.items()}, str(target))
    return target
