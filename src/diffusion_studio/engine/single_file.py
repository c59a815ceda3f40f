"""Single-file checkpoints (A1111/ComfyUI `.safetensors` / weights-only `.ckpt`) loaded offline, in bounded memory.

The configs come from the folder shipped for the file's detected variant (engine/model_configs, or an explicit
config folder), the tokenizers from the shipped CLIP vocabulary; nothing is fetched.

Memory: diffusers' `from_single_file` memory-maps the whole file and converts the whole state dict, so loading an
SD 1.5 fp16 file to fp32 peaked at 1.61x the loaded weights (6.87 GB for 4.27 GB; the mapped file's pages count
too). Here each component is loaded on its own: its tensors are read from the file one by one with plain reads
(no mapping), cast to the target dtype as they arrive, converted by diffusers' own per-component functions
(`from_single_file` of the model class given a state dict, `create_diffusers_clip_model_from_ldm`) into models
built on the meta device, which take the tensors over without a copy. The peak is the loaded weights plus one
tensor and the conversion's few transient copies (OpenCLIP's q/k/v split): 1.12x for that SD 1.5 file, 1.15x for
the same as a `.ckpt` (read through memory maps of ~512 MB slices, each let go once cast).
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTokenizer

from ..requests import ModelLoadError, RequestError
from .identify import (
    FileKind,
    Header,
    dominant_dtype,
    flatten_tensors,
    load_weights_only,
    read_header,
    unwrap_state_dict,
)
from .model_configs import config_folder as shipped_config_folder
from .model_configs.clip_tokenizer import clip_tokenizer

# The pipeline a base loads as: 9-channel inpainting UNets as the family's inpaint pipeline (it feeds them the
# mask and the masked image), the SDXL refiner as img2img (it refines an image; it has no txt2img use).
BASE_PIPELINES = {
    "inpainting": diffusers.StableDiffusionInpaintPipeline,
    "inpainting_v2": diffusers.StableDiffusionInpaintPipeline,
    "xl_base": diffusers.StableDiffusionXLPipeline,
    "xl_refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
    "xl_inpaint": diffusers.StableDiffusionXLInpaintPipeline,
}
UNET_PREFIX, VAE_PREFIXES = "model.diffusion_model.", ("first_stage_model.", "vae.")
# Where each text encoder's tensors sit in the original layout, by component and variant family.
TEXT_PREFIXES = {
    ("text_encoder", "sd"): "cond_stage_model.",
    ("text_encoder", "sdxl"): "conditioner.embedders.0.",
    ("text_encoder_2", "sdxl"): "conditioner.embedders.1.",
    ("text_encoder_2", "xl_refiner"): "conditioner.embedders.0.",
}


class WeightsFile:
    """A checkpoint's tensors, read a few at a time and cast to the target dtype as they are read.

    Safetensors are read with plain reads: a memory map's touched pages count in the process's memory until it is
    closed. `.ckpt` pickles are opened weights-only and memory-mapped once per slice of about `PICKLE_SLICE` bytes,
    and that mapping is let go once its tensors are cast, for the same reason (one mapping for the whole file
    peaked at 1.61x the weights on SD 1.5 fp16 -> fp32)."""

    PICKLE_SLICE = 512 * 1024 * 1024

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header: Header = read_header(self.path)

    @property
    def names(self) -> list[str]:
        return list(self.header.tensors)

    def read(self, names, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        if self.header.offsets is None:
            return self._read_pickle(list(names), dtype)
        with self.path.open("rb", buffering=0) as f:
            return {name: self._read_one(f, name, dtype) for name in names}

    def _read_one(self, f, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        shape, stored = self.header.tensors[name]
        start, end = self.header.offsets[name]
        raw = torch.empty(end - start, dtype=torch.uint8)
        f.seek(self.header.data_start + start)
        if raw.numel() and f.readinto(memoryview(raw.numpy())) != raw.numel():
            raise ModelLoadError(f"'{self.path.name}' is truncated (tensor '{name}')")
        return _cast(raw.view(stored).reshape(shape), dtype)  # the file's copy is freed as soon as it is cast

    def _read_pickle(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        out, position = {}, 0
        while position < len(names):
            mapped = dict(flatten_tensors(unwrap_state_dict(load_weights_only(self.path))))
            taken = 0
            while position < len(names) and taken < self.PICKLE_SLICE:
                tensor = mapped[names[position]]
                out[names[position]] = _cast(tensor, dtype)
                taken += tensor.numel() * tensor.element_size()
                position += 1
            del mapped  # unmaps the slice's pages (tensors kept in the file's dtype stay mapped, as weights)
        return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype else tensor


def configs_for(kind: FileKind, config_folder: Path | None) -> Path:
    if config_folder is not None:
        return Path(config_folder)
    try:
        return shipped_config_folder(kind.variant)
    except KeyError:
        raise RequestError("model", f"the studio ships no configs for '{kind.variant}' files; configure the model "
                                    "with a local diffusers config folder (models.<name>.config)") from None


def configured_kind(path: Path, role: str, family: str | None) -> FileKind:
    """For a file whose header fits no known family but that comes with an explicit config folder (e.g. a small
    model exported to the original layout): what the source says, with the file's dtype."""
    path = Path(path)
    dtype = dominant_dtype(path, read_header(path).tensors)
    return FileKind("controlnet" if role == "controlnet" else "checkpoint", family, None, dtype)


