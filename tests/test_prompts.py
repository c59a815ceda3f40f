"""The prompt as A1111 users write it: attention syntax, BREAK, long prompts and clip skip go through
engine/prompts.py (compel); plain prompts keep the pipeline's own encoding, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_studio.api.a1111 import Txt2ImgBody, to_request_fields
from diffusion_studio.engine.prompts import PromptEncoder, needs_encoding, parse_attention
from diffusion_studio.engine.runner import WorkItem
from diffusion_studio.requests import GenerationRequest

SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 11}
LONG = ", ".join(["a red circle on a white background"] * 12)  # ~100 tokens


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.int16)


def run(engine, **fields) -> np.ndarray:
    return pixels(engine.run(GenerationRequest(**{**SMALL, **fields})))


def encoder(engine, model: str, clip_skip: int = 1) -> tuple[PromptEncoder, object]:
    with engine.manager.use(model) as (base, _):
        return PromptEncoder(base.pipeline, clip_skip), base.pipeline


@pytest.mark.parametrize("text,expected", [
    ("a cat", [[("a cat", 1.0)]]),
    ("a (cat:1.5) here", [[("a ", 1.0), ("cat", 1.5), (" here", 1.0)]]),
    ("(cat)", [[("cat", 1.1)]]),
    ("((cat))", [[("cat", pytest.approx(1.21))]]),
    ("[cat]", [[("cat", pytest.approx(1 / 1.1))]]),
    ("(a [b] c:2)", [[("a ", 2.0), ("b", pytest.approx(2 / 1.1)), (" c", 2.0)]]),
    (r"\(cat\) \[x\]", [[("(cat) [x]", 1.0)]]),
    ("one BREAK two", [[("one", 1.0)], [("two", 1.0)]]),
    ("(open", [[("open", 1.1)]]),  # unclosed: to the end, as A1111
    ("a) b]", [[("a) b]", 1.0)]]),  # unmatched closers are text
    ("time 10:30", [[("time 10:30", 1.0)]]),
])
def test_a1111_attention_grammar(text, expected):
    assert parse_attention(text) == expected


def test_plain_prompts_keep_todays_path_bit_for_bit(engine):
    """The engine's image of a plain prompt equals the pipeline called as before this change (strings,
    prompt_embeds=None), same seed."""
    request = GenerationRequest(**SMALL, prompt="a red circle on white", negative_prompt="blue")
    with engine.manager.use(request.model) as (base, _):
        assert not needs_encoding(request.prompt, base.pipeline.tokenizer)
        pipe = engine.manager.view(base, request.mode, request.scheduler)
        with base.adapters.use(()), torch.inference_mode():
            today = pipe(prompt=[request.prompt], negative_prompt=[request.negative_prompt], prompt_embeds=None,
                         num_inference_steps=2, guidance_scale=request.guidance,
                         generator=[torch.Generator("cpu").manual_seed(11)], width=64, height=64).images[0]
    assert np.array_equal(pixels(engine.run(request)), np.asarray(today).astype(np.int16))


@pytest.mark.parametrize("model", ["builtin:shapes", "builtin:shapes-xl"])
def test_weights_change_the_embedding_and_weight_one_does_not(engine, model):
    prompts, _ = encoder(engine, model)
    with torch.inference_mode():
        plain, _ = prompts.encode_one("a red circle")
        weighted, _ = prompts.encode_one("a (red:1.5) circle")
        unit, _ = prompts.encode_one("a (red:1.0) circle")
        lowered, _ = prompts.encode_one("a [red] circle")
    assert (weighted - plain).abs().max() > 1e-3 and (lowered - plain).abs().max() > 1e-3
    assert torch.equal(unit, plain)  # compel leaves weight-1 tokens exactly as encoded


@pytest.mark.parametrize("model", ["builtin:shapes", "builtin:shapes-xl"])
def test_the_encoder_on_a_plain_prompt_equals_the_pipelines_encoding(engine, model):
    prompts, pipe = encoder(engine, model)
    with torch.inference_mode():
        mine, pooled = prompts.encode_one("a red circle on white")
        theirs = pipe.encode_prompt(prompt="a red circle on white", device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)
    assert torch.equal(mine, theirs[0])
    if pooled is not None:
        assert torch.equal(pooled, theirs[2])


def test_a_long_prompt_is_not_truncated(engine):
    prompts, pipe = encoder(engine, "builtin:shapes")
    chunk = pipe.tokenizer.model_max_length  # the built-ins' tokenizer holds 24; CLIP's 77
    assert needs_encoding(LONG, pipe.tokenizer)
    with torch.inference_mode():
        red, _ = prompts.encode_one(LONG + ", a red star")
        blue, _ = prompts.encode_one(LONG + ", a blue star")
    assert red.shape[1] % chunk == 0 and red.shape[1] >= 4 * chunk  # windows of BOS + 75 tokens + EOS
    assert (red[:, -chunk:] - blue[:, -chunk:]).abs().max() > 1e-3  # the last words count
    assert torch.equal(red[:, :chunk], blue[:, :chunk])  # and leave the first window alone
    assert not np.array_equal(run(engine, prompt=LONG + ", a red star"), run(engine, prompt=LONG + ", a blue star"))


@pytest.mark.parametrize("model", ["builtin:shapes", "builtin:shapes-xl"])
def test_break_starts_a_new_chunk(engine, model):
    prompts, pipe = encoder(engine, model)
    chunk = pipe.tokenizer.model_max_length
    with torch.inference_mode():
        broken, _ = prompts.encode_one("a red circle BREAK on white")
        first, _ = prompts.encode_one("a red circle")
    assert broken.shape[1] == 2 * chunk
    assert torch.equal(broken[:, :chunk], first)


@pytest.mark.parametrize("model", ["builtin:shapes", "builtin:shapes-xl"])
def test_long_and_weighted_positive_and_negative_prompts_run(engine, model):
    plain = run(engine, model=model, prompt="a red circle")
    assert run(engine, model=model, prompt=LONG, negative_prompt="(blue:1.3) square").shape == plain.shape
    assert not np.array_equal(run(engine, model=model, prompt="a red circle", negative_prompt=LONG),
                              run(engine, model=model, prompt="a red circle", negative_prompt="a"))


def test_clip_skip_two_is_the_penultimate_layer_as_diffusers_takes_it(engine):
    # SDXL: diffusers' own clip_skip=1 (A1111's 2)
    prompts, pipe = encoder(engine, "builtin:shapes-xl", clip_skip=2)
    with torch.inference_mode():
        mine, pooled = prompts.encode_one("a red circle")
        theirs = pipe.encode_prompt(prompt="a red circle", device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False, clip_skip=1)
    assert torch.equal(mine, theirs[0]) and torch.equal(pooled, theirs[2])
    # SD: diffusers' SD pipelines look for `text_encoder.text_model` (gone in transformers 5), so the formula
    prompts, pipe = encoder(engine, "builtin:shapes", clip_skip=2)
    with torch.inference_mode():
        mine, _ = prompts.encode_one("a red circle")
        ids = pipe.tokenizer("a red circle", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(mine, pipe.text_encoder.final_layer_norm(hidden))
    assert not np.array_equal(run(engine, prompt="a red circle", clip_skip=2), run(engine, prompt="a red circle"))


def test_a1111_bodies_carry_clip_skip():
    body = Txt2ImgBody(prompt="x", override_settings={"CLIP_stop_at_last_layers": 2})
    assert GenerationRequest(**to_request_fields(body, "builtin:shapes")).clip_skip == 2


def test_a_batch_with_syntax_prompts_gives_each_its_lone_image(engine):
    plain = GenerationRequest(**SMALL, prompt="a red circle")
    other = GenerationRequest(**{**SMALL, "seed": 12}, prompt="a blue square")
    weighted = GenerationRequest(**{**SMALL, "seed": 13}, prompt="a (green:1.4) star")
    assert plain.batch_key() == weighted.batch_key()  # the service may put them in one batch
    together = engine.run_batch([WorkItem(plain), WorkItem(weighted), WorkItem(other)])
    assert [r.batched_with for r in together] == [2, 1, 2]  # the weighted one ran apart
    for request, result in zip((plain, weighted, other), together):
        assert np.array_equal(pixels(result), pixels(engine.run(request)))


@pytest.mark.parametrize("model,mode", [("builtin:shapes", "img2img"), ("builtin:shapes", "inpaint"),
                                        ("builtin:shapes", "controlnet"), ("builtin:shapes-xl", "controlnet")])
def test_weighted_prompts_in_every_mode(engine, model, mode, shape_image, center_mask):
    inputs = {"img2img": {"init_image": shape_image}, "inpaint": {"init_image": shape_image, "mask_image": center_mask},
              "controlnet": {"control_image": shape_image}}[mode]
    plain = run(engine, model=model, mode=mode, prompt="a blue circle", **inputs)
    weighted = run(engine, model=model, mode=mode, prompt="a (blue:1.6) circle", **inputs)
    assert not np.array_equal(plain, weighted)
