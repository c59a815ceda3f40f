"""PNG metadata both ways: an A1111-compatible `parameters` text chunk and a JSON chunk with the full request.

A PNG written here carries enough to reproduce it exactly (the JSON: every field, the image's own seed, batch 1);
A1111's own PNGs parse too, from their `parameters` text.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ..requests import GenerationRequest, Mode
from ..samplers import KARRAS_SUFFIX, SAMPLERS

JSON_CHUNK = "diffusion-studio"
A1111_CHUNK = "parameters"
# A1111's own pattern for "Key: value" pairs, values optionally quoted.
_PARAMETERS_ONLY = {"require_images": False}  # a PNG holds parameters, not the input images
_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def image_request(request: GenerationRequest, seed: int) -> GenerationRequest:
    """The request that reproduces one image of a batch on its own."""
    return request.model_copy(update={"seed": seed, "batch_size": 1})


def a1111_parameters(request: GenerationRequest, seed: int, width: int, height: int, model_label: str) -> str:
    pairs = {
        "Steps": request.steps,
        "Sampler": request.scheduler,
        "CFG scale": request.guidance,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model_label,
    }
    if request.mode in (Mode.img2img, Mode.inpaint):
        pairs["Denoising strength"] = request.strength
    if request.mode == Mode.inpaint:
        pairs["Mask blur"] = request.mask_blur
    if request.loras:
        pairs["Lora hashes"] = '"' + ", ".join(f"{lora.name}: {lora.weight}" for lora in request.loras) + '"'
    pairs["Mode"] = request.mode.value
    text = request.prompt
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    return text + "\n" + ", ".join(f"{key}: {value}" for key, value in pairs.items())


def png_bytes(image: Image.Image, request: GenerationRequest, seed: int, model_label: str) -> bytes:
    """The image as PNG with both metadata chunks (the request must be the per-image one: see image_request)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(A1111_CHUNK, a1111_parameters(request, seed, image.width, image.height, model_label))
    info.add_text(JSON_CHUNK, json.dumps({**request.parameters(), "seed": seed, "batch_size": 1,
                                          "width": image.width, "height": image.height}))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(path: Path, image: Image.Image, request: GenerationRequest, seed: int, model_label: str) -> Path:
    path.write_bytes(png_bytes(image, request, seed, model_label))
    return path


def read_png_text(image: Image.Image) -> dict[str, str]:
    return {k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)}


def request_from_png(image: Image.Image) -> GenerationRequest:
    """Our JSON chunk when present (exact), else A1111's parameters text. Raises ValueError if neither."""
    text = read_png_text(image)
    if JSON_CHUNK in text:
        data = json.loads(text[JSON_CHUNK])
        if not isinstance(data, dict):
            raise ValueError(f"its '{JSON_CHUNK}' chunk is not a JSON object of parameters")
        fields = {k: v for k, v in data.items() if not k.endswith("_sha256")}
        return GenerationRequest.model_validate(fields, context=_PARAMETERS_ONLY)
    if A1111_CHUNK in text:
        return GenerationRequest.model_validate(parse_a1111(text[A1111_CHUNK]), context=_PARAMETERS_ONLY)
    raise ValueError("this PNG carries no generation parameters (no 'parameters' or 'diffusion-studio' chunk)")


def parse_a1111(text: str) -> dict[str, Any]:
    """A1111 infotext -> GenerationRequest fields (unknown keys are ignored, as A1111 itself does)."""
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and len(_PAIR.findall(lines[-1])) >= 3 else ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    pairs = {key.strip(): value.strip().strip('"') for key, value in _PAIR.findall(settings)}
    fields: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip(),
                              "negative_prompt": "\n".join(negative_lines).strip()}
    simple = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
              "Denoising strength": ("strength", float), "Mask blur": ("mask_blur", int), "Model": ("model", str)}
    for key, (name, kind) in simple.items():
        if key in pairs:
            fields[name] = kind(pairs[key])
    if "Size" in pairs:
        width, _, height = pairs["Size"].partition("x")
        fields["width"], fields["height"] = int(width), int(height)
    if "Sampler" in pairs:
        sampler = pairs["Sampler"]
        if pairs.get("Schedule type") == "Karras" and sampler + KARRAS_SUFFIX in SAMPLERS:
            sampler += KARRAS_SUFFIX
        fields["scheduler"] = sampler
    if pairs.get("Mode") in {m.value for m in Mode}:
        fields["mode"] = pairs["Mode"]
    return fields
