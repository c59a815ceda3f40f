"""Model names -> where the weights are: `builtin:<name>`, a configured name, a local diffusers folder, a single
`.safetensors`/`.ckpt` file, a name found in the models folder, or a Hugging Face hub id.

Resolution only reads small JSON files and never writes (built-in stand-ins are built at start-up, see
builtin/catalog.py's `ensure_standins`); loading the weights is the PipelineManager's job.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..builtin.catalog import BUILTINS, COMMITTED_DIR, builtin_folder, is_trained
from ..config import StudioConfig
from ..requests import RequestError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model. `compute_identity()` changes when the weights do (cache keys, history)."""

    name: str  # what the user typed, canonical for built-ins
    kind: Literal["builtin", "folder", "single_file", "hub"]
    location: str  # folder, file path or hub id
    role: Literal["base", "controlnet", "estimator"]  # estimator: a depth / pose model for control maps
    family: Literal["sd", "sdxl"] | None  # None: known only once loaded (hub ids)
    config_folder: Path | None = None  # single files: the local diffusers folder giving the configs
    standin: bool = False

    def compute_identity(self) -> str:
        """Name + a digest of the weight files' sizes and mtimes. Walks and stats the folder, so it is computed
        once per load (the PipelineManager records it on the loaded model; `Engine.weights_identity` reads that)."""
        if self.kind == "hub":
            return f"hub:{self.location}"
        path = Path(self.location)
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.suffix in
                       (".safetensors", ".ckpt", ".bin", ".json"))
        stamp = hashlib.sha256("".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files).encode())
        return f"{self.name}@{stamp.hexdigest()[:12]}"


def resolve(name: str, config: StudioConfig) -> ModelSource:
    """Find the model called `name`; unknown names get an error listing what exists."""
    if name.startswith("builtin:"):
        short = name.removeprefix("builtin:")
        if short not in BUILTINS:
            raise RequestError("model", f"unknown built-in '{short}'; built-ins: {', '.join(BUILTINS)}")
        spec = BUILTINS[short]
        folder = builtin_folder(short, config.data_dir)
        return ModelSource(name, "builtin", str(folder), spec.kind, spec.family, standin=not is_trained(short))
    if name in config.models:
        entry = config.models[name]
        source = _resolve_location(entry.source, config, entry.config)
        return ModelSource(name, source.kind, source.location, source.role, source.family, source.config_folder)
    return _resolve_location(name, config, None)


def _resolve_location(text: str, config: StudioConfig, config_folder: str | None) -> ModelSource:
    path = Path(text).expanduser()
    if not path.exists() and not path.is_absolute():
        in_models_dir = Path(config.models_dir) / text
        path = in_models_dir if in_models_dir.exists() else path
    if path.is_dir():
        return _folder_source(text, path)
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise RequestError("model", f"'{text}' is a file but not a .safetensors or .ckpt checkpoint")
        configs = _config_folder_for(path, config_folder)
        folder_source = _folder_source(text, configs)
        return ModelSource(text, "single_file", str(path), folder_source.role, folder_source.family, configs)
    if HUB_ID.match(text):
        return ModelSource(text, "hub", text, "base", None)
    raise RequestError(
        "model",
        f"'{text}' is not a built-in (builtin:{', builtin:'.join(BUILTINS)}), a configured model, a folder, "
        "a checkpoint file or a hub id like 'org/name'",
    )


def _folder_source(text: str, folder: Path) -> ModelSource:
    if (folder / "model_index.json").is_file():
        index = json.loads((folder / "model_index.json").read_text())
        family = "sdxl" if "XL" in index.get("_class_name", "") or "text_encoder_2" in index else "sd"
        return ModelSource(text, "folder", str(folder), "base", family)
    if (folder / "config.json").is_file():
        model_config = json.loads((folder / "config.json").read_text())
        if model_config.get("_class_name") == "ControlNetModel":
            family = "sdxl" if model_config.get("addition_embed_type") == "text_time" else "sd"
            return ModelSource(text, "folder", str(folder), "controlnet", family)
    raise RequestError("model", f"folder '{folder}' is not a diffusers pipeline (no model_index.json) or ControlNet")


def _config_folder_for(checkpoint: Path, configured: str | None) -> Path:
    """Single-file checkpoints need local configs (else diffusers fetches them from the hub)."""
    candidates = [Path(configured)] if configured else [checkpoint.with_suffix(""), checkpoint.parent / "config"]
    for folder in candidates:
        if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
            return folder
    raise RequestError(
        "model",
        f"single-file checkpoint '{checkpoint.name}' needs a local diffusers config folder: configure "
        f"models.<name>.config, or put one at '{checkpoint.with_suffix('')}'",
    )


def list_models(config: StudioConfig) -> list[dict]:
    """Built-ins first, then configured models, then what the models folder holds."""
    rows = []
    for spec in BUILTINS.values():
        rows.append({"name": f"builtin:{spec.name}", "role": spec.kind, "family": spec.family,
                     "origin": builtin_origin(spec.name), "description": spec.description})
    for name, entry in config.models.items():
        rows.append({"name": name, "role": entry.kind, "family": None, "origin": "configured",
                     "description": entry.source})
    models_dir = Path(config.models_dir)
    if models_dir.is_dir():
        for path in sorted(models_dir.iterdir()):
            if (path.is_dir() and ((path / "model_index.json").exists() or (path / "config.json").exists())) or (
                path.suffix in CHECKPOINT_SUFFIXES
            ):
                try:
                    source = _resolve_location(str(path), config, None)
                except RequestError as exc:
                    rows.append({"name": path.name, "role": "?", "family": None, "origin": "models folder",
                                 "description": f"unusable: {exc.message}"})
                    continue
                rows.append({"name": path.name, "role": source.role, "family": source.family,
                             "origin": "models folder", "description": str(path)})
    return rows


def builtin_origin(short: str) -> str:
    """'built-in', or what is still missing: untrained stand-in, or trained only part of the way."""
    folder = COMMITTED_DIR / short
    if not folder.is_dir():
        return "built-in (untrained stand-in)"
    progress_file = folder / "training.json"
    if progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        if not progress.get("finished", True):
            return f"built-in (partly trained: {progress.get('unet_step', '?')} steps)"
    return "built-in"


def list_loras(config: StudioConfig) -> list[str]:
    """LoRA names that `resolve_lora` finds by name (trained ones land in <data_dir>/loras)."""
    names = set()
    for root in (Path(config.data_dir) / "loras", Path(config.models_dir) / "loras"):
        if root.is_dir():
            names |= {path.stem for path in root.glob("*.safetensors")}
            names |= {path.name for path in root.iterdir() if path.is_dir() and any(path.glob("*.safetensors"))}
    return sorted(names)


def resolve_lora(name: str, config: StudioConfig) -> Path:
    """A LoRA by path, or by name in `<data_dir>/loras` / `<models_dir>/loras` (trained LoRAs land there)."""
    candidates = [Path(name).expanduser()]
    for root in (Path(config.data_dir) / "loras", Path(config.models_dir) / "loras"):
        candidates += [root / name, root / f"{name}.safetensors"]
    for path in candidates:
        if path.is_file() and path.suffix == ".safetensors":
            return path
        if path.is_dir() and any(path.glob("*.safetensors")):
            return path
    raise RequestError("loras", f"LoRA '{name}' not found (a .safetensors file, or a name in <data_dir>/loras)")