def torch_dtype(kind: FileKind, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype`, or the file's own when None."""
    return dtype if dtype is not None else getattr(torch, kind.dtype)


def load_base(path: Path, kind: FileKind, dtype: torch.dtype | None, config_folder: Path | None = None,
              prediction_type: str | None = None) -> DiffusionPipeline:
    """A checkpoint as the pipeline its variant runs in (see BASE_PIPELINES), component by component.
    `prediction_type` (a configured model's) overrides the scheduler's; with the shipped configs the detected
    one applies (SD 2.x: v-prediction unless the file says it is a 512 base), an explicit folder's stands."""
    folder = configs_for(kind, config_folder)
    dtype = torch_dtype(kind, dtype)
    index = json.loads((folder / "model_index.json").read_text())
    weights = WeightsFile(path)
    names = weights.names
    components: dict = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue
        if spec[0] is None:  # a component this family has not (the refiner's CLIP-L)
            components[name] = None
            continue
        library, class_name = spec
        cls = getattr(importlib.import_module(library), class_name)
        if name == "unet":
            components[name] = _load_model(cls, weights, [n for n in names if n.startswith(UNET_PREFIX)],
                                           folder, name, dtype)
        elif name == "vae":
            vae_names = [n for n in names if n.startswith(VAE_PREFIXES)]
            components[name] = _load_model(cls, weights, vae_names, folder, name, dtype)
        elif name.startswith("text_encoder"):
            components[name] = _load_text_encoder(cls, weights, folder, name, kind, dtype)
        elif name.startswith("tokenizer"):
            components[name] = _tokenizer(folder / name)
        elif name == "scheduler":
            scheduler = cls.from_pretrained(folder, subfolder="scheduler")
            prediction = prediction_type or (kind.prediction if config_folder is None else None)
            if prediction and scheduler.config.get("prediction_type") != prediction:
                scheduler = cls.from_config(scheduler.config, prediction_type=prediction)
            components[name] = scheduler
    pipeline_cls = BASE_PIPELINES.get(kind.variant) or getattr(diffusers, index["_class_name"])
    arguments = {}
    for parameter in inspect.signature(pipeline_cls.__init__).parameters.values():
        if parameter.name in components:
            arguments[parameter.name] = components[parameter.name]
        elif parameter.name in index and not isinstance(index[parameter.name], list):
            arguments[parameter.name] = index[parameter.name]  # e.g. force_zeros_for_empty_prompt
        elif parameter.name in ("safety_checker", "feature_extractor", "image_encoder"):
            arguments[parameter.name] = None
        elif parameter.name == "requires_safety_checker":
            arguments[parameter.name] = False
    return pipeline_cls(**arguments)


def load_controlnet(path: Path, kind: FileKind, dtype: torch.dtype | None,
                    config_folder: Path | None = None) -> ControlNetModel:
    """A ControlNet file (original `control_model.` layout, or diffusers' names in one file)."""
    folder = configs_for(kind, config_folder)
    weights = WeightsFile(path)
    return _load_model(ControlNetModel, weights, weights.names, folder, None, torch_dtype(kind, dtype))


def load_vae(path: str | Path, family: str | None, dtype: torch.dtype | None) -> AutoencoderKL:
    """A VAE file (original `first_stage_model.`/bare layout or diffusers' names) or an AutoencoderKL folder.
    `family` picks the config (SDXL's VAE has the same shapes as SD's but another latent scaling factor)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        return AutoencoderKL.from_pretrained(folder, dtype=dtype)
    weights = WeightsFile(path)
    if dtype is None:
        dtype = getattr(torch, dominant_dtype(path, weights.header.tensors))
    variant = "xl_base" if family == "sdxl" else "v1"
    return _load_model(AutoencoderKL, weights, weights.names, shipped_config_folder(variant), "vae", dtype)


def _load_model(cls, weights: WeightsFile, names: list[str], folder: Path, subfolder: str | None,
                dtype: torch.dtype):
    """One diffusers model from its tensors: diffusers' single-file conversion for `cls`, given a state dict
    holding only this component's tensors (already in `dtype`, so loading takes them over without a copy)."""
    if not names:
        raise RequestError("model", f"'{weights.path.name}' has no {subfolder or cls.__name__} weights")
    state = weights.read(names, dtype)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    model = cls.from_single_file(state, config=str(folder), local_files_only=True, dtype=dtype, **kwargs)
    del state
    _check_complete(model, weights.path, subfolder or cls.__name__)
    return model


def _load_text_encoder(cls, weights: WeightsFile, folder: Path, name: str, kind: FileKind, dtype: torch.dtype):
    prefix = TEXT_PREFIXES.get((name, kind.variant)) or TEXT_PREFIXES.get((name, kind.family or "sd"))
    names = [n for n in weights.names if n.startswith(prefix)] if prefix else []
    if not names:
        raise RequestError("model", f"'{weights.path.name}' has no {name} weights (a checkpoint needs its text "
                                    "encoders)")
    state = weights.read(names, dtype)
    model = create_diffusers_clip_model_from_ldm(cls, checkpoint=state, subfolder=name, config=str(folder),
                                                 torch_dtype=dtype, local_files_only=True)
    del state
    _check_complete(model, weights.path, name)
    return model


def _check_complete(model: torch.nn.Module, path: Path, component: str) -> None:
    """Weights the file lacked stay on the meta device: refuse such a model instead of failing at first use."""
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"'{path.name}' lacks {len(missing)} {component} weights (e.g. '{missing[0]}')")


def _tokenizer(folder: Path) -> CLIPTokenizer:
    """The folder's own vocabulary if it has one (an explicit config folder), else the shipped CLIP files with
    the folder's pad-token setting (OpenCLIP's "!" or CLIP-L's <|endoftext|>)."""
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        tokenizer.model_max_length = min(tokenizer.model_max_length, 77)
        return tokenizer
    settings = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json"
                                                                               ).is_file() else {}
    pad = settings.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return clip_tokenizer("open_clip" if pad == "!" else "clip_l")
