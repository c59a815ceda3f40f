"""The tiny preview decoder: found only for the built-ins' VAE, full-size output, closer to the real decode than the
linear map on real mid-run latents, deterministic from several threads at once."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image

from diffusion_studio.builtin.architectures import TinySize, _vae
from diffusion_studio.builtin.catalog import COMMITTED_DIR
from diffusion_studio.builtin.preview_decoder import DECODER_FILE, TinyPreviewDecoder, load_decoder
from diffusion_studio.engine.preview import latents_to_image, latents_to_preview, preview_decoder, preview_map


@pytest.fixture(scope="module")
def shapes():
    pipe = StableDiffusionPipeline.from_pretrained(COMMITTED_DIR / "shapes")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def real_decode(vae, latents) -> np.ndarray:
    with torch.no_grad():
        rgb = vae.decode(latents[:1] / vae.config.scaling_factor).sample[0].clamp(-1, 1)
    return ((rgb + 1) * 127.5).round().permute(1, 2, 0).numpy()


def mean_abs_error(preview: Image.Image, reference: np.ndarray) -> float:
    scaled = preview.resize(reference.shape[:2][::-1], Image.BILINEAR)
    return float(np.abs(np.asarray(scaled, dtype=np.float64) - reference).mean())


def test_weights_file_is_small_and_loads():
    assert DECODER_FILE.is_file() and DECODER_FILE.stat().st_size < 1_000_000
    decoder, metadata = load_decoder()
    assert isinstance(decoder, TinyPreviewDecoder) and not decoder.training
    assert 1_000 < sum(p.numel() for p in decoder.parameters()) < 300_000
    assert metadata["vae"]["config"]["latent_channels"] == 4


def test_found_for_the_builtins_vae_even_in_half_precision():
    for name in ("shapes", "shapes-xl"):  # the two built-in bases share one VAE
        vae = AutoencoderKL.from_pretrained(COMMITTED_DIR / name, subfolder="vae")
        assert isinstance(preview_decoder(vae), TinyPreviewDecoder), name
    assert preview_decoder(vae.to(torch.float16)) is not None


def test_not_found_for_another_config_or_other_weights():
    other_config = _vae(TinySize())  # the test models' VAE: other widths
    assert preview_decoder(other_config) is None
    same_config = AutoencoderKL.from_config(AutoencoderKL.load_config(COMMITTED_DIR / "shapes", subfolder="vae"))
    assert preview_decoder(same_config) is None  # same name and config, untrained weights


def test_closer_to_the_real_decode_than_the_linear_map_mid_run(shapes):
    decoder, mapping = preview_decoder(shapes.vae), preview_map(shapes.vae)
    prompts = ["a red circle on a white background", "a blue square on a black background at the top left",
               "a yellow star on a gray background"]
    for seed, prompt in enumerate(prompts):
        kept = {}

        def keep(pipeline, step, timestep, kwargs):
            kept[step + 1] = kwargs["latents"].clone()
            return kwargs

        shapes(prompt, height=64, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
               callback_on_step_end=keep, output_type="latent")
        for step in (2, 4):
            reference = real_decode(shapes.vae, kept[step])
            tiny = latents_to_image(kept[step], decoder)
            assert tiny.size == (64, 64)
            tiny_error = mean_abs_error(tiny, reference)
            linear_error = mean_abs_error(latents_to_preview(kept[step], mapping), reference)
            assert tiny_error < 0.8 * linear_error, (prompt, step, tiny_error, linear_error)


def test_decoding_is_deterministic_from_several_threads(shapes):
    decoder = preview_decoder(shapes.vae)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    first = np.asarray(latents_to_image(latents, decoder))
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda _: np.asarray(latents_to_image(latents, decoder)), range(16)))
    assert all(np.array_equal(first, image) for image in images)
    assert first.shape == (64, 64, 3) and first.std() > 0
    assert latents_to_image(torch.zeros(1, 4, 32, 20), decoder).size == (80, 128)  # any size: hires fix's pass
