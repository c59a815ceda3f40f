"""Upscaling: A1111's upscaler names, for hires fix and for upscaling one image.

Three kinds, as A1111 has them:
- latent ("Latent", "Latent (bicubic antialiased)", ...): the latents are resized before hires fix's second pass
  (torch's interpolate); only hires fix can use them, as they need the first pass's latents;
- pixel ("None", "Lanczos", "Nearest"): the decoded image is resized;
- model files (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, ... in the models folders' upscaler folder): run through
  spandrel, which detects the architecture from the weights (what InvokeAI and ComfyUI use), then resized to the
  exact size asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import importlib
import sys
import threading
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import StudioConfig
from ..requests import LATENT_UPSCALERS, PIXEL_UPSCALERS, RequestError
from .library import library_for

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

PIXEL_FILTERS = {"None": Image.BICUBIC, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
MAX_LOADED = 2  # upscaler models kept in memory (they are 5-70 MB)
TILE = 512  # model upscalers run on tiles of this many pixels a side (memory stays flat on big images)
TILE_OVERLAP = 16


def is_latent(name: str) -> bool:
    return name in LATENT_UPSCALERS


def upscaler_names(config: StudioConfig) -> list[str]:
    return [row["name"] for row in list_upscalers(config)]


def list_upscalers(config: StudioConfig) -> list[dict]:
    """Every upscaler a request may name, as rows: name, kind (latent | pixel | model), scale (a model's own
    factor, once it has been loaded; None otherwise) and the model file's path relative to its models folder."""
    rows = [{"name": name, "kind": "latent", "scale": None, "path": None} for name in LATENT_UPSCALERS]
    rows += [{"name": name, "kind": "pixel", "scale": None, "path": None} for name in PIXEL_UPSCALERS]
    for entry in library_for(config).entries("upscaler"):
        if entry.usable:
            rows.append({"name": entry.name, "kind": "model", "scale": _known_scales.get(str(entry.path)),
                         "path": entry.relative})
    return rows


def resolve_upscaler(name: str, config: StudioConfig, field: str = "hires.upscaler") -> Path | None:
    """None for a latent or pixel upscaler; the model file for any other name; an unknown name lists them all."""
    if name in LATENT_UPSCALERS or name in PIXEL_UPSCALERS:
        return None
    entry = library_for(config).find("upscaler", name)
    if entry is None:
        raise RequestError(field, f"unknown upscaler '{name}'; choose one of: {', '.join(upscaler_names(config))}")
    return entry.path


def resize_latents(latents: torch.Tensor, name: str, size: tuple[int, int]) -> torch.Tensor:
    """Latents (B, C, h, w) resized to `size` = (width, height) in latent pixels, by the latent upscaler's mode."""
    import torch.nn.functional as F
    mode, antialias = LATENT_UPSCALERS[name]
    align = {} if mode.startswith("nearest") else {"align_corners": False}
    return F.interpolate(latents, size=(size[1], size[0]), mode=mode, antialias=antialias, **align)


def upscale_image(image: Image.Image, name: str, size: tuple[int, int], config: StudioConfig,
                  device: torch.device | None = None, field: str = "upscaler") -> Image.Image:
    """`image` upscaled to `size` = (width, height) by a pixel upscaler or an upscaler model file. A latent name
    is refused here: only hires fix has latents to resize."""
    import torch
    if name in LATENT_UPSCALERS:
        raise RequestError(field, f"'{name}' resizes latents, which only hires fix has; for an image choose "
                                  f"{', '.join(PIXEL_UPSCALERS)} or an upscaler model")
    path = resolve_upscaler(name, config, field)
    image = image.convert("RGB")
    if path is not None:
        image = run_model(load_upscaler(path), image, device or torch.device("cpu"))
    if image.size == size:
        return image
    return image.resize(size, PIXEL_FILTERS.get(name, Image.LANCZOS))


# -- upscaler models, through spandrel ----------------------------------------------------------------------------
_loaded: OrderedDict[tuple[str, int, int], object] = OrderedDict()
_known_scales: dict[str, int] = {}
_lock = threading.Lock()


def load_upscaler(path: Path):
    """The spandrel model in `path`, cached by path, size and mtime (a replaced file loads anew). A file that is
    not an image-to-image model spandrel knows is refused, naming it."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _loaded:
            _loaded.move_to_end(key)
            return _loaded[key]
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader().load_from_file(path)
    except Exception as exc:  # an unknown architecture or unreadable weights: spandrel says which
        raise RequestError("upscaler", f"'{path.name}' is not an upscaler model spandrel can load "
                                       f"({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3:
        raise RequestError("upscaler", f"'{path.name}' is a {getattr(descriptor, 'architecture', '?')} model that "
                                       "does not turn an RGB image into an RGB image")
    descriptor.eval()
    with _lock:
        _loaded[key] = descriptor
        _known_scales[str(path)] = descriptor.scale
        while len(_loaded) > MAX_LOADED:
            _loaded.popitem(last=False)
    return descriptor


def run_model(descriptor, image: Image.Image, device: torch.device) -> Image.Image:
    """The model over the image in overlapping tiles (each tile's border is cropped away before it is pasted, so
    seams don't show); float32 on CPU, the model's own dtype elsewhere."""
    import torch
    scale = descriptor.scale
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    height, width = pixels.shape[-2:]
    out = torch.zeros(1, 3, height * scale, width * scale)
    with _lock:  # one upscale at a time per process: the model's modules move to the device and back
        descriptor.to(device)
        try:
            with torch.inference_mode():
                for top in range(0, height, TILE):
                    for left in range(0, width, TILE):
                        t0, l0 = max(top - TILE_OVERLAP, 0), max(left - TILE_OVERLAP, 0)
                        t1, l1 = min(top + TILE + TILE_OVERLAP, height), min(left + TILE + TILE_OVERLAP, width)
                        result = descriptor(pixels[..., t0:t1, l0:l1].to(device)).float().cpu()
                        h, w = min(TILE, height - top), min(TILE, width - left)
                        dt, dl = (top - t0) * scale, (left - l0) * scale
                        out[..., top * scale:(top + h) * scale, left * scale:(left + w) * scale] = \
                            result[..., dt:dt + h * scale, dl:dl + w * scale]
        finally:
            descriptor.to(torch.device("cpu"))
    array = (out[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def import_spandrel():
    """spandrel, imported so that it works beside a CPU torch. spandrel imports torchvision for two architectures
    the studio never loads (LaMa inpainting, RestoreFormer faces); torchvision's wheels are CUDA builds, so the
    install leaves it out (./studio). When torchvision can't be imported, those two names are given a stand-in
    that says so if it is ever called, and taken away again once spandrel has its references, so no other
    library is misled into thinking torchvision is there. With a working torchvision, the real one is used."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    try:
        importlib.import_module("torchvision.transforms.functional")
        return importlib.import_module("spandrel")
    except ImportError as exc:
        if exc.name == "spandrel":
            raise
    except Exception:  # a RuntimeError from a CUDA torchvision beside a CPU torch
        pass
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]
    stand_in = _torchvision_stand_in()
    sys.modules.update(stand_in)
    try:
        return importlib.import_module("spandrel")
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    def unavailable(*args, **kwargs):
        raise RuntimeError("this spandrel architecture needs torchvision, which is not installed")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", NEAREST="nearest", BICUBIC="bicubic")
    functional.rotate = functional.normalize = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    package.__path__ = []  # a package, so `from torchvision.transforms.functional import ...` resolves
    transforms.__path__ = []
    return {"torchvision": package, "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional}
