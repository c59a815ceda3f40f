"""The built-in models: where their folders are, and untrained stand-ins until trained weights are committed.

A trained built-in lives in `builtin/models/<name>/` (committed safetensors). Until it exists, a stand-in with the
same architecture and random weights is built once into `<data_dir>/builtin-standins/<name>/` and labelled as such
everywhere it is listed, so nobody mistakes noise for a model.

Finding a built-in's folder (`builtin_folder`) never writes anything; the stand-ins are built by an explicit
`ensure_standins(data_dir)` at start-up (the Engine's constructor), or `ensure_builtin(name, data_dir)` for one.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..libraries import import_libraries

COMMITTED_DIR = Path(__file__).parent / "models"
STANDIN_MARKER = "STANDIN.txt"


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    kind: Literal["base", "controlnet"]
    family: Literal["sd", "sdxl"]
    description: str
    base: str | None = None  # for a ControlNet: the built-in base it was made for
    control_type: str | None = None


BUILTINS: dict[str, BuiltinSpec] = {
    spec.name: spec
    for spec in (
        BuiltinSpec("shapes", "base", "sd", "SD architecture, 64 px shapes world; the default model"),
        BuiltinSpec("shapes-xl", "base", "sdxl", "SDXL architecture (two text encoders), 64 px shapes world"),
        BuiltinSpec("shapes-canny", "controlnet", "sd", "canny ControlNet for builtin:shapes", "shapes", "canny"),
        BuiltinSpec("shapes-inpaint", "controlnet", "sd", "inpainting ControlNet for builtin:shapes", "shapes",
                    "inpaint"),
        BuiltinSpec("shapes-xl-canny", "controlnet", "sdxl", "canny ControlNet for builtin:shapes-xl", "shapes-xl",
                    "canny"),
    )
}

_build_lock = threading.RLock()  # a ControlNet stand-in builds its base first


def builtin_controlnet_for(base_name: str, control_type: str) -> str | None:
    """The built-in ControlNet matching a built-in base and control type, if there is one."""
    for spec in BUILTINS.values():
        if spec.kind == "controlnet" and spec.base == base_name and spec.control_type == control_type:
            return spec.name
    return None


def is_trained(name: str) -> bool:
    """Whether built-in `name` has committed trained weights (else it is served by a stand-in)."""
    return (COMMITTED_DIR / name).is_dir()


def is_standin(folder: Path) -> bool:
    return (folder / STANDIN_MARKER).exists()


def builtin_folder(name: str, data_dir: Path) -> Path:
    """Where built-in `name` lives: its committed weights if present, else its stand-in's place under `data_dir`
    (which exists once `ensure_builtin` / `ensure_standins` has run). Reads nothing, writes nothing."""
    if name not in BUILTINS:
        raise KeyError(f"unknown built-in model '{name}'; built-ins are: {', '.join(BUILTINS)}")
    if is_trained(name):
        return COMMITTED_DIR / name
    return Path(data_dir) / "builtin-standins" / name


def ensure_builtin(name: str, data_dir: Path) -> Path:
    """Built-in `name`'s folder, building its stand-in first if it has no trained weights and none is built yet."""
    target = builtin_folder(name, data_dir)
    if not is_trained(name):
        with _build_lock:
            if not target.is_dir():
                _build_standin(BUILTINS[name], target, data_dir)
    return target


def ensure_standins(data_dir: Path) -> list[str]:
    """Build every missing stand-in (once per data dir; later calls only check folders). Returns what it built."""
    built = []
    for name in BUILTINS:
        if not is_trained(name) and not builtin_folder(name, data_dir).is_dir():
            ensure_builtin(name, data_dir)
            built.append(name)
    return built


def _build_standin(spec: BuiltinSpec, target: Path, data_dir: Path) -> None:
    # Only here: naming and finding built-ins must not import diffusers (seconds, on every start of the studio).
    import_libraries()  # one importer at a time (engine/__init__.py)
    from diffusers import UNet2DConditionModel

    from .architectures import TinySize, build_controlnet, build_sd_pipeline, build_sdxl_pipeline

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written model that looks complete.
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        if spec.kind == "base":
            builder = build_sd_pipeline if spec.family == "sd" else build_sdxl_pipeline
            builder(seed=0).save_pretrained(scratch, safe_serialization=True)
        else:
            base_unet = UNet2DConditionModel.from_pretrained(ensure_builtin(spec.base, data_dir), subfolder="unet")
            build_controlnet(base_unet, TinySize().vae_factor, seed=1).save_pretrained(scratch)
        (scratch / STANDIN_MARKER).write_text(
            f"Untrained stand-in for builtin:{spec.name} ({spec.description}): random weights, same architecture.\n"
        )
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
