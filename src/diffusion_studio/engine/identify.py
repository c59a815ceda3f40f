"""What a model file is, from its header alone: checkpoint (and which SD family), ControlNet, LoRA, embedding or VAE.

Only the tensors' names, shapes and dtypes are read (a `.safetensors` header is JSON after an 8-byte length; a
`.ckpt` is a weights-only pickle opened with `mmap`, so no tensor is read), which keeps a folder of files cheap to
list. The checkpoint family is diffusers' own detection (`infer_diffusers_model_type`), fed meta tensors of the
file's shapes so it costs no memory.

SD 2.x 512 (epsilon) and 768 (v-prediction) UNets have the same shapes, so nothing in the weights tells them apart.
We do as diffusers does (`_legacy_load_scheduler`): v-prediction unless the file records `global_step` 875000,
the step count of Stability's 512 base checkpoints; a configured model can say otherwise (`prediction_type`).
"""

from __future__ import annotations

import functools
import json
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal


from . import import_libraries
from ..requests import RequestError

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

Kind = Literal["checkpoint", "controlnet", "lora", "embedding", "vae"]
Family = Literal["sd", "sdxl"]

# safetensors' dtype names -> torch dtypes, and the dtypes a model loads in: made on first use (torch is imported
# by the first file identified, not with this module, so the server's start doesn't wait for it).
@functools.cache
def safetensors_dtypes() -> dict:
    import torch

    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
            "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@functools.cache
