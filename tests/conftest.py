"""Shared fixtures: tiny models built from configs, saved, and loaded back through the real loading code."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "localhost,127.0.0.1")

import pytest
import torch
from PIL import Image, ImageDraw

from diffusion_studio.builtin.architectures import TinySize, build_sd_pipeline
from diffusion_studio.config import StudioConfig
from diffusion_studio.engine.runner import Engine
from servers import serving

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One data dir for the session, so built-in stand-ins are built once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny SD pipeline (32 px) saved as a diffusers folder, different weights from the built-in stand-in."""
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_sd_pipeline(seed=7, size=TinySize(image_px=32)).save_pretrained(folder)
    return folder


@pytest.fixture
def make_config(data_dir, tmp_path):
    def make(**overrides) -> StudioConfig:
        settings = {"data_dir": data_dir, "models_dir": tmp_path / "models", "preview_interval": 1}
        settings.update(overrides)
        return StudioConfig(**settings)

    return make


@pytest.fixture(scope="session")
def engine(data_dir, tmp_path_factory):
    """A session engine on the built-in stand-ins (64 px, VAE x4): fast enough for every mode on CPU."""
    config = StudioConfig(data_dir=data_dir, models_dir=tmp_path_factory.mktemp("empty-models"),
                          preview_interval=1, max_loaded_models=4)
    return Engine(config)


@pytest.fixture(scope="session")
def shape_image():
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill="red")
    return image


@pytest.fixture(scope="session")
def center_mask():
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((20, 20, 44, 44), fill=255)
    return mask


@pytest.fixture(scope="module")
def server(data_dir, tmp_path_factory):
    from diffusion_studio.server import build_app

    config = StudioConfig(data_dir=data_dir, models_dir=tmp_path_factory.mktemp("no-models"), preview_interval=1)
    app = build_app(config)
    with serving(app) as url:
        yield url, app.state.studio


@pytest.fixture(scope="module")
def client(server):
    """gradio_client on the module's served studio (the UI's public API)."""
    from gradio_client import Client

    return Client(server[0], download_files=False, verbose=False)


@pytest.fixture(scope="module")
def source_png(tmp_path_factory):
    """A red circle on white, 64 px, as a file (what a Gradio image input takes)."""
    path = tmp_path_factory.mktemp("ui") / "source.png"
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill="red")
    image.save(path)
    return path


@pytest.fixture(scope="session")
def full_size_checkpoints(tmp_path_factory):
    """get(variant, dtype="float16", fmt="safetensors") -> Path: a full-size random-weight checkpoint of a shipped
    variant in the original single-file layout (tests/full_size.py), written once per run. SD 1.x/2.x, their
    inpainting files and both ControlNets; the SDXL pipelines (7 GB files) are for bench/models.py only."""
    from full_size import write_checkpoint

    folder = tmp_path_factory.mktemp("full-size")
    built = {}

    def get(variant: str, dtype: str = "float16", fmt: str = "safetensors"):
        if variant in ("xl_base", "xl_inpaint", "xl_refiner"):
            raise ValueError(f"full-size {variant} files are 7 GB: bench/models.py builds them, the tests don't")
        key = (variant, dtype, fmt)
        if key not in built:
            path = folder / f"{variant}-{dtype}.{fmt}"
            built[key] = write_checkpoint(variant, path, getattr(torch, dtype), fmt)
        return built[key]

    return get
