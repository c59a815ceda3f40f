"""PNG metadata both ways: an A1111-compatible `parameters` text chunk and a JSON chunk with the full request.

A PNG written here carries enough to reproduce it exactly (the JSON: every field, the image's own seed, batch 1);
A1111's own PNGs parse too, from their `parameters` text. The parameters carry A1111's hashes of the files a run
used (`Model hash`, `VAE hash`, `Lora hashes`, `TI hashes`: see engine/hashes.py), and parsing an A1111 text maps
those hashes back to local models through a lookup function the caller passes, so this module stays pure.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from PIL import Image, PngImagePlugin

from ..requests import GenerationRequest, Mode
from ..samplers import KARRAS_SUFFIX, SAMPLERS

JSON_CHUNK = "diffusion-studio"
A1111_CHUNK = "parameters"
_PARAMETERS_ONLY = {"require_images": False}  # a PNG holds parameters, not the input images
# A1111's own pattern for "Key: value" pairs, values optionally quoted.
_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def image_request(request: GenerationRequest, seed: int) -> GenerationRequest:
    """The request that reproduces one image of a batch on its own."""
    return request.model_copy(update={"seed": seed, "batch_size": 1})


@dataclass(frozen=True)
class ResourceHashes:
    """A1111's short hashes of the files a run used; what is unknown (built-ins, folders, not hashed in time) is
    left out, as A1111 leaves out what it has no hash for."""

    model: str | None = None  # AUTOV2: 10 hex of the checkpoint file's sha256
    vae: str | None = None  # AUTOV2 of the VAE file
    loras: dict[str, str] = field(default_factory=dict)  # LoRA name as the request gives it -> 12 hex
    embeddings: dict[str, str] = field(default_factory=dict)  # embedding name in the prompt -> 12 hex


ResourceKind = Literal["checkpoint", "vae", "lora", "embedding"]
# (kind, short hash as written in the PNG) -> the local model's name, or None when no local file has that hash.
HashLookup = Callable[[ResourceKind, str], str | None]


@dataclass(frozen=True)
class HashMatch:
    """One hash an A1111 text names, and the local model it was found as (None: not here)."""

    kind: ResourceKind
    name: str  # as the text names it
    hash: str
    local: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "hash": self.hash, "found": self.local is not None,
                "local": self.local}


def a1111_quote(value: Any, marks: str = ",\n") -> str:
    """A value holding one of `marks` as a JSON string, as A1111 quotes (it also quotes on ':', which only its
    hash lists hold there; our model names may hold one, as in builtin:shapes, and its parser reads those fine)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(ch in text for ch in marks) else text


HASH_LISTS = ("Lora hashes", "TI hashes")


def _hash_label(name: str) -> str:
    return name.replace(":", "").replace(",", "")  # A1111 drops these from names in its hash lists


def _lora_tag(lora) -> str:
    if lora.text_encoder_weight is not None:
        return f"<lora:{lora.name}:{lora.text_encoder_weight:g}:{lora.weight:g}>"
    return f"<lora:{lora.name}:{lora.weight:g}>"


