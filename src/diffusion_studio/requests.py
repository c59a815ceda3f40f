"""The one request type every layer passes down, the result and progress events that come back up.

A `GenerationRequest` is built once (UI, API, CLI, Python API), validated here against the configured `Limits`
(pass them as validation context: `GenerationRequest.model_validate(data, context={"limits": limits})`), and handed
to the engine unchanged. Validation errors always name the field and the allowed range.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .config import Limits
from .samplers import SAMPLERS

ALLOWED_IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}
MAX_SEED = 2**32 - 1


class Mode(str, enum.Enum):
    """What a request does. The model family (SD or SDXL) is the base model's, not a mode: the engine picks the
    family's pipeline for the mode. "sdxl" is still accepted on input, as an alias of txt2img (older clients and
    stored requests)."""

    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"
    controlnet = "controlnet"


class RequestError(ValueError):
    """A request that can't run; `field` names the input at fault so UIs and the API can point at it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # pickled by its fields (a Ray actor's error reaches the studio as the same error)
        return type(self), (self.field, self.message)


class ModelLoadError(RuntimeError):
    """The model's files were found but would not load (corrupt, truncated or incompatible weights): a fault on
    the server's side, not in the request."""


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, `field: what is wrong (got value)`, for people rather than stack traces."""
    lines = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if not where:  # a whole-request check: RequestError already starts with the field's name
            lines.append(message)
            continue
        got = item.get("input")
        quiet = got is None or isinstance(got, (dict, list, bytes, Image.Image, np.ndarray)) or "image" in where
        shown = "" if quiet else f" (got {str(got)[:60]!r})"
        lines.append(f"{where}: {message}{shown}")
    return "; ".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Images arrive as PIL images, numpy arrays, raw bytes or base64 text (optionally a data URL). They are decoded
# once, here, with a pixel limit checked before the pixels are read (decompression-bomb guard).


class ImageRefused(ValueError):
    """A readable image the studio refuses (format, size): its message is already the one to show."""


def decode_image(value: Any, max_pixels: int) -> Image.Image:
    """The one safe decoder for every image a client sends (generation inputs and both png-info routes)."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        if value.ndim not in (2, 3) or value.dtype != np.uint8:
            raise ValueError("must be an 8-bit image array of shape HxW or HxWxC")
        image = Image.fromarray(value)
    else:
        if isinstance(value, str):
            text = value
            if value.startswith("data:"):
                _, comma, text = value.partition(",")
                if not comma:
                    raise ValueError("is a data URL without its data: write data:image/png;base64,<base64>")
            try:
                value = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("must be base64-encoded image data") from None
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError("must be an image (PNG, JPEG, WEBP, ...), as bytes, base64 text or a picture")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(value))
                if image.format not in ALLOWED_IMAGE_FORMATS:
                    raise ImageRefused(f"format {image.format} is not allowed; use one of {sorted(ALLOWED_IMAGE_FORMATS)}")
                _check_pixels(image, max_pixels)
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"image is too large (more than {max_pixels} pixels)") from None
        except ImageRefused:
            raise
        except (OSError, SyntaxError, ValueError):  # unidentified, truncated, or an oversized text chunk
            raise ValueError("is not a readable image (truncated, corrupt or not an image file)") from None
    _check_pixels(image, max_pixels)
    return image


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRefused("image is empty")
    if width * height > max_pixels:
        raise ImageRefused(f"image is {width}x{height}, more than the allowed {max_pixels} pixels")


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + repr((image.mode, image.size)).encode()).hexdigest()[:16]


def image_to_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _decode_in_context(value: Any, info: ValidationInfo) -> Any:
    if value is None or isinstance(value, Image.Image) and value.mode in ("RGB", "L"):
        return value
    return decode_image(value, _limits(info).max_input_pixels)


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    return context.get("limits") or Limits()


