"""Textual-inversion embeddings as A1111 users have them (.pt string_to_param, .safetensors emb_params, SDXL
clip_l/clip_g), used when the prompt names them; and a per-request VAE. Loading an embedding must not change what
prompts that don't name it encode to."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusion_studio.config import StudioConfig
from diffusion_studio.engine.runner import Engine
from diffusion_studio.requests import GenerationRequest, RequestError

SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 5}
WIDTH = 64  # the built-ins' text encoders are 64 wide (SDXL: 64 + 64)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding-models")
    embeddings = folder / "embeddings"
    embeddings.mkdir()
    generator = torch.Generator().manual_seed(0)
    vectors = lambda n, width=WIDTH: torch.randn(n, width, generator=generator)  # noqa: E731
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors(3))},
                "name": "shinystyle", "step": 100}, embeddings / "shinystyle.pt")
    save_file({"emb_params": vectors(1)}, str(embeddings / "flatlook.safetensors"))
    save_file({"clip_l": vectors(2), "clip_g": vectors(2)}, str(embeddings / "xlstyle.safetensors"))
    return folder


@pytest.fixture(scope="module")
def ti_engine(data_dir, models_dir):
    return Engine(StudioConfig(data_dir=data_dir, models_dir=models_dir, max_loaded_models=4))


def pixels(engine, **fields) -> np.ndarray:
    return np.asarray(engine.run(GenerationRequest(**{**SMALL, **fields})).images[0]).astype(np.int16)


def embeddings_of(engine, model: str, prompt: str) -> torch.Tensor:
    with engine.manager.use(model) as (base, _), torch.inference_mode():
        return base.pipeline.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)[0].clone()


@pytest.mark.parametrize("model,name", [("builtin:shapes", "shinystyle"), ("builtin:shapes", "flatlook"),
                                        ("builtin:shapes-xl", "xlstyle")])
def test_an_embedding_changes_prompts_that_name_it_and_no_other(ti_engine, model, name):
    other = "a red circle on white"
    before_image = pixels(ti_engine, model=model, prompt=other)
    before = embeddings_of(ti_engine, model, other)
    longer_word = f"a red circle, {name}x"  # contains the name, but not as a word: A1111 doesn't use it either
    longer_before = embeddings_of(ti_engine, model, longer_word)
    named = pixels(ti_engine, model=model, prompt=f"a red circle, {name}")  # loads it
    assert not np.array_equal(named, pixels(ti_engine, model=model, prompt=longer_word))
    with ti_engine.manager.use(model) as (base, _):
        assert name in base.pipeline.tokenizer.get_added_vocab()
    assert torch.equal(embeddings_of(ti_engine, model, other), before)
    assert torch.equal(embeddings_of(ti_engine, model, longer_word), longer_before)
    assert np.array_equal(pixels(ti_engine, model=model, prompt=other), before_image)


def test_a_multi_vector_embedding_in_weighted_syntax(ti_engine):
    plain = pixels(ti_engine, prompt="a circle shinystyle")
    weighted = pixels(ti_engine, prompt="a circle (shinystyle:1.3)")
    assert not np.array_equal(plain, weighted)


def test_an_embedding_of_the_wrong_family_is_refused_naming_both(ti_engine):
    with pytest.raises(RequestError, match=r"embedding 'xlstyle' is for SDXL \(64\+64 wide\); 'builtin:shapes' "
                                           r"is SD \(64 wide\)"):
        ti_engine.run(GenerationRequest(**SMALL, prompt="a circle xlstyle"))
    with pytest.raises(RequestError, match=r"embedding 'flatlook' is for SD .*'builtin:shapes-xl' is SDXL"):
        ti_engine.run(GenerationRequest(**SMALL, model="builtin:shapes-xl", prompt="a circle flatlook"))


def test_a_request_vae_changes_the_decode_and_leaves_the_base_alone(ti_engine, models_dir):
    with ti_engine.manager.use("builtin:shapes") as (base, _):
        own_vae = base.pipeline.vae
        before = {k: v.clone() for k, v in own_vae.state_dict().items()}
        own_vae.save_pretrained(models_dir / "vae" / "warm-vae")
    from diffusers import AutoencoderKL

    warm = AutoencoderKL.from_pretrained(models_dir / "vae" / "warm-vae")
    with torch.no_grad():
        warm.decoder.conv_out.bias += torch.tensor([0.3, 0.0, -0.3])  # a warmer decode
    warm.save_pretrained(models_dir / "vae" / "warm-vae")

    plain = pixels(ti_engine, prompt="a red circle")
    warmer = pixels(ti_engine, prompt="a red circle", vae="warm-vae")
    assert (warmer[..., 0] - plain[..., 0]).mean() > 10 and (plain[..., 2] - warmer[..., 2]).mean() > 10
    assert np.array_equal(pixels(ti_engine, prompt="a red circle"), plain)  # the next request: the base's VAE
    with ti_engine.manager.use("builtin:shapes") as (base, _):
        assert base.pipeline.vae is own_vae
        assert all(torch.equal(v, before[k]) for k, v in own_vae.state_dict().items())
    assert any(row["name"].startswith("vae:") and row["role"] == "vae" for row in ti_engine.manager.loaded())
    with pytest.raises(RequestError, match="vae"):
        ti_engine.check(GenerationRequest(prompt="x", vae="no-such-vae"))