def a1111_parameters(request: GenerationRequest, seed: int, width: int, height: int, model_label: str,
                     hashes: ResourceHashes | None = None) -> str:
    """A1111's infotext, in its key order. LoRAs go back into the prompt as <lora:name:weight> tags (the request
    keeps them in `loras`), which is where A1111 reads them from."""
    hashes = hashes or ResourceHashes()
    if request.hires is not None:  # A1111's Size is the first pass's; the image is the hires one
        width, height = ((request.width, request.height) if request.width and request.height
                         else hires_base_size(request.hires, width, height))
    pairs: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": request.scheduler,
        "CFG scale": request.guidance,
        "Seed": seed,
        "Size": f"{width}x{height}",
    }
    if hashes.model:
        pairs["Model hash"] = hashes.model
    pairs["Model"] = model_label
    if request.vae:
        if hashes.vae:
            pairs["VAE hash"] = hashes.vae
        pairs["VAE"] = Path(request.vae).name
    if request.mode in (Mode.img2img, Mode.inpaint):
        pairs["Denoising strength"] = request.strength
    if request.clip_skip > 1:
        pairs["Clip skip"] = request.clip_skip
    if request.step_cache > 1:  # ours (A1111 ignores keys it doesn't know): the image depends on it
        pairs["Step cache"] = request.step_cache
    if request.mode == Mode.inpaint:
        pairs["Mask blur"] = request.mask_blur
        pairs |= _inpaint_pairs(request)
    if request.hires is not None:
        hires = request.hires
        # A1111 (txt2img only) writes the second pass's strength as Denoising strength; img2img has its own there.
        strength_key = "Hires denoising strength" if request.mode == Mode.img2img else "Denoising strength"
        pairs[strength_key] = hires.denoising_strength
        if hires.width or hires.height:
            pairs["Hires resize"] = f"{hires.width or 0}x{hires.height or 0}"
        else:
            pairs["Hires upscale"] = f"{hires.scale:g}"
        if hires.steps:
            pairs["Hires steps"] = hires.steps
        pairs["Hires upscaler"] = hires.upscaler
    lora_hashes = [f"{_hash_label(lora.name)}: {hashes.loras[lora.name]}" for lora in request.loras
                   if lora.name in hashes.loras]
    if lora_hashes:
        pairs["Lora hashes"] = ", ".join(lora_hashes)
    if hashes.embeddings:
        pairs["TI hashes"] = ", ".join(f"{_hash_label(name)}: {digest}" for name, digest in hashes.embeddings.items())
    pairs["Mode"] = request.mode.value
    text = " ".join([request.prompt, *(_lora_tag(lora) for lora in request.loras)]).strip()
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    quoted = {key: a1111_quote(value, ",:\n" if key in HASH_LISTS else ",\n") for key, value in pairs.items()}
    return text + "\n" + ", ".join(f"{key}: {value}" for key, value in quoted.items())


