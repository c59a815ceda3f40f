"""X/Y comparison grids: which request fields an axis varies, how axis values are read, and the grid image.

Every cell is a real generation (the Compare tab submits them all as jobs); this module only plans the cells and
draws the result with labels and each cell's time.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..requests import RequestError
from ..samplers import SAMPLERS

# axis name -> how to read one value
AXES: dict[str, Any] = {
    "steps": int, "guidance": float, "scheduler": str, "seed": int, "strength": float, "lora weight": float,
    "prompt S/R": str,
}


def axis_values(axis: str, text: str, field: str) -> list:
    """Comma-separated values for `axis`; errors name the form field. For 'prompt S/R' the first value is the
    text searched in the prompt and every value (the first included) replaces it."""
    if axis not in AXES:
        raise RequestError(field, f"unknown axis '{axis}'; choose one of: {', '.join(AXES)}")
    parts = [part.strip() for part in (text or "").split(",") if part.strip()]
    if not parts:
        raise RequestError(field, f"give comma-separated values for {axis}")
    try:
        values = [AXES[axis](part) for part in parts]
    except ValueError:
        raise RequestError(field, f"values for {axis} must be {AXES[axis].__name__}s (got '{text}')") from None
    if axis == "scheduler":
        unknown = [v for v in values if v not in SAMPLERS]
        if unknown:
            raise RequestError(field, f"unknown scheduler {unknown[0]!r}; choose from: {', '.join(SAMPLERS)}")
    return values


def apply_axis(fields: dict, axis: str, value: Any, values: list, field: str) -> dict:
    """`fields` with one axis set to `value`."""
    fields = dict(fields)
    if axis == "prompt S/R":
        if values[0] not in fields["prompt"]:
            raise RequestError(field, f"'{values[0]}' (the first value) does not occur in the prompt")
        fields["prompt"] = fields["prompt"].replace(values[0], value)
    elif axis == "lora weight":
        if not fields.get("loras"):
            raise RequestError(field, "the lora weight axis needs a LoRA chosen in the parameters")
        fields["loras"] = [{**lora, "weight": value} for lora in fields["loras"]]
    else:
        fields[axis] = value
    return fields


def plan_cells(fields: dict, x_axis: str, x_text: str, y_axis: str | None, y_text: str) -> tuple[list, list, list]:
    """(x values, y values, rows of cell fields). Without a y axis there is one row."""
    x_values = axis_values(x_axis, x_text, "x_values")
    y_values = axis_values(y_axis, y_text, "y_values") if y_axis else [None]
    rows = []
    for y in y_values:
        row_fields = apply_axis(fields, y_axis, y, y_values, "y_values") if y_axis else fields
        rows.append([apply_axis(row_fields, x_axis, x, x_values, "x_values") for x in x_values])
    return x_values, y_values, rows


def draw_grid(images: list[list[Image.Image]], x_labels: list[str], y_labels: list[str],
              notes: list[list[str]]) -> Image.Image:
    """One image: column labels on top, row labels on the left, each cell's note (its time) under it."""
    font = ImageFont.load_default()
    cell_w = max(image.width for row in images for image in row)
    cell_h = max(image.height for row in images for image in row)
    cell_w, cell_h = max(cell_w, 96), max(cell_h, 64)
    top, left, under = 24, (110 if any(y_labels) else 8), 14
    grid = Image.new("RGB", (left + cell_w * len(x_labels), top + (cell_h + under) * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(x_labels):
        draw.text((left + column * cell_w + 4, 6), label[:18], fill="black", font=font)
    for row_index, row in enumerate(images):
        y = top + row_index * (cell_h + under)
        if y_labels[row_index]:
            draw.text((4, y + cell_h // 2 - 6), y_labels[row_index][:16], fill="black", font=font)
        for column, image in enumerate(row):
            x = left + column * cell_w
            grid.paste(image, (x + (cell_w - image.width) // 2, y + (cell_h - image.height) // 2))
            draw.text((x + 4, y + cell_h + 1), notes[row_index][column], fill="#555555", font=font)
    return grid
