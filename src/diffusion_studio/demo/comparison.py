"""create_parameter_comparison's parts: what is compared (an image, a request), which request field a parameter
name means, one cell's fields per value, and the result (the seed's list of images, plus the labelled grid).

The cells are planned with the Compare tab's `apply_axis` and drawn with its `draw_grid` (service/compare.py), so
the Python API's grid is the Compare tab's, not a second one.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from ..engine.metadata import read_png_text, request_from_png
from ..requests import GenerationRequest
from ..service.compare import AXES, apply_axis

# The seed's parameter names (and diffusers') -> GenerationRequest fields; any other field name is taken as is.
PARAMETER_FIELDS = {
    "num_steps": "steps", "num_inference_steps": "steps", "guidance_scale": "guidance",
    "controlnet_conditioning_scale": "control_scale", "negative_prompt": "negative_prompt",
}
# Fields that change nothing outside these modes: comparing them elsewhere would make N equal images.
MODE_FIELDS = {"strength": ("img2img", "inpaint"), "mask_blur": ("inpaint",), "mask_grow": ("inpaint",),
               "inpaint_padding": ("inpaint",), "inpaint_fill": ("inpaint",), "control_scale": ("controlnet",),
               "control_start": ("controlnet",), "control_end": ("controlnet",), "control_type": ("controlnet",),
               "canny_low": ("controlnet",), "canny_high": ("controlnet",)}
NOT_COMPARED = {"mode", "batch_size", "init_image", "mask_image", "control_image"}
LABEL_CHARS = 18  # what draw_grid shows of a column label


class ParameterComparison(list):
    """The seed returned a list of images, one per value: so is this one, each a real generation of its value.
    Beside them: `grid` (one image, each column labelled with the parameter and its value, its time under it),
    `parameter`, `values`, `seed` (shared by every cell) and `status`."""

    def __init__(self, images: list[Image.Image], grid: Image.Image, parameter: str, values: list, seed: int | None,
                 status: str):
        super().__init__(images)
        self.grid = grid
        self.parameter = parameter
        self.values = list(values)
        self.seed = seed
        self.status = status


def parameter_field(parameter_name: str) -> str:
    """The request field (or Compare axis) a parameter name varies; ValueError naming `parameter_name` if none."""
    field = PARAMETER_FIELDS.get(parameter_name, parameter_name)
    if field in AXES or (field in GenerationRequest.model_fields and field not in NOT_COMPARED):
        return field
    known = sorted({*PARAMETER_FIELDS, *AXES, *(set(GenerationRequest.model_fields) - NOT_COMPARED)})
    raise ValueError(f"parameter_name: {parameter_name!r} is not a parameter a comparison can vary; one of: "
                     f"{', '.join(known)}")


def base_fields(base: Any, prompt: str | None) -> dict[str, Any]:
    """The request fields every cell starts from:
    - a GenerationRequest, or a dict of its fields (the seed's names num_steps / guidance_scale work too);
    - an image this studio made (its PNG carries its request): that txt2img request again, so the comparison
      shows what the parameter does to that very image;
    - any other image: image to image from it (give `prompt`)."""
    if isinstance(base, GenerationRequest):
        fields = base.model_dump()
    elif isinstance(base, dict):
        fields = {PARAMETER_FIELDS.get(name, name): value for name, value in base.items()}
    elif isinstance(base, Image.Image):
        fields = _image_fields(base)
    else:
        raise TypeError(f"base_image: give an image, a GenerationRequest or a dict of its fields (got "
                        f"{type(base).__name__})")
    if prompt is not None:
        fields["prompt"] = prompt
    return fields


def _image_fields(image: Image.Image) -> dict[str, Any]:
    carried = None
    if read_png_text(image):
        try:
            carried = request_from_png(image)
        except ValueError:  # a PNG with text chunks that are not generation parameters
            carried = None
    if carried is not None and carried.mode.value == "txt2img":
        return {k: v for k, v in carried.parameters().items() if not k.endswith("_sha256")}
    fields: dict[str, Any] = {"mode": "img2img", "init_image": image.convert("RGB")}
    if carried is not None:  # another mode's image: its input images are not in the PNG, so start from this one
        fields |= {"prompt": carried.prompt, "negative_prompt": carried.negative_prompt, "model": carried.model}
    return fields


def cell_fields(fields: dict[str, Any], parameter_name: str, field: str, values: list) -> list[dict[str, Any]]:
    """One cell's fields per value (the Compare tab's apply_axis; its errors name `values`)."""
    if not values:
        raise ValueError("values: give at least one value to compare")
    modes = MODE_FIELDS.get(field)
    mode = str(getattr(fields.get("mode"), "value", fields.get("mode") or "txt2img"))
    if modes and mode not in modes:
        raise ValueError(f"parameter_name: {parameter_name} changes nothing in {mode} (only in "
                         f"{' / '.join(modes)}); compare it from an input image or a request of that mode")
    return [apply_axis(fields, field, value, values, "values") for value in values]


def label(parameter_name: str, field: str, value: Any) -> str:
    """'guidance_scale=7.5', or the shorter field name when the seed's name would not fit a column."""
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    text = f"{parameter_name}={shown}"
    return text if len(text) <= LABEL_CHARS else f"{field}={shown}"
