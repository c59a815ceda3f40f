"""LoRA files as model sites serve them (kohya/A1111 keys for the built-ins' SD and SDXL architectures) and the
A1111 `<lora:name:weight>` prompt tag: the UNet part changes the image at the weight given, the text-encoder part
changes the text embeddings, weight 0 and no LoRA are the same bits, a tag is the same as `loras`, and unknown
names or LyCORIS LoHa files are refused naming what would work."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from diffusion_studio.cli import main
from diffusion_studio.config import StudioConfig
from diffusion_studio.engine.runner import Engine
from diffusion_studio.requests import GenerationRequest, RequestError
from kohya import kohya_lora, loha_file
from servers import serving

SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 3, "prompt": "a red circle on white"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-models")


@pytest.fixture(scope="module")
def lora_engine(data_dir, models_dir):
    """An engine whose models folder holds kohya LoRAs for builtin:shapes and builtin:shapes-xl and a LoHa file."""
    engine = Engine(StudioConfig(data_dir=data_dir, models_dir=models_dir, max_loaded_models=4))
    loras = models_dir / "loras"
    for model, short in (("builtin:shapes", "sd"), ("builtin:shapes-xl", "xl")):
        with engine.manager.use(model) as (base, _):
            kohya_lora(base.pipeline, loras / f"kohya-{short}.safetensors")
            kohya_lora(base.pipeline, loras / f"kohya-{short}-text.safetensors", unet=False, seed=1)
            if short == "sd":
                loha_file(base.pipeline, loras / "loha-sd.safetensors")
    return engine


def pixels(engine, **fields) -> np.ndarray:
    return np.asarray(engine.run(GenerationRequest(**{**SMALL, **fields})).images[0]).astype(np.int16)


def text_embeddings(engine, model: str, loras: tuple) -> torch.Tensor:
    """The prompt's embeddings as the pipeline encodes them, under the base's gate with these adapters."""
    with engine.manager.use(model) as (base, _), base.adapters.use(loras), torch.inference_mode():
        return base.pipeline.encode_prompt(prompt=SMALL["prompt"], device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)[0].clone()


@pytest.mark.parametrize("model,short", [("builtin:shapes", "sd"), ("builtin:shapes-xl", "xl")])
def test_a_kohya_lora_changes_the_image_at_the_weight_given_and_the_tag_equals_loras(lora_engine, model, short):
    name = f"kohya-{short}"
    plain = pixels(lora_engine, model=model)
    tagged = pixels(lora_engine, model=model, prompt=f"a red circle on white <lora:{name}:0.8>")
    listed = pixels(lora_engine, model=model, loras=[{"name": name, "weight": 0.8}])
    full = pixels(lora_engine, model=model, loras=[{"name": name, "weight": 1.0}])
    assert np.abs(tagged - plain).max() > 8
    assert np.array_equal(tagged, listed)  # the tag is taken out of the prompt and applied as `loras`
    assert not np.array_equal(full, listed)  # the weight matters
    assert np.array_equal(pixels(lora_engine, model=model, loras=[{"name": name, "weight": 0.0}]), plain)
    assert np.array_equal(pixels(lora_engine, model=model), plain)  # and nothing is left applied afterwards


def test_the_text_encoder_part_of_a_kohya_lora_is_applied(lora_engine, models_dir):
    path = str(models_dir / "loras" / "kohya-sd-text.safetensors")
    before = text_embeddings(lora_engine, "builtin:shapes", ())
    with_lora = text_embeddings(lora_engine, "builtin:shapes", (("te", path, 1.0, None),))
    assert (with_lora - before).abs().max() > 1e-3
    # <lora:name:0:1>: text-encoder weight 0 leaves the text embeddings exactly as without the LoRA
    assert torch.equal(text_embeddings(lora_engine, "builtin:shapes", (("te", path, 1.0, 0.0),)), before)
    assert torch.equal(text_embeddings(lora_engine, "builtin:shapes", ()), before)


def test_sdxl_lora_te1_and_te2_parts_each_change_their_encoder(lora_engine, models_dir):
    path = str(models_dir / "loras" / "kohya-xl-text.safetensors")
    before = text_embeddings(lora_engine, "builtin:shapes-xl", ())
    with_lora = text_embeddings(lora_engine, "builtin:shapes-xl", (("te", path, 1.0, None),))
    width = before.shape[-1] // 2  # [text_encoder | text_encoder_2] concatenated
    assert (with_lora[..., :width] - before[..., :width]).abs().max() > 1e-3
    assert (with_lora[..., width:] - before[..., width:]).abs().max() > 1e-3
    assert torch.equal(text_embeddings(lora_engine, "builtin:shapes-xl", ()), before)


def test_two_weight_tag_sets_text_encoder_and_unet_weights(lora_engine):
    request = GenerationRequest(**{**SMALL, "prompt": "a red circle <lora:kohya-sd:0.25:0.75>"})
    assert request.prompt == "a red circle"
    assert [(l.name, l.weight, l.text_encoder_weight) for l in request.loras] == [("kohya-sd", 0.75, 0.25)]
    only_unet = pixels(lora_engine, prompt="a red circle <lora:kohya-sd:0:1>")
    both = pixels(lora_engine, prompt="a red circle <lora:kohya-sd:1:1>")
    assert not np.array_equal(only_unet, both)


def test_tags_in_the_negative_prompt_apply_too_and_bad_tags_name_the_field():
    request = GenerationRequest(prompt="a circle", negative_prompt="blurry <lora:x:0.5>")
    assert request.negative_prompt == "blurry" and request.loras[0].name == "x"
    with pytest.raises(ValueError, match="prompt: LoRA tag '<lora:x:strong>'"):  # pydantic's, carrying ours
        GenerationRequest(prompt="<lora:x:strong>")
    with pytest.raises(ValueError, match="named twice"):
        GenerationRequest(prompt="<lora:x:0.5>", loras=[{"name": "x"}])
    plain = "a  circle (red:1.2)"
    assert GenerationRequest(prompt=plain).prompt == plain  # no tag: the prompt is not touched


def test_a_lycoris_loha_file_is_refused_by_name(lora_engine):
    with pytest.raises(RequestError, match="'loha-sd' is a LyCORIS LoHa file"):
        lora_engine.check(GenerationRequest(prompt="<lora:loha-sd>"))
    with pytest.raises(RequestError, match="LyCORIS LoHa"):
        lora_engine.run(GenerationRequest(**{**SMALL, "prompt": "a circle <lora:loha-sd>"}))


def test_an_unknown_lora_is_a_422_at_submit_naming_it_and_those_that_exist(lora_engine, data_dir, models_dir):
    from diffusion_studio.server import build_app

    app = build_app(StudioConfig(data_dir=data_dir, models_dir=models_dir))
    with serving(app) as url:
        answer = httpx.post(f"{url}/api/v1/jobs", json={**SMALL, "prompt": "a circle <lora:nosuch:0.5>"})
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["field"] == "loras" and "nosuch" in body["detail"] and "kohya-sd" in body["detail"]


def test_an_unknown_lora_is_one_line_from_the_cli(data_dir, models_dir, tmp_path, capsys):
    code = main(["generate", "--data-dir", str(data_dir), "--models-dir", str(models_dir), "--steps", "1",
                 "--prompt", "a circle <lora:nosuch>", "--out", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "nosuch" in error and "kohya-sd" in error, error
