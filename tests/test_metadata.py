"""PNG metadata: A1111 `parameters` text and our JSON chunk, both parse back into a request."""

import io

from PIL import Image

from diffusion_studio.engine.metadata import (
    a1111_parameters,
    image_request,
    parse_a1111,
    png_bytes,
    request_from_png,
)
from diffusion_studio.requests import GenerationRequest


def reopen(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_png_round_trip_through_json_chunk():
    request = GenerationRequest(prompt="a red circle, on white", negative_prompt="blurry", steps=7, guidance=5.5,
                                seed=9, scheduler="DPM++ 2M Karras", width=64, height=48, batch_size=3,
                                loras=[{"name": "heart", "weight": 0.8}])
    image = reopen(png_bytes(Image.new("RGB", (64, 48)), image_request(request, 10), 10, "builtin:shapes"))
    again = request_from_png(image)
    assert again == request.model_copy(update={"seed": 10, "batch_size": 1})


def test_a1111_text_is_written_in_its_format():
    request = GenerationRequest(prompt="a star", negative_prompt="ugly", steps=20, guidance=7.0, seed=5,
                                scheduler="Euler a")
    text = a1111_parameters(request, 5, 64, 64, "builtin:shapes")
    assert text.startswith("a star\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 5, "
                           "Size: 64x64, Model: builtin:shapes")


def test_a1111_png_parses_into_a_request():
    text = ("masterpiece, a cat\nwearing a hat\nNegative prompt: lowres, bad hands\n"
            "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, "
            'Model hash: abc123, Model: v1-5-pruned, Denoising strength: 0.4, Lora hashes: "x: 1, y: 2"')
    fields = parse_a1111(text)
    assert fields == {"prompt": "masterpiece, a cat\nwearing a hat", "negative_prompt": "lowres, bad hands",
                      "steps": 28, "guidance": 6.5, "seed": 1234, "strength": 0.4, "model": "v1-5-pruned",
                      "width": 512, "height": 768, "scheduler": "DPM++ 2M Karras"}
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    request = request_from_png(reopen(buffer.getvalue()))
    assert (request.steps, request.scheduler, request.width, request.height) == (28, "DPM++ 2M Karras", 512, 768)


def test_img2img_parameters_parse_without_the_image():
    request = GenerationRequest(mode="img2img", init_image=Image.new("RGB", (8, 8)), strength=0.3, seed=1)
    image = reopen(png_bytes(Image.new("RGB", (8, 8)), image_request(request, 1), 1, "m"))
    again = request_from_png(image)
    assert again.mode.value == "img2img" and again.strength == 0.3 and again.init_image is None
    assert "Denoising strength: 0.3" in image.text["parameters"]


def test_png_without_parameters_is_a_clear_error():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    try:
        request_from_png(reopen(buffer.getvalue()))
    except ValueError as exc:
        assert "no generation parameters" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_a1111_text_carries_the_hashes_as_a1111_writes_them():
    from diffusion_studio.engine.metadata import ResourceHashes

    request = GenerationRequest(prompt="a star, embx", steps=20, guidance=7.0, seed=5, scheduler="Euler a",
                                clip_skip=2, vae="vae/sd-vae.safetensors",
                                loras=[{"name": "one", "weight": 0.8}, {"name": "two", "weight": 1.0,
                                                                        "text_encoder_weight": 0.5}])
    hashes = ResourceHashes(model="abcdef1234", vae="0123456789", loras={"one": "111111111111", "two": "222222222222"},
                            embeddings={"embx": "333333333333"})
    text = a1111_parameters(request, 5, 64, 64, "my-model", hashes)
    prompt, settings = text.split("\n")
    assert prompt == "a star, embx <lora:one:0.8> <lora:two:0.5:1>"
    assert settings == ("Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 5, Size: 64x64, Model hash: abcdef1234, "
                        "Model: my-model, VAE hash: 0123456789, VAE: sd-vae.safetensors, Clip skip: 2, "
                        'Lora hashes: "one: 111111111111, two: 222222222222", TI hashes: "embx: 333333333333", '
                        "Mode: txt2img")
    plain = a1111_parameters(GenerationRequest(prompt="x"), 1, 8, 8, "builtin:shapes")
    assert "hash" not in plain and "Clip skip" not in plain and "VAE" not in plain  # nothing to say: left out
    again = request_from_png(reopen(_png_with_parameters(text)))  # A1111's text alone reproduces it
    assert (again.clip_skip, [(lora.name, lora.weight, lora.text_encoder_weight) for lora in again.loras]) == \
        (2, [("one", 0.8, None), ("two", 1.0, 0.5)])


def _png_with_parameters(text: str) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_an_a1111_texts_hashes_name_local_models_through_the_lookup():
    from diffusion_studio.engine.metadata import png_parameters

    text = ("a cat <lora:Their LoRA:0.6>, <lora:gone:1>\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, "
            'Size: 512x512, Model hash: abcdef1234, Model: sd15-pruned, VAE hash: 0123456789, VAE: x.pt, '
            'Lora hashes: "Their LoRA: 111111111111, gone: 999999999999", TI hashes: "emb: 333333333333"')
    local = {("checkpoint", "abcdef1234"): "sd15", ("lora", "111111111111"): "mine/lora",
             ("vae", "0123456789"): "my-vae"}
    asked = []

    def lookup(kind, short):
        asked.append((kind, short))
        return local.get((kind, short))

    request, matches = png_parameters(reopen(_png_with_parameters(text)), lookup)
    assert request.model == "sd15" and request.vae == "my-vae"
    assert [(lora.name, lora.weight) for lora in request.loras] == [("mine/lora", 0.6), ("gone", 1.0)]
    assert [(m.kind, m.name, m.hash, m.local) for m in matches] == [
        ("checkpoint", "sd15-pruned", "abcdef1234", "sd15"), ("vae", "x.pt", "0123456789", "my-vae"),
        ("lora", "Their LoRA", "111111111111", "mine/lora"), ("lora", "gone", "999999999999", None),
        ("embedding", "emb", "333333333333", None)]
    assert request_from_png(reopen(_png_with_parameters(text))).model == "sd15-pruned"  # no lookup: as written
    assert len(asked) == 5
