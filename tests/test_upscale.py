"""Upscalers: A1111's names, ESRGAN-family model files through spandrel from every layout's upscaler folder."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_studio.engine import upscale
from diffusion_studio.engine.library import library_for
from diffusion_studio.requests import LATENT_UPSCALERS, PIXEL_UPSCALERS, RequestError


def tiny_esrgan(path, scale=4):
    """A real ESRGAN (RRDBNet, old layout) with 8 filters and one block: spandrel must find its architecture and
    scale from the weights alone."""
    upscale.import_spandrel()  # first: spandrel imports torchvision, which only the studio's import stands in for
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(num_filters=8, num_blocks=1, scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def studio_models(make_config, tmp_path):
    """An A1111 install and a ComfyUI install, each with one upscaler model."""
    a1111, comfy = tmp_path / "webui", tmp_path / "ComfyUI"
    (a1111 / "models" / "Stable-diffusion").mkdir(parents=True)
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    tiny_esrgan(a1111 / "models" / "ESRGAN" / "4x_tiny.pth")
    tiny_esrgan(comfy / "models" / "upscale_models" / "2x_tiny.pth", scale=2)
    return make_config(models_dirs=[a1111, comfy])


def test_spandrel_imports_beside_a_cpu_torch_and_leaves_no_torchvision_behind():
    spandrel = upscale.import_spandrel()
    assert spandrel.__version__ == "0.4.2"
    # The stand-in for the two architectures that need torchvision is gone once spandrel holds its references.
    assert "torchvision" not in sys.modules or hasattr(sys.modules["torchvision"], "__version__")


def test_upscalers_lists_latent_pixel_and_model_files_from_every_layout(studio_models):
    rows = upscale.list_upscalers(studio_models)
    kinds = {row["name"]: row["kind"] for row in rows}
    assert [name for name, kind in kinds.items() if kind == "latent"] == list(LATENT_UPSCALERS)
    assert [name for name, kind in kinds.items() if kind == "pixel"] == list(PIXEL_UPSCALERS)
    assert kinds["4x_tiny"] == "model" and kinds["2x_tiny"] == "model"
    paths = {row["name"]: row["path"] for row in rows}
    assert paths["4x_tiny"] == "models/ESRGAN/4x_tiny.pth"  # relative: the server's paths stay on the server


def test_a_model_file_upscales_by_its_own_factor_then_to_the_size_asked(studio_models):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    path = upscale.resolve_upscaler("4x_tiny", studio_models)
    descriptor = upscale.load_upscaler(path)
    assert descriptor.architecture.name == "ESRGAN" and descriptor.scale == 4
    assert upscale.run_model(descriptor, image, torch.device("cpu")).size == (160, 96)
    assert upscale.upscale_image(image, "4x_tiny", (80, 48), studio_models).size == (80, 48)
    assert upscale.upscale_image(image, "2x_tiny", (80, 48), studio_models).size == (80, 48)
    assert any(row["scale"] == 4 for row in upscale.list_upscalers(studio_models))  # known once loaded


def test_tiles_join_without_visible_seams(studio_models, monkeypatch):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    descriptor = upscale.load_upscaler(upscale.resolve_upscaler("4x_tiny", studio_models))
    whole = np.asarray(upscale.run_model(descriptor, image, torch.device("cpu")), int)
    monkeypatch.setattr(upscale, "TILE", 16)  # nine tiles with 16 px of context each
    tiled = np.asarray(upscale.run_model(descriptor, image, torch.device("cpu")), int)
    assert np.abs(whole - tiled).mean() < 0.5


def test_pixel_upscalers_resize_and_latent_ones_are_refused_for_an_image(make_config):
    config = make_config()
    image = Image.new("RGB", (8, 8), (200, 20, 20))
    image.putpixel((0, 0), (0, 0, 255))
    nearest = upscale.upscale_image(image, "Nearest", (16, 16), config)
    assert nearest.getpixel((1, 1)) == (0, 0, 255) and nearest.getpixel((2, 2)) == (200, 20, 20)
    assert upscale.upscale_image(image, "Lanczos", (24, 20), config).size == (24, 20)
    with pytest.raises(RequestError) as error:
        upscale.upscale_image(image, "Latent", (16, 16), config)
    assert error.value.field == "upscaler" and "latents" in error.value.message
    with pytest.raises(RequestError) as error:
        upscale.upscale_image(image, "4x_missing", (16, 16), config)
    assert "unknown upscaler '4x_missing'" in error.value.message and "Lanczos" in error.value.message


def test_a_file_that_is_not_an_upscaler_is_refused_naming_it(make_config, tmp_path):
    folder = tmp_path / "flat"
    (folder / "upscalers").mkdir(parents=True)
    torch.save({"weight": torch.zeros(3, 3)}, folder / "upscalers" / "notes.pth")
    config = make_config(models_dirs=[folder])
    library_for(config).refresh()
    with pytest.raises(RequestError) as error:
        upscale.upscale_image(Image.new("RGB", (8, 8)), "notes", (16, 16), config)
    assert "'notes.pth' is not an upscaler model spandrel can load" in error.value.message
