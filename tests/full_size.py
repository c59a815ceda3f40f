"""Full-size random-weight checkpoints in the original single-file layout, for detection, loading and memory.

Each file has every tensor of the published architecture (from the shipped configs in engine/model_configs), named
by engine/checkpoint.py's export, filled with `randn * 0.02`: loading, detection, speed and memory don't depend on
the values. The models are built on the meta device and exported there (the export only renames, concatenates and
transposes), so the file is written tensor by tensor: peak memory is one tensor, not one model or one file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion_studio.engine.checkpoint import (
    SD2_TEXT,
    XL_TEXT_G,
    controlnet_to_ldm,
    pipeline_to_ldm,
)
from diffusion_studio.engine.model_configs import config_folder

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
CONTROLNETS = ("controlnet", "controlnet_xl")


def build_components(variant: str, device: str = "meta") -> dict:
    """The variant's models from its shipped config (random init unless on meta): unet, vae, text encoder(s), or
    {"controlnet": ...}."""
    folder = config_folder(variant)
    with torch.device(device):
        if variant in CONTROLNETS:
            return {"controlnet": ControlNetModel.from_config(ControlNetModel.load_config(folder))}
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))}
        for name in ("text_encoder", "text_encoder_2"):
            if (folder / name).exists():
                config = CLIPTextConfig.from_pretrained(folder / name)
                with_projection = config.architectures == ["CLIPTextModelWithProjection"]
                parts[name] = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return parts


def original_extras(variant: str) -> dict[str, tuple[int, ...]]:
    """Tensors the published original files carry that diffusers' models have no place for (and its conversion
    skips): SD 2.x's 24th OpenCLIP layer and text projection (diffusers keeps 23 layers, as SD 2 uses the
    penultimate one), OpenCLIP's logit_scale. Real files have them, so the loaders must ignore them."""
    if variant in ("v2", "v2_base", "inpainting_v2"):
        width, block = 1024, f"{SD2_TEXT}transformer.resblocks.23."
        return {f"{block}attn.in_proj_weight": (3 * width, width), f"{block}attn.in_proj_bias": (3 * width,),
                f"{block}attn.out_proj.weight": (width, width), f"{block}attn.out_proj.bias": (width,),
                **{f"{block}{norm}.{p}": (width,) for norm in ("ln_1", "ln_2") for p in ("weight", "bias")},
                f"{block}mlp.c_fc.weight": (4 * width, width), f"{block}mlp.c_fc.bias": (4 * width,),
                f"{block}mlp.c_proj.weight": (width, 4 * width), f"{block}mlp.c_proj.bias": (width,),
                f"{SD2_TEXT}text_projection": (width, width), f"{SD2_TEXT}logit_scale": ()}
    if variant in ("xl_base", "xl_inpaint"):
        return {f"{XL_TEXT_G}logit_scale": ()}
    return {}


def checkpoint_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the variant's original-format file, computed on the meta device."""
    parts = build_components(variant)
    tensors = controlnet_to_ldm(parts["controlnet"]) if variant in CONTROLNETS else pipeline_to_ldm(**parts)
    return {**{name: tuple(t.shape) for name, t in tensors.items()}, **original_extras(variant)}


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, fill) -> Path:
    """A .safetensors file written one tensor at a time: `fill(shape)` makes each tensor just before it is
    written (safetensors' save_file needs every tensor, and a bytes copy of each, in memory at once)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            f.write(fill(shape).to(dtype).contiguous().view(-1).view(torch.uint8).numpy().data)
    return path


def random_tensor(dtype: torch.dtype, generator: torch.Generator, pool_size: int = 1 << 25):
    """randn * 0.02 values, each tensor a slice of one random pool at a random offset: drawing a billion normals
    costs more than writing them, and the values don't matter here."""
    pool = torch.randn((2 * pool_size,), generator=generator, dtype=dtype) * 0.02

    def fill(shape):
        n = int(torch.Size(shape).numel())
        start = int(torch.randint(pool_size, (), generator=generator))
        flat = pool[start:start + n] if n <= pool_size else pool.repeat((start + n) // pool.numel() + 1)[start:start + n]
        return flat.view(shape)
    return fill


def write_checkpoint(variant: str, path: Path, dtype: torch.dtype = torch.float16, fmt: str = "safetensors",
                     seed: int = 0) -> Path:
    """The variant's full-size random-weight checkpoint at `path`: `.safetensors`, or with fmt="ckpt" an A1111-style
    pickle `{"state_dict": ...}` (that one is built in memory: one file's size)."""
    shapes = checkpoint_shapes(variant)
    fill = random_tensor(dtype, torch.Generator().manual_seed(seed))
    path = Path(path)
    if fmt == "safetensors":
        return write_safetensors(path, shapes, dtype, fill)
    if fmt == "ckpt":
        torch.save({"state_dict": {name: fill(shape).clone() for name, shape in shapes.items()}}, path)
        return path
    raise ValueError(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}")


def weights_bytes(variant: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the variant's weights as diffusers' models hold them (without the extras diffusers ignores)."""
    extras = original_extras(variant)
    return sum(int(torch.Size(s).numel()) for n, s in checkpoint_shapes(variant).items()
               if n not in extras) * dtype.itemsize


DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def write_sparse_safetensors(path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]):
    """A safetensors file whose header describes `tensors`; the data is a sparse hole of the right size."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        size = dtype.itemsize
        for n in shape:
            size *= n
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path