def hires_base_size(hires, width: int, height: int) -> tuple[int, int]:
    """The first pass's size from the final one: the final size over the scale, as the runner's rounding gives it
    (hr_resize_x/y: the base size is not recoverable from the image, so the final one is written)."""
    if hires.width or hires.height:
        return width, height
    return max(8, round(width / hires.scale) // 8 * 8), max(8, round(height / hires.scale) // 8 * 8)


def _inpaint_pairs(request: GenerationRequest) -> dict[str, Any]:
    """A1111's inpainting keys (it writes the area and padding only when they differ from its defaults)."""
    pairs: dict[str, Any] = {}
    if request.inpaint_area == "masked":
        pairs["Inpaint area"] = "Only masked"
        pairs["Masked area padding"] = request.inpaint_padding
    if request.mask_invert:
        pairs["Mask mode"] = "Inpaint not masked"
    if request.inpaint_fill != "original":
        pairs["Masked content"] = request.inpaint_fill
    if request.outpaint is not None and request.outpaint.extends:
        o = request.outpaint
        pairs["Outpaint"] = f"{o.left} {o.right} {o.top} {o.bottom}"  # left right top bottom, in pixels
    return pairs


def png_bytes(image: Image.Image, request: GenerationRequest, seed: int, model_label: str,
              hashes: ResourceHashes | None = None) -> bytes:
    """The image as PNG with both metadata chunks (the request must be the per-image one: see image_request)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(A1111_CHUNK, a1111_parameters(request, seed, image.width, image.height, model_label, hashes))
    info.add_text(JSON_CHUNK, json.dumps({**request.parameters(), "seed": seed, "batch_size": 1,
                                          "width": image.width, "height": image.height}))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(path: Path, image: Image.Image, request: GenerationRequest, seed: int, model_label: str,
             hashes: ResourceHashes | None = None) -> Path:
    path.write_bytes(png_bytes(image, request, seed, model_label, hashes))
    return path


def read_png_text(image: Image.Image) -> dict[str, str]:
    return {k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)}


def request_from_png(image: Image.Image, lookup: HashLookup | None = None) -> GenerationRequest:
    """Our JSON chunk when present (exact), else A1111's parameters text. Raises ValueError if neither."""
    return png_parameters(image, lookup)[0]


def png_parameters(image: Image.Image, lookup: HashLookup | None = None) -> tuple[GenerationRequest, list[HashMatch]]:
    """The request a PNG carries, and for an A1111 text, the hashes it names and the local models found for
    them (`lookup`): a found checkpoint, VAE or LoRA replaces the name the text gives; one not found keeps it."""
    text = read_png_text(image)
    if JSON_CHUNK in text:
        data = json.loads(text[JSON_CHUNK])
        if not isinstance(data, dict):
            raise ValueError(f"its '{JSON_CHUNK}' chunk is not a JSON object of parameters")
        fields = {k: v for k, v in data.items() if not k.endswith("_sha256")}
        return GenerationRequest.model_validate(fields, context=_PARAMETERS_ONLY), []
    if A1111_CHUNK in text:
        fields = parse_a1111(text[A1111_CHUNK])
        matches = match_hashes(text[A1111_CHUNK], fields, lookup) if lookup else []
        return GenerationRequest.model_validate(fields, context=_PARAMETERS_ONLY), matches
    raise ValueError("this PNG carries no generation parameters (no 'parameters' or 'diffusion-studio' chunk)")


def a1111_hashes(text: str) -> list[tuple[ResourceKind, str, str]]:
    """(kind, name as written, short hash) for each hash an A1111 infotext names."""
    pairs = _settings_pairs(text)
    found: list[tuple[ResourceKind, str, str]] = []
    if pairs.get("Model hash"):
        found.append(("checkpoint", pairs.get("Model", ""), pairs["Model hash"]))
    if pairs.get("VAE hash"):
        found.append(("vae", pairs.get("VAE", ""), pairs["VAE hash"]))
    for key, kind in (("Lora hashes", "lora"), ("TI hashes", "embedding")):
        for item in pairs.get(key, "").split(","):
            name, _, digest = item.rpartition(":")
            if name.strip() and digest.strip():
                found.append((kind, name.strip(), digest.strip()))  # type: ignore[arg-type]
    return found


def find_hashes(text: str, lookup: HashLookup) -> list[HashMatch]:
    """Each hash an A1111 text names, looked up locally."""
    return [HashMatch(kind, name, digest, lookup(kind, digest)) for kind, name, digest in a1111_hashes(text)]


def hash_report(matches: list[HashMatch]) -> dict[str, Any]:
    """For PNG-info answers: whether the checkpoint the text names by hash is here, and every hash's match."""
    model = next((match for match in matches if match.kind == "checkpoint"), None)
    return {"model_found": None if model is None else model.local is not None,
            "model_hash": None if model is None else model.hash,
            "hashes": [match.as_dict() for match in matches]}


def a1111_fields(text: str) -> dict[str, str]:
    """An A1111 infotext as A1111's own PNG-info gives it: Prompt, Negative prompt, each "Key: value" pair as
    text, and Size also as Size-1 / Size-2."""
    prompt, negative, pairs = _split_a1111(text)
    raw = {"Prompt": prompt, "Negative prompt": negative, **pairs}
    width, _, height = pairs.get("Size", "").partition("x")
    if width and height:
        raw.update({"Size-1": width, "Size-2": height})
    return raw


def match_hashes(text: str, fields: dict[str, Any], lookup: HashLookup) -> list[HashMatch]:
    """Look each hash of an A1111 text up locally and put the names found into `fields` (in place)."""
    matches = find_hashes(text, lookup)
    for match in matches:
        if match.local is None:
            continue
        if match.kind == "checkpoint":
            fields["model"] = match.local
        elif match.kind == "vae":
            fields["vae"] = match.local
        elif match.kind == "lora":  # the prompt's <lora:name:...> tags name it; A1111's list drops ':' and ','
            for key in ("prompt", "negative_prompt"):
                fields[key] = _LORA_TAG_NAME.sub(
                    lambda tag: tag.group(1) + (match.local if _hash_label(tag.group(2).strip()) == match.name
                                                else tag.group(2)), fields[key])
    return matches


_LORA_TAG_NAME = re.compile(r"(<(?:lora|lyco):)([^:<>]+)", re.IGNORECASE)


def parse_a1111(text: str) -> dict[str, Any]:
    """A1111 infotext -> GenerationRequest fields (unknown keys are ignored, as A1111 itself does)."""
    prompt, negative, pairs = _split_a1111(text)
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    simple = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
              "Denoising strength": ("strength", float), "Mask blur": ("mask_blur", int), "Model": ("model", str),
              "Clip skip": ("clip_skip", int), "Step cache": ("step_cache", int)}
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
    fields |= _parse_hires(pairs, fields)
    if pairs.get("Inpaint area") == "Only masked":
        fields["inpaint_area"] = "masked"
        if "Masked area padding" in pairs:
            fields["inpaint_padding"] = int(pairs["Masked area padding"])
    if pairs.get("Mask mode") == "Inpaint not masked":
        fields["mask_invert"] = True
    if pairs.get("Masked content") in ("fill", "latent noise", "latent nothing"):
        fields["inpaint_fill"] = pairs["Masked content"]
    if "Outpaint" in pairs:
        left, right, top, bottom = (int(part) for part in pairs["Outpaint"].split())
        fields["outpaint"] = {"left": left, "right": right, "top": top, "bottom": bottom}
    return fields