InputImage = Annotated[
    Image.Image,
    BeforeValidator(_decode_in_context),
    PlainSerializer(image_to_base64, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "description": "an image (PNG, JPEG, WEBP, BMP, GIF, TIFF) as base64 text, "
                                                     "optionally a data:image/...;base64, URL"}),
]


MAX_LORA_WEIGHT = 4.0


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="a listed LoRA name (admins: also a path to a .safetensors file "
                                                "or folder)")
    weight: float = Field(1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT,
                          description="the UNet's weight (and the text encoders', unless text_encoder_weight)")
    text_encoder_weight: float | None = Field(None, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT,
                                              description="the text encoders' weight (A1111's <lora:name:te:unet>)")


# A1111's extra-network tags: <lora:name>, <lora:name:weight>, <lora:name:te_weight:unet_weight> (also <lyco:...>).
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:<>]+)((?::[^:<>]*){0,2})>", re.IGNORECASE)


def take_lora_tags(text: str, field_name: str) -> tuple[str, list[LoraSpec]]:
    """The text without its LoRA tags, and the LoRAs they name at their weights (A1111 applies the tags of
    positive and negative prompts alike). A text without tags comes back unchanged, character for character."""
    specs = []
    for match in LORA_TAG.finditer(text):
        name = match.group(1).strip()
        numbers = [part.strip() for part in match.group(2).split(":")[1:]]
        try:
            weights = [float(number) for number in numbers]
        except ValueError:
            weights = None
        if not name or weights is None or any(abs(w) > MAX_LORA_WEIGHT for w in weights):
            raise RequestError(field_name, f"LoRA tag '{match.group(0)}': write <lora:name>, <lora:name:weight> or "
                                           f"<lora:name:text_encoder_weight:unet_weight>, weights between "
                                           f"-{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}")
        if len(weights) == 2:
            specs.append(LoraSpec(name=name, weight=weights[1], text_encoder_weight=weights[0]))
        else:
            specs.append(LoraSpec(name=name, weight=weights[0] if weights else 1.0))
    if not specs:
        return text, []
    stripped = re.sub(r"[ \t]{2,}", " ", LORA_TAG.sub("", text)).strip()
    return stripped, specs


# A1111's upscaler names. Latent ones resize the latents before the second pass (torch's interpolate modes);
# pixel ones resize the decoded image; any other name is an upscaler model file (ESRGAN family, through spandrel)
# in the models folders' upscaler folder.
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")  # "None": a plain resize, as in A1111