def loadable_dtypes() -> dict:
    import torch

    return {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
SD2_BASE_GLOBAL_STEP = 875000  # diffusers: Stability's SD 2.x 512-base checkpoints record this step

# diffusers' model types the studio loads, and what they are.
CHECKPOINT_VARIANTS: dict[str, tuple[Family, bool]] = {  # variant -> (family, 9-channel inpainting)
    "v1": ("sd", False), "v2": ("sd", False), "v2_base": ("sd", False), "inpainting": ("sd", True),
    "inpainting_v2": ("sd", True), "xl_base": ("sdxl", False), "xl_refiner": ("sdxl", False),
    "xl_inpaint": ("sdxl", True),
}
CONTROLNET_VARIANTS: dict[str, Family] = {
    "controlnet": "sd", "controlnet_xl": "sdxl", "controlnet_xl_large": "sdxl", "controlnet_xl_mid": "sdxl",
    "controlnet_xl_small": "sdxl",
}
FOREIGN_FAMILIES = {  # diffusers' model-type prefix -> what to call it
    "flux": "Flux", "chroma": "Chroma", "sd3": "SD3", "sd35": "SD3.5", "playground": "Playground v2.5",
    "stable_cascade": "Stable Cascade", "upscale": "the SD x4 upscaler", "instruct-pix2pix": "InstructPix2Pix",
    "animatediff": "AnimateDiff", "auraflow": "AuraFlow", "ltx": "LTX-Video", "autoencoder-dc": "a DC-AE autoencoder",
    "mochi": "Mochi", "hunyuan": "HunyuanVideo", "lumina": "Lumina", "sana": "Sana", "wan": "Wan",
    "hidream": "HiDream", "cosmos": "Cosmos", "z-image": "Z-Image", "qwen": "Qwen-Image", "krea": "Krea",
    "minimax": "MiniMax",
}
# Where each kind belongs in the studio's models folder, and how it is used.
PLACES = {
    "checkpoint": "put it in the models folder and choose it as the model",
    "controlnet": "put it in controlnet/ and choose it as the ControlNet",
    "lora": "put it in loras/ and use <lora:{stem}:1> in the prompt",
    "embedding": "put it in embeddings/ and write '{stem}' in the prompt",
    "vae": "put it in vae/ and choose it as the VAE",
}
NAMES = {"checkpoint": "a checkpoint", "controlnet": "a ControlNet", "lora": "a LoRA",
         "embedding": "a textual-inversion embedding", "vae": "a VAE"}


@dataclass(frozen=True)
class FileKind:
    kind: Kind
    family: Family | None  # None where the file can't tell (VAEs: SD and SDXL VAEs have one architecture)
    variant: str | None  # diffusers' model type for checkpoints and ControlNets ("v1", "xl_base", ...)
    dtype: str  # "float16" | "bfloat16" | "float32": the file's dominant floating dtype, by bytes
    prediction: str | None = None  # bases: "epsilon" | "v_prediction"
    inpainting: bool = False  # 9-channel UNet
    lora_format: str | None = None  # "kohya" | "diffusers" | "peft" | "loha" | "lokr"

    def describe(self) -> str:
        """'a LoRA (kohya format, SD 1.x)': what the file is, for messages."""
        details = []
        if self.lora_format:
            details.append(f"{self.lora_format} format")
        if self.variant:
            details.append(self.variant)
        if self.family:
            details.append("SDXL" if self.family == "sdxl" else "SD 1.x/2.x" if self.kind == "vae" else
                           "SD 2.x" if (self.variant or "").startswith(("v2", "inpainting_v2")) else "SD 1.x")
        return NAMES[self.kind] + (f" ({', '.join(details)})" if details else "")


def identify_file(path: Path) -> FileKind:
    """What `path` holds, from its header; `RequestError("model", ...)` naming what it looks like otherwise."""
    path = Path(path)
    header = read_header(path)
    if not header.tensors:
        raise RequestError("model", f"'{path.name}' is not a model file (no tensors)")
    return classify(path, header)


def expect_kind(path: Path, kinds: set[str] | frozenset[str], field: str = "model") -> FileKind:
    """`identify_file`, refusing any kind not in `kinds` with where that file belongs instead."""
    found = identify_file(path)
    if found.kind not in kinds:
        raise RequestError(field, misplaced_message(path, found))
    return found


def misplaced_message(path: Path, found: FileKind) -> str:
    path = Path(path)
    return f"'{path.name}' looks like {found.describe()}: {PLACES[found.kind].format(stem=path.stem)}"


# -- reading headers ----------------------------------------------------------------------------------------------

@dataclass
class Header:
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # flattened name -> (shape, dtype)
    global_step: int | None = None
    data_start: int = 0  # safetensors: where the data begins, and each tensor's byte range after that
    offsets: dict[str, tuple[int, int]] | None = None


def read_header(path: Path) -> Header:
    if path.suffix == ".safetensors":
        return _safetensors_header(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _pickle_header(path)
    raise RequestError("model", f"'{path.name}' is not a .safetensors, .ckpt, .pt or .bin file")


def _safetensors_header(path: Path) -> Header:
    import torch
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise RequestError("model", f"'{path.name}' is not a model file (empty or too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise RequestError("model", f"'{path.name}' is not a safetensors file (no valid header) or is truncated")
        raw = f.read(length)
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError("model", f"'{path.name}' is not a safetensors file (its header is not JSON)") from None
    if not isinstance(entries, dict):
        raise RequestError("model", f"'{path.name}' is not a safetensors file (its header is not a JSON object)")
    metadata = entries.pop("__metadata__", None) or {}
    try:
        tensors = {name: (tuple(entry["shape"]), safetensors_dtypes().get(entry["dtype"], torch.uint8))
                   for name, entry in entries.items()}
        end = max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        raise RequestError("model", f"'{path.name}' is not a safetensors file (a header entry is malformed)") from None
    if 8 + length + end > size:
        raise RequestError("model", f"'{path.name}' is truncated: its header describes {8 + length + end:,} bytes, "
                                    f"the file has {size:,}")
    step = None
    if isinstance(metadata, dict) and str(metadata.get("global_step", "")).isdigit():
        step = int(metadata["global_step"])
    elif "global_step" in tensors:  # a scalar tensor in some converted files: read those few bytes only
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            step = int(f.get_tensor("global_step").reshape(-1)[0])
    offsets = {name: tuple(entry["data_offsets"]) for name, entry in entries.items()}
    return Header(tensors, step, 8 + length, offsets)


def load_weights_only(path: Path):
    """A `.ckpt`/`.pt`/`.bin` pickle, tensors memory-mapped where the format allows; a pickle that needs code to
    load is refused (only weights-only pickles are loaded)."""
    import torch
    try:
        try:
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            return torch.load(path, weights_only=True, map_location="cpu")  # pre-1.6 format: no mmap possible
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) or "Unsupported" in str(exc) or "global" in str(exc).lower():
            raise RequestError(
                "model", f"'{path.name}' is a pickle that needs code to load (only weights-only pickles are "
                         "loaded); convert it to .safetensors") from None
        raise RequestError("model", f"'{path.name}' is not a model file (not a readable pickle)") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
        raise RequestError("model", f"'{path.name}' is not a readable weights file (truncated or damaged: "
                                    f"{type(exc).__name__})") from None


def _pickle_header(path: Path) -> Header:
    loaded = load_weights_only(path)
    if not isinstance(loaded, Mapping):
        raise RequestError("model", f"'{path.name}' is not a model file (a pickle of {type(loaded).__name__})")
    step = loaded.get("global_step")
    tensors = {name: (tuple(t.shape), t.dtype) for name, t in flatten_tensors(unwrap_state_dict(loaded))}
    return Header(tensors, step if isinstance(step, int) else None)


def unwrap_state_dict(loaded: Mapping) -> Mapping:
    """A1111/LDM `.ckpt` files nest the weights under `state_dict` (sometimes more than once)."""
    while isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    return loaded


def flatten_tensors(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of nested dicts as dotted names (A1111 embeddings keep theirs under `string_to_param`)."""
    import torch
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            yield prefix + str(key), value
        elif isinstance(value, Mapping):
            yield from flatten_tensors(value, f"{prefix}{key}.")


class MetaTensors(Mapping):
    """The file's tensors as meta tensors, each made only when diffusers' detection looks at it."""

    def __init__(self, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self._tensors = tensors

    def __getitem__(self, key):
        import torch
        shape, dtype = self._tensors[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def __contains__(self, key):
        return key in self._tensors


# -- classifying ---------------------------------------------------------------------------------------------------

def classify(path: Path, header: Header) -> FileKind:
    tensors = header.tensors
    dtype = dominant_dtype(path, tensors)
    names = list(tensors)
    joined = "\n" + "\n".join(names)
    if ("lora" in joined or "hada_" in joined or "lokr_" in joined) and LORA_NAMES.search(joined):
        return _lora(tensors, dtype)
    if embedding := _embedding(tensors, dtype):
        return embedding
    has_unet = "\nmodel.diffusion_model." in joined
    if not has_unet and (vae := _vae(names, dtype)):
        return vae
    if any(name.startswith(("control_model.", "input_hint_block.", "controlnet_cond_embedding.")) for name in names):
        return _controlnet(tensors, dtype)
    try:
        model_type = diffusers_model_type(tensors)
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError):  # a known key with a shape no model has
        raise RequestError("model", f"'{path.name}' names the tensors of a checkpoint but their shapes fit no "
                                    "known model (damaged or unusual)") from None
    if model_type == "v1" and not has_v1_key(tensors):
        model_type = None  # diffusers' fallback, not a match
    if model_type in CONTROLNET_VARIANTS:
        return _controlnet(tensors, dtype)
    if model_type in CHECKPOINT_VARIANTS:
        prediction = "epsilon"
        if model_type == "v2":
            if header.global_step == SD2_BASE_GLOBAL_STEP:
                model_type = "v2_base"
            else:
                prediction = "v_prediction"
        family, inpainting = CHECKPOINT_VARIANTS[model_type]
        return FileKind("checkpoint", family, model_type, dtype, prediction, inpainting)
    if model_type is not None:
        foreign = next((label for prefix, label in FOREIGN_FAMILIES.items() if model_type.startswith(prefix)),
                       model_type)
        raise RequestError("model", f"'{path.name}' is a checkpoint of a family the studio can't load (looks like "
                                    f"{foreign}); it loads SD 1.x, SD 2.x and SDXL checkpoints")
    if has_unet:
        raise RequestError("model", f"'{path.name}' has a UNet of an architecture the studio doesn't know; it loads "
                                    "SD 1.x, SD 2.x and SDXL checkpoints")
    if any(name.startswith(("down_blocks.", "conv_in.", "time_embedding.")) for name in names):
        raise RequestError("model", f"'{path.name}' looks like a bare UNet in diffusers' layout: the studio loads "
                                    "whole checkpoints (UNet, VAE and text encoders) or diffusers folders")
    if any(name.startswith(("text_model.", "cond_stage_model.", "conditioner.")) for name in names):
        raise RequestError("model", f"'{path.name}' looks like a text encoder alone, not a model the studio loads")
    raise RequestError("model", f"'{path.name}' is not a model the studio knows ({len(names)} tensors, none named "
                                "like a checkpoint, ControlNet, LoRA, embedding or VAE)")


def dominant_dtype(path: Path, tensors) -> str:
    import torch
    bytes_by_dtype: dict[torch.dtype, int] = {}
    for shape, dtype in tensors.values():
        bytes_by_dtype[dtype] = bytes_by_dtype.get(dtype, 0) + math.prod(shape) * dtype.itemsize
    bytes_by_dtype = {dtype: n for dtype, n in bytes_by_dtype.items() if dtype.is_floating_point}
    if not bytes_by_dtype:
        raise RequestError("model", f"'{path.name}' is not a model file (no floating-point tensors)")
    dominant = max(bytes_by_dtype, key=bytes_by_dtype.get)
    if dominant not in loadable_dtypes():
        raise RequestError("model", f"'{path.name}' holds {str(dominant).removeprefix('torch.')} weights; the "
                                    "studio loads float16, bfloat16 and float32 files")
    return loadable_dtypes()[dominant]


# One pass over all names at once (a per-name loop costs milliseconds on a checkpoint's 1,000-2,500 names).
LORA_NAMES = re.compile(r"^lora_(unet|te[12]?)_|\.(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up)\.|"
                        r"\.(hada_w[12]_[ab]|lokr_w[12])", re.MULTILINE)


def _lora(tensors, dtype: str) -> FileKind:
    names = list(tensors)
    if any(".hada_w1_a" in name for name in names):
        lora_format = "loha"
    elif any(".lokr_w" in name for name in names):
        lora_format = "lokr"
    elif any(name.startswith(("lora_unet_", "lora_te")) for name in names):
        lora_format = "kohya"
    elif any(".lora.down." in name or name.startswith(("unet.", "text_encoder.", "text_encoder_2."))
             for name in names):
        lora_format = "diffusers"
    else:
        lora_format = "peft"
    return FileKind("lora", _lora_family(tensors), None, dtype, lora_format=lora_format)


def _lora_family(tensors) -> Family | None:
    """SDXL by its text-encoder names (kohya's te1/te2) or the cross-attention context width (2048; SD 1.x: 768,
    SD 2.x: 1024) read from a to_k/to_v down matrix."""
    names = list(tensors)
    if any(name.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for name in names):
        return "sdxl"
    for name in names:
        if "attn2" in name and ("to_k" in name or "to_v" in name):
            shape = tensors[name][0]
            if any(marker in name for marker in (".lora_down.", ".lora_A.", ".lora.down.", ".hada_w1_b",
                                                 ".hada_w2_b")) and len(shape) == 2:
                return "sdxl" if shape[1] == 2048 else "sd"
    if any(name.startswith("lora_te_") for name in names):
        return "sd"
    return None


def _embedding(tensors, dtype: str) -> FileKind | None:
    names = set(tensors)
    if {"clip_l", "clip_g"} <= names:
        return FileKind("embedding", "sdxl", None, dtype)
    vectors = [tensors[n][0] for n in names if n.startswith("string_to_param.") or n == "emb_params"]
    if not vectors and len(names) <= 2 and all(len(tensors[n][0]) in (1, 2) and tensors[n][0][-1] in
                                               (768, 1024, 1280) and "." not in n for n in names):
        vectors = [tensors[n][0] for n in names]  # diffusers' learned_embeds.bin: {"<token>": vector}
    if not vectors:
        return None
    width = vectors[0][-1]
    return FileKind("embedding", "sd" if width in (768, 1024) else "sdxl" if width == 1280 else None, None, dtype)


def _vae(names: list[str], dtype: str) -> FileKind | None:
    """Encoder and decoder and nothing else (a VAE's own file, bare or under first_stage_model.)."""
    bare = [name.removeprefix("first_stage_model.") for name in names]
    vae_parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.")
    if (any(name.startswith("encoder.") for name in bare) and any(name.startswith("decoder.") for name in bare)
            and all(name.startswith(vae_parts) or name in ("model_ema.decay", "model_ema.num_updates")
                    for name in bare)):
        return FileKind("vae", None, None, dtype)
    return None


def diffusers_model_type(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str | None:
    """diffusers' own detection of a checkpoint's family from its tensors' names and shapes. Imported on the first
    checkpoint to identify, not with this module: diffusers' single-file loader takes seconds to import, and a
    studio listing no checkpoint files never needs it."""
    import_libraries()  # one importer at a time (engine/__init__.py)
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    return infer_diffusers_model_type(MetaTensors(tensors))


def has_v1_key(tensors: Mapping) -> bool:
    """Whether the tensors hold the key diffusers checks for SD 1.x (its fallback type when nothing matches)."""
    import_libraries()  # one importer at a time (engine/__init__.py)
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    return CHECKPOINT_KEY_NAMES["v1"] in tensors


def _controlnet(tensors, dtype: str) -> FileKind:
    """Original-layout ControlNets (`control_model.` or bare `input_hint_block.`: SDXL ones have `label_emb`) and
    diffusers-layout ones (diffusers' own names: controlnet_xl_large/mid/small)."""
    names = list(tensors)
    if any(name.startswith("controlnet_cond_embedding.") for name in names):
        model_type = diffusers_model_type(tensors)
        if model_type not in CONTROLNET_VARIANTS:
            model_type = "controlnet"
    elif any(name.removeprefix("control_model.").startswith("label_emb.") for name in names):
        model_type = "controlnet_xl"
    else:
        model_type = "controlnet"
    return FileKind("controlnet", CONTROLNET_VARIANTS[model_type], model_type, dtype)
