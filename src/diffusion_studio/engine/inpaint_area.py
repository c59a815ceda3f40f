"""What an inpaint request paints on, and how its result goes back: outpainting's extended canvas, A1111's "only
masked" crop, the masked area's starting content (fill modes) and mask invert.

`plan_inpaint` turns a request into an `InpaintPlan`: the canvas (the full-size picture, old pixels as they were),
its feathered mask, and the image + mask the pipeline gets (the whole canvas, or the crop around the mask at the
output size). `InpaintPlan.finish` puts a generated image back: scaled into the crop's box, then pasted through the
feathered mask, so every pixel outside the mask is the original's, exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..requests import GenerationRequest, RequestError

# latent fills: a callable that decodes latents of a kind ("zeros" | "noise") at a size into an image (the runner
# gives one over the pipeline's VAE), so the masked area starts from what those latents look like after a VAE pass.
LatentDecoder = Callable[[str, tuple[int, int]], Image.Image]


@dataclass(frozen=True)
class InpaintPlan:
    canvas: Image.Image  # the full picture: the init image (resized, extended when outpainting)
    canvas_mask: Image.Image  # feathered, canvas-sized: white = repaint (what the paste uses)
    image: Image.Image  # what the pipeline starts from, at `size` (fill applied inside the mask)
    mask: Image.Image  # the pipeline's mask, at `size`
    box: tuple[int, int, int, int] | None  # the crop in canvas pixels (inpaint area "masked"); None: the whole canvas

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def finish(self, generated: Image.Image) -> Image.Image:
        """A generated image back into the canvas: outside the mask the canvas's own pixels, exactly."""
        full = generated
        if self.box is not None:
            left, top, right, bottom = self.box
            full = self.canvas.copy()
            full.paste(generated.resize((right - left, bottom - top), Image.LANCZOS), (left, top))
        return paste_outside_mask(full, self.canvas, self.canvas_mask)


def prepare_mask(mask: Image.Image, size: tuple[int, int], blur: int, grow: int, invert: bool = False) -> Image.Image:
    """Mask resized to the image (nearest, so edges stay hard), inverted if asked, grown by `grow` px, then
    feathered by `blur`. White = repaint, black = keep."""
    return Image.fromarray(_feather(_user_mask(mask, size, invert, grow), blur))