def _parse_hires(pairs: dict[str, str], fields: dict[str, Any]) -> dict[str, Any]:
    """A1111's Hires keys -> the request's `hires`; its Denoising strength is then the second pass's."""
    if not any(key in pairs for key in ("Hires upscale", "Hires resize", "Hires upscaler")):
        return {}
    hires: dict[str, Any] = {"upscaler": pairs.get("Hires upscaler", "Latent")}
    if "Hires resize" in pairs:
        width, _, height = pairs["Hires resize"].partition("x")
        hires |= {"width": int(width) or None, "height": int(height) or None}
    elif "Hires upscale" in pairs:
        hires["scale"] = float(pairs["Hires upscale"])
    if "Hires steps" in pairs:
        hires["steps"] = int(pairs["Hires steps"])
    found: dict[str, Any] = {"hires": hires}
    if "Hires denoising strength" in pairs:
        hires["denoising_strength"] = float(pairs["Hires denoising strength"])
    elif "strength" in fields and fields.get("mode", "txt2img") == "txt2img":
        hires["denoising_strength"] = fields["strength"]
        found["strength"] = GenerationRequest.model_fields["strength"].default
    return found


def _split_a1111(text: str) -> tuple[str, str, dict[str, str]]:
    """Prompt, negative prompt and the settings line's pairs."""
    lines = text.strip().split("\n")
    settings = lines.pop() if _is_settings_line(lines) else ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return "\n".join(prompt_lines).strip(), "\n".join(negative_lines).strip(), _pairs(settings)


def _is_settings_line(lines: list[str]) -> bool:
    return bool(lines) and len(_PAIR.findall(lines[-1])) >= 3


def _pairs(settings: str) -> dict[str, str]:
    """A1111's "Key: value" pairs; a quoted value is a JSON string (see a1111_quote)."""
    pairs = {}
    for key, value in _PAIR.findall(settings):
        value = value.strip()
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        pairs[key.strip()] = value
    return pairs


def _settings_pairs(text: str) -> dict[str, str]:
    return _split_a1111(text)[2]
