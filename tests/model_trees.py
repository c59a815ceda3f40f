"""Model files with real key layouts, small, and the A1111 / ComfyUI folder trees that hold them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from diffusion_studio.builtin.catalog import COMMITTED_DIR
from diffusion_studio.engine.checkpoint import export_single_file, vae_to_ldm


def tiny_checkpoint(sd_folder: Path, target: Path) -> Path:
    """The tiny SD pipeline as one original-layout file, its diffusers configs beside it (`<stem>/`): the tiny
    UNet fits no real SD family's shapes, so the header alone can't say how to build it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    export_single_file(sd_folder, target)
    shutil.copytree(sd_folder, target.with_suffix(""), ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


def kohya_lora(sd_folder: Path, target: Path, seed: int = 0, rank: int = 2, scale: float = 0.5) -> Path:
    """A kohya-format LoRA on the tiny UNet's attention projections: `lora_unet_<module path with _>.lora_down /
    .lora_up / .alpha`, as kohya's sd-scripts write them."""
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, module in unet.named_modules():
        if path.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(module, torch.nn.Linear):
            key = "lora_unet_" + path.replace(".", "_")
            out_features, in_features = module.weight.shape
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * scale
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * scale
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={"ss_output_name": target.stem, "ss_network_dim": str(rank)})
    return target


def a1111_embedding(target: Path, vectors: int = 2, width: int = 768) -> Path:
    """An A1111 textual-inversion `.pt`: string_to_param under '*', with its training notes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(vectors, width)},
                "name": target.stem, "step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5"},
               target)
    return target


def vae_file(sd_folder: Path, target: Path) -> Path:
    """A standalone VAE file as A1111 keeps them (original layout, no `first_stage_model.` prefix)."""
    vae = AutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    tensors = {key.removeprefix("first_stage_model."): t.contiguous() for key, t in vae_to_ldm(vae).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return target


def controlnet_folder(target: Path) -> Path:
    """A diffusers ControlNet folder (the committed built-in canny ControlNet's)."""
    shutil.copytree(COMMITTED_DIR / "shapes-canny", target)
    return target


def a1111_tree(root: Path, sd_folder: Path) -> Path:
    """An AUTOMATIC1111/Forge root: models/Stable-diffusion (a sub-folder, a misplaced LoRA), models/Lora (a
    sub-folder, a file that is no model), models/VAE, models/ControlNet, embeddings/."""
    tiny_checkpoint(sd_folder, root / "models/Stable-diffusion/anime/tiny.safetensors")
    kohya_lora(sd_folder, root / "models/Stable-diffusion/oops-lora.safetensors")
    kohya_lora(sd_folder, root / "models/Lora/style/inkwash.safetensors")
    (root / "models/Lora/notes.safetensors").write_text("not a model")
    (root / "models/Lora/inkwash.civitai.info").write_text("{}")  # the files A1111 users keep beside: skipped
    vae_file(sd_folder, root / "models/VAE/tiny-vae.safetensors")
    shutil.copytree(sd_folder / "vae", root / "models/VAE/tiny-vae-folder")  # a diffusers VAE folder: loads as is
    controlnet_folder(root / "models/ControlNet/canny")
    a1111_embedding(root / "embeddings/badhands.pt")
    (root / "outputs").mkdir()
    return root


def comfyui_tree(root: Path, sd_folder: Path) -> Path:
    """A ComfyUI root: models/checkpoints, models/loras, models/vae, models/controlnet, models/embeddings."""
    tiny_checkpoint(sd_folder, root / "models/checkpoints/tiny.safetensors")  # clashes with A1111's anime/tiny
    tiny_checkpoint(sd_folder, root / "models/checkpoints/comfy-tiny.safetensors")
    kohya_lora(sd_folder, root / "models/loras/comfy-lora.safetensors", seed=1)
    vae_file(sd_folder, root / "models/vae/tiny-vae.safetensors")  # the same name as A1111's: the first folder wins
    controlnet_folder(root / "models/controlnet/comfy-canny")
    a1111_embedding(root / "models/embeddings/comfy-emb.pt")
    return root


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and mtime: equal before and after means nothing was
    written (no file added, removed, changed or touched, no folder changed)."""
    state = {}
    for folder, folders, files in os.walk(root):
        for name in [*folders, *files, "."]:
            path = Path(folder) / name
            stat = path.stat()
            state[str(path.relative_to(root))] = (stat.st_size if name in files else 0, stat.st_mtime_ns)
    return state