class HiresFix(BaseModel):
    """A1111's hires fix: generate at the base size, upscale, then a second img2img pass at `denoising_strength`
    over the upscaled image (txt2img, img2img and ControlNet requests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(2.0, ge=1.0, le=4.0, description="A1111's hr_scale: the final size over the base size")
    width: int | None = Field(None, ge=8, description="A1111's hr_resize_x: the final width (overrides scale)")
    height: int | None = Field(None, ge=8, description="A1111's hr_resize_y: the final height (overrides scale)")
    upscaler: str = Field("Latent", min_length=1, description="a latent mode (" + ", ".join(LATENT_UPSCALERS) +
                                                              "), a pixel one (" + ", ".join(PIXEL_UPSCALERS) +
                                                              ") or an upscaler model file by name")
    steps: int = Field(0, ge=0, description="the second pass's steps; 0: as many as the first pass")
    denoising_strength: float = Field(0.7, gt=0.0, le=1.0, description="how much the second pass repaints")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The final size: hr_resize_x/y when given (one alone keeps the aspect ratio), else the base size times
        the scale; rounded down to a multiple of 8, as the VAE needs."""
        if self.width or self.height:
            target_w = self.width or round(width * self.height / height)
            target_h = self.height or round(height * self.width / width)
        else:
            target_w, target_h = round(width * self.scale), round(height * self.scale)
        return max(8, target_w // 8 * 8), max(8, target_h // 8 * 8)


class Outpaint(BaseModel):
    """Extend the canvas by these many pixels on each side (multiples of 8): the new area is masked, pre-filled
    from the edge (edge pixels stretched outwards, blurred and noised) and inpainted; the old pixels are kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    left: int = Field(0, ge=0, multiple_of=8)
    right: int = Field(0, ge=0, multiple_of=8)
    top: int = Field(0, ge=0, multiple_of=8)
    bottom: int = Field(0, ge=0, multiple_of=8)

    @property
    def extends(self) -> bool:
        return bool(self.left or self.right or self.top or self.bottom)


INPAINT_FILLS = ("original", "fill", "latent noise", "latent nothing")  # A1111's inpainting_fill 1, 0, 2, 3


class GenerationRequest(BaseModel):
    """Everything needed to produce images, for every mode. Unset sizes mean the model's native size."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=False)

    mode: Mode = Mode.txt2img
    model: str = Field("builtin:shapes", min_length=1, description="a listed model name (admins: also a folder, "
                                                                   "a checkpoint path or a hub id)")
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1)
    # 5: measured best on the default model (builtin:shapes: txt2img and inpainting both fall off above it; see
    # README's quality table) and diffusers' SDXL default; SD 1.5 users often pick 7 to 7.5.
    guidance: float = Field(5.0, ge=0.0, le=50.0)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="None or -1: random; the used seed is returned")
    scheduler: str = "Euler"
    batch_size: int = Field(1, ge=1)
    loras: list[LoraSpec] = Field(default_factory=list, description="also from <lora:name:weight> tags in the "
                                                                  "prompts, which are moved here")
    clip_skip: int = Field(1, ge=1, le=12, description="A1111's CLIP skip: 1 = the text encoder's last layer, "
                                                       "2 = the one before it, ...")
    vae: str | None = Field(None, min_length=1, description="a VAE by its listed name (admins: also a file or "
                                                            "folder path) for this request; default: the model's "
                                                            "own")
    step_cache: int = Field(1, ge=1, le=8, description="DeepCache-style step caching: the UNet's deep blocks run "
                                                       "on 1 of every N steps and their features are reused on the "
                                                       "rest (1: off, every step in full; 2-3: about 1.5-2x faster, "
                                                       "a slightly different image)")

    init_image: InputImage | None = None
    strength: float = Field(0.75, gt=0.0, le=1.0)

    mask_image: InputImage | None = None
    mask_blur: int = Field(4, ge=0, le=64)
    mask_grow: int = Field(0, ge=0, le=128)
    mask_invert: bool = Field(False, description="repaint the black area instead of the white")
    inpaint_area: Literal["whole", "masked"] = Field(
        "whole", description="'masked': crop the mask's box plus inpaint_padding, inpaint that crop at the output "
                             "size and paste it back (A1111's 'only masked', to fix a small part of a big image)")
    inpaint_padding: int = Field(32, ge=0, le=512, description="pixels around the mask's box ('masked' area)")
    inpaint_fill: Literal["original", "fill", "latent noise", "latent nothing"] = Field(
        "original", description="what the masked area starts from: the original pixels, the surroundings' colours, "
                                "noise latents or zero latents")
    outpaint: Outpaint | None = Field(None, description="inpaint mode: extend the canvas (the mask is then optional)")

    hires: HiresFix | None = Field(None, description="a second pass at a larger size (A1111's hires fix)")

    control_image: InputImage | None = None
    control_type: Literal["canny", "depth", "pose"] = "canny"
    control_preprocess: bool = Field(True, description="run the preprocessor; False: control_image is the map")
    canny_low: int = Field(100, ge=0, le=255)
    canny_high: int = Field(200, ge=0, le=255)
    controlnet: str | None = Field(None, description="a listed ControlNet name (admins: also a path); default: "
                                                     "the base's built-in for the type "
                                                     "(inpaint mode: its trained inpainting ControlNet, if any)")
    control_scale: float = Field(1.0, ge=0.0, le=2.0)
    control_start: float = Field(0.0, ge=0.0, le=1.0)
    control_end: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("mode", mode="before")
    @classmethod
    def _sdxl_is_txt2img(cls, mode: Any) -> Any:
        return Mode.txt2img if mode == "sdxl" else mode

    @field_validator("seed")
    @classmethod
    def _random_seed_marker(cls, seed: int | None) -> int | None:
        return None if seed == -1 else seed

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        if name not in SAMPLERS:
            raise ValueError(f"unknown scheduler; choose one of: {', '.join(SAMPLERS)}")
        return name

    @field_validator("mask_image")
    @classmethod
    def _mask_grayscale(cls, mask: Image.Image | None) -> Image.Image | None:
        if mask is None:
            return None
        if mask.mode in ("RGBA", "LA"):  # painted strokes live in the alpha channel
            return mask.getchannel("A")
        return mask.convert("L")

    @field_validator("init_image", "control_image")
    @classmethod
    def _rgb(cls, image: Image.Image | None) -> Image.Image | None:
        return None if image is None else image.convert("RGB")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "GenerationRequest":
        limits = _limits(info)
        # 0. <lora:name:weight> tags move from the prompts into `loras` (so a stored request holds them once).
        self._take_lora_tags()
        # 1. Sizes: multiples of 8 within the configured maximum.
        for name, maximum in (("width", limits.max_width), ("height", limits.max_height)):
            value = getattr(self, name)
            if value is not None and (value % 8 or value > maximum):
                raise RequestError(name, f"must be a multiple of 8 between 8 and {maximum} (got {value})")
        # 2. Counts and text lengths.
        if self.steps > limits.max_steps:
            raise RequestError("steps", f"must be between 1 and {limits.max_steps} (got {self.steps})")
        if self.batch_size > limits.max_batch_size:
            raise RequestError("batch_size", f"must be between 1 and {limits.max_batch_size} (got {self.batch_size})")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > limits.max_prompt_chars:
                raise RequestError(name, f"must be at most {limits.max_prompt_chars} characters")
        words = set(re.findall(r"[\w']+", self.prompt.lower()))
        for term in limits.blocked_terms:
            if (term.lower() in words) if " " not in term else (term.lower() in self.prompt.lower()):
                raise RequestError("prompt", f"contains the blocked term '{term}' (the studio's content filter)")
        # 3. Each mode's own inputs.
        outpainting = self.outpaint is not None and self.outpaint.extends
        needs = {
            Mode.img2img: ("init_image",),
            Mode.inpaint: ("init_image",) if outpainting else ("init_image", "mask_image"),
            Mode.controlnet: ("control_image",),
        }.get(self.mode, ())
        require_images = (info.context or {}).get("require_images", True)  # False: parameters read from a PNG
        for name in needs:
            if require_images and getattr(self, name) is None:
                raise RequestError(name, f"is required for mode '{self.mode.value}'")
        if self.mode in (Mode.img2img, Mode.inpaint) and int(self.steps * self.strength) < 1:
            raise RequestError("strength", f"with {self.steps} steps, strength {self.strength:g} runs no denoising "
                                           f"step (steps x strength < 1); raise steps or strength")
        if self.outpaint is not None and self.mode != Mode.inpaint:
            raise RequestError("outpaint", f"extends the canvas in mode 'inpaint' only (got '{self.mode.value}')")
        if self.hires is not None:
            self._check_hires(limits)
        if self.control_start >= self.control_end:
            raise RequestError("control_end", f"must be greater than control_start ({self.control_start})")
        if self.control_preprocess and self.control_type == "canny" and self.canny_low > self.canny_high:
            raise RequestError("canny_low", f"must not exceed canny_high ({self.canny_high})")
        return self

    def _check_hires(self, limits: Limits) -> None:
        if self.mode == Mode.inpaint:
            raise RequestError("hires", "is for txt2img, img2img and controlnet; to inpaint a big image in detail, "
                                        "use inpaint_area 'masked'")
        upscaler = self.hires.upscaler
        if not upscaler.strip() or any(ch in upscaler for ch in "\\\0") or ".." in upscaler.split("/"):
            raise RequestError("hires.upscaler", f"choose one of {', '.join([*LATENT_UPSCALERS, *PIXEL_UPSCALERS])} "
                                                 "or an upscaler model's name")
        if self.width is not None and self.height is not None:
            width, height = self.hires.target_size(self.width, self.height)
            for name, value, maximum in (("width", width, limits.max_width), ("height", height, limits.max_height)):
                if value > maximum:
                    given = [side for side in ("width", "height") if getattr(self.hires, side)]
                    field_name = f"hires.{name if len(given) != 1 else given[0]}" if given else "hires.scale"
                    raise RequestError(field_name, f"the final {name} {value} is more than the allowed {maximum}; "
                                                   f"lower {field_name}")
        steps = self.hires.steps or self.steps
        if steps > limits.max_steps:
            raise RequestError("hires.steps", f"must be between 0 and {limits.max_steps} (got {steps})")
        if int(steps * self.hires.denoising_strength) < 1:
            raise RequestError("hires.denoising_strength", f"with {steps} steps, strength "
                                                           f"{self.hires.denoising_strength:g} runs no denoising step")

    def _take_lora_tags(self) -> None:
        self.prompt, from_prompt = take_lora_tags(self.prompt, "prompt")
        self.negative_prompt, from_negative = take_lora_tags(self.negative_prompt, "negative_prompt")
        if not from_prompt and not from_negative:
            return
        seen = {lora.name for lora in self.loras}
        for spec in from_prompt + from_negative:
            if spec.name in seen:
                raise RequestError("prompt", f"LoRA '{spec.name}' is named twice (prompt tags and loras): keep one")
            seen.add(spec.name)
        self.loras = [*self.loras, *from_prompt, *from_negative]

    # -----------------------------------------------------------------------------------------------------------
    def parameters(self) -> dict[str, Any]:
        """The request as plain JSON without pixel data (images become digests): for metadata and cache keys."""
        data = self.model_dump(mode="json", exclude={"init_image", "mask_image", "control_image"})
        for name in ("init_image", "mask_image", "control_image"):
            image = getattr(self, name)
            if image is not None:
                data[f"{name}_sha256"] = image_digest(image)
        return data

    def batch_key(self) -> str | None:
        """Requests with equal keys can share one pipeline call, each with its own prompts and seeds (the job
        service's cross-user batching). None: this request runs alone (modes with per-request input images)."""
        if self.mode != Mode.txt2img:
            return None
        shared = {k: v for k, v in self.parameters().items() if k not in ("prompt", "negative_prompt", "seed",
                                                                          "batch_size")}
        shared["has_negative_prompt"] = bool(self.negative_prompt)  # SDXL encodes "no negative" as zeros
        return json.dumps(shared, sort_keys=True)


@dataclass(frozen=True)
class StepEvent:
    """Progress of one running request: sent after every denoising step."""

    step: int
    total: int
    elapsed_s: float
    eta_s: float
    preview: Image.Image | None = None


@dataclass
class Timings:
    load_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    total_s: float = 0.0

    @property
    def it_per_s(self) -> float:
        spent = sum(self.step_s)
        return len(self.step_s) / spent if spent > 0 else 0.0


@dataclass
class GenerationResult:
    request: GenerationRequest
    images: list[Image.Image]
    seeds: list[int]
    model_id: str
    timings: Timings
    peak_memory_bytes: int
    device: str
    cancelled: bool = False
    control_image: Image.Image | None = None
    blocked: list[int] = field(default_factory=list)  # images the model's safety checker replaced by a notice
    batched_with: int = 1  # requests that shared this pipeline call (1: ran alone)

    @property
    def seed(self) -> int:
        return self.seeds[0]


def default_of(field: str):
    """A GenerationRequest field's default, for the UI's and CLI's initial values (one source of truth)."""
    return GenerationRequest.model_fields[field].get_default(call_default_factory=True)