def paste_outside_mask(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Outside the (feathered) mask the original pixels come back exactly: the VAE round trip would blur them."""
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    mixed = np.asarray(generated, np.float32) * alpha + np.asarray(original, np.float32) * (1 - alpha)
    return Image.fromarray(mixed.round().astype(np.uint8))


def plan_inpaint(request: GenerationRequest, size: tuple[int, int], max_size: tuple[int, int],
                 decode: LatentDecoder | None = None, seed: int = 0) -> InpaintPlan:
    """The plan for an inpaint request whose output size is `size` (the request's, or the model's native size).

    - whole picture: the init image is resized to `size` (then extended by `outpaint`) and inpainted whole;
    - only masked: the init image keeps its own size; the mask's box plus `inpaint_padding`, widened to the
      output size's aspect ratio, is inpainted at `size` and scaled back into place."""
    import cv2
    masked_area = request.inpaint_area == "masked"
    canvas = request.init_image.convert("RGB")
    if not masked_area:
        canvas = canvas.resize(size, Image.LANCZOS)
    hard = _user_mask(request.mask_image, canvas.size, request.mask_invert, request.mask_grow)
    feathered = _feather(hard, request.mask_blur)
    pipeline_mask = feathered

    if request.outpaint is not None and request.outpaint.extends:
        canvas, new_area = extend_canvas(canvas, request.outpaint, seed)
        if canvas.width > max_size[0] or canvas.height > max_size[1]:
            raise RequestError("outpaint", f"the extended canvas is {canvas.width}x{canvas.height}, more than the "
                                           f"allowed {max_size[0]}x{max_size[1]}")
        hard = np.maximum(_pad(hard, request.outpaint), new_area)
        # The new area is feathered only inwards: the old pixels stay exactly as they were.
        inside = cv2.erode(new_area, np.ones((3, 3), np.uint8), iterations=request.mask_blur)
        feathered = np.maximum(_pad(feathered, request.outpaint), np.minimum(_feather(inside, request.mask_blur),
                                                                             new_area))
        pipeline_mask = np.maximum(feathered, hard)  # the whole new area is generated
    if not hard.any():
        raise RequestError("mask_image", "is empty: paint the area to repaint (white), or outpaint")

    canvas_mask = Image.fromarray(feathered)
    if not masked_area:
        start = fill_masked(canvas, hard, request.inpaint_fill, decode, seed)
        return InpaintPlan(canvas, canvas_mask, start, Image.fromarray(pipeline_mask), None)
    box = crop_box(hard, request.inpaint_padding, size, canvas.size)
    left, top, right, bottom = box
    crop = fill_masked(canvas.crop(box), hard[top:bottom, left:right], request.inpaint_fill, decode, seed)
    crop_mask = Image.fromarray(pipeline_mask).crop(box).resize(size, Image.BILINEAR)
    return InpaintPlan(canvas, canvas_mask, crop.resize(size, Image.LANCZOS), crop_mask, box)


def crop_box(mask: np.ndarray, padding: int, size: tuple[int, int],
             bounds: tuple[int, int]) -> tuple[int, int, int, int]:
    """The mask's bounding box grown by `padding`, then widened to `size`'s aspect ratio (so the crop is not
    stretched when scaled to it), kept within the image, as A1111's "only masked" does."""
    rows, cols = np.nonzero(mask)
    left, right = cols.min() - padding, cols.max() + 1 + padding
    top, bottom = rows.min() - padding, rows.max() + 1 + padding
    width, height = right - left, bottom - top
    ratio = size[0] / size[1]
    if width / height < ratio:
        grow = round(height * ratio) - width
        left, right = left - grow // 2, right + grow - grow // 2
    else:
        grow = round(width / ratio) - height
        top, bottom = top - grow // 2, bottom + grow - grow // 2
    left, right = _shift_into(left, right, bounds[0])
    top, bottom = _shift_into(top, bottom, bounds[1])
    return int(left), int(top), int(right), int(bottom)


def _shift_into(low: int, high: int, limit: int) -> tuple[int, int]:
    """An interval moved (not shrunk) to lie within [0, limit]; cut only when it is longer than the limit."""
    if high - low >= limit:
        return 0, limit
    if low < 0:
        return 0, high - low
    if high > limit:
        return limit - (high - low), limit
    return low, high


def extend_canvas(image: Image.Image, outpaint, seed: int) -> tuple[Image.Image, np.ndarray]:
    """The image with `outpaint`'s margins added, pre-filled from its edges: edge pixels stretched outwards,
    blurred more the further they go, with some noise (a flat colour would give the model nothing to continue),
    and the new area's mask (255 there)."""
    import cv2
    array = np.asarray(image)
    extended = cv2.copyMakeBorder(array, outpaint.top, outpaint.bottom, outpaint.left, outpaint.right,
                                  cv2.BORDER_REPLICATE)
    new_area = _pad(np.zeros(array.shape[:2], np.uint8), outpaint, value=255)
    sigma = max(outpaint.left, outpaint.right, outpaint.top, outpaint.bottom) / 4
    blurred = cv2.GaussianBlur(extended, (0, 0), sigmaX=sigma)
    noise = np.random.default_rng(seed).normal(0, 12, extended.shape)
    filled = np.where(new_area[..., None] > 0, np.clip(blurred + noise, 0, 255), extended).astype(np.uint8)
    return Image.fromarray(filled), new_area


def fill_masked(image: Image.Image, mask: np.ndarray, fill: str, decode: LatentDecoder | None,
                seed: int) -> Image.Image:
    """The picture the pipeline starts from, its masked area replaced as `fill` says (A1111's "masked content"):
    original keeps it; fill paints it from the surroundings (OpenCV's Telea inpainting, then blurred); latent
    noise / latent nothing put there what noise / zero latents decode to."""
    import cv2
    if fill == "original":
        return image
    array = np.asarray(image)
    if fill == "fill":
        painted = cv2.inpaint(array, mask, 5, cv2.INPAINT_TELEA)
        content = cv2.GaussianBlur(painted, (0, 0), sigmaX=max(2, min(image.size) / 32))
    else:
        if decode is None:
            raise RequestError("inpaint_fill", f"'{fill}' needs the model's VAE")
        content = np.asarray(decode("noise" if fill == "latent noise" else "zeros", image.size).convert("RGB"))
    inside = mask[..., None] > 0
    return Image.fromarray(np.where(inside, content, array).astype(np.uint8))


def _user_mask(mask: Image.Image | None, size: tuple[int, int], invert: bool, grow: int) -> np.ndarray:
    """The painted mask at `size`, hard (0 / 255), inverted if asked, grown by `grow` px (no mask: nothing)."""
    import cv2
    array = _hard(mask, size) if mask is not None else np.zeros(size[::-1], np.uint8)
    if invert:
        array = 255 - array
    if grow:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
        array = cv2.dilate(array, kernel)
    return array


def _hard(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    array = np.asarray(mask.convert("L").resize(size, Image.NEAREST))
    return np.where(array > 127, 255, 0).astype(np.uint8)


def _feather(array: np.ndarray, blur: int) -> np.ndarray:
    import cv2
    return cv2.GaussianBlur(array, (0, 0), sigmaX=blur) if blur else array


def _pad(array: np.ndarray, outpaint, value: int = 0) -> np.ndarray:
    import cv2
    return cv2.copyMakeBorder(array, outpaint.top, outpaint.bottom, outpaint.left, outpaint.right,
                              cv2.BORDER_CONSTANT, value=value)
