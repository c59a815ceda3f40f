"""Shapes world: an endless, seeded, captioned dataset of one flat shape on a flat background, and a checker that
decides from pixels alone (OpenCV/numpy) whether an image matches a caption of that grammar.

Caption grammar: `a {colour} {shape} on a {background} background` + optional ` at the {corner}` / ` in the center`.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 35),
    "purple": (145, 55, 185),
    "orange": (245, 135, 25),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (12, 12, 12), "gray": (128, 128, 128)}
# Shape centres as fractions of the image side.
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
CAPTION = re.compile(
    rf"^an? (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)}) on an? (?P<background>"
    rf"{'|'.join(BACKGROUNDS)}) background(?: (?:at the (?P<corner>top left|top right|bottom left|bottom right)"
    rf"|in the (?P<center>center)))?$"
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    background: str
    position: str | None  # None: not named in the caption (the shape still sits at one of the positions)

    @property
    def caption(self) -> str:
        text = f"a {self.colour} {self.shape} on a {self.background} background"
        if self.position == "center":
            return text + " in the center"
        if self.position:
            return text + f" at the {self.position}"
        return text


def parse_caption(caption: str) -> ShapeSpec:
    match = CAPTION.match(caption.strip().lower())
    if not match:
        raise ValueError(f"'{caption}' is not a shapes-world caption: 'a {{colour}} {{shape}} on a {{background}} "
                         "background' [+ 'at the {corner}' | 'in the center']")
    return ShapeSpec(match["colour"], match["shape"], match["background"], match["corner"] or match["center"])


def random_spec(rng: random.Random, position_probability: float = 0.7) -> ShapeSpec:
    position = rng.choice(list(POSITIONS)) if rng.random() < position_probability else None
    return ShapeSpec(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS)), position)


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 8) -> tuple[int, ...]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in colour)


def shape_points(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]] | None:
    """Polygon vertices for a shape (None for a circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        half = radius * 0.85
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    points = []  # star: five outer and five inner vertices
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.42
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def heart_points(cx: float, cy: float, radius: float, count: int = 64) -> list[tuple[float, float]]:
    """A heart: a shape outside the vocabulary, for teaching a model a new word (the LoRA proof)."""
    points = []
    for k in range(count):
        t = 2 * math.pi * k / count
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((cx + radius * x / 17, cy - radius * (y + 2.5) / 17))
    return points


def render(spec: ShapeSpec, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw `spec` at `size` px (4x supersampled, so edges are smooth). Size, placement and colours jitter."""
    rng = rng or random.Random(0)
    scale = 4
    big = size * scale
    image = Image.new("RGB", (big, big), _jitter(BACKGROUNDS[spec.background], rng, 6))
    position = spec.position or rng.choice(list(POSITIONS))
    fx, fy = POSITIONS[position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * big
    cy = (fy + rng.uniform(-0.04, 0.04)) * big
    radius = rng.uniform(0.15, 0.2) * big
    fill = _jitter(COLOURS[spec.colour], rng)
    draw = ImageDraw.Draw(image)
    points = heart_points(cx, cy, radius) if spec.shape == "heart" else shape_points(spec.shape, cx, cy, radius)
    if points is None:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(points, fill=fill)
    return image.resize((size, size), Image.BOX)


class ShapesWorld:
    """Endless seeded samples: `batch(n)` gives n (image, caption) pairs; the same seed gives the same stream."""

    def __init__(self, seed: int = 0, size: int = 64, position_probability: float = 0.7):
        self.rng = random.Random(seed)
        self.size = size
        self.position_probability = position_probability

    def sample(self) -> tuple[Image.Image, str]:
        spec = random_spec(self.rng, self.position_probability)
        return render(spec, self.size, self.rng), spec.caption

    def batch(self, count: int) -> tuple[list[Image.Image], list[str]]:
        pairs = [self.sample() for _ in range(count)]
        return [p[0] for p in pairs], [p[1] for p in pairs]


# ---------------------------------------------------------------------------------------------------------------
# The checker


@dataclass(frozen=True)
class Check:
    """What the checker saw, and whether each named attribute matches the caption (position None: not named)."""

    colour: str | None
    shape: str | None
    background: str
    position: str | None
    colour_ok: bool
    shape_ok: bool
    background_ok: bool
    position_ok: bool | None

    @property
    def colour_shape_background_ok(self) -> bool:
        return self.colour_ok and self.shape_ok and self.background_ok

    @property
    def all_ok(self) -> bool:
        return self.colour_shape_background_ok and self.position_ok is not False


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(value - np.array(palette[n], float)) for n in names]
    return names[int(np.argmin(distances))]


def classify_shape(mask: np.ndarray) -> str | None:
    """circle / square / triangle / star from a binary mask of one blob, by its geometry."""
    import cv2
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(contour)
    if area < 12:
        return None
    hull_area = cv2.contourArea(cv2.convexHull(contour))
    solidity = area / max(hull_area, 1e-6)
    if solidity < 0.78:
        return "star"
    # Fill ratio of the smallest enclosing shapes: a square fills its rotated rectangle, a triangle its
    # triangle, a circle its circle.
    (_, _), (w, h), _ = cv2.minAreaRect(contour)
    rect_fill = area / max(w * h, 1e-6)
    triangle_area, _ = cv2.minEnclosingTriangle(contour)
    triangle_fill = area / max(float(triangle_area), 1e-6)
    _, radius = cv2.minEnclosingCircle(contour)
    circle_fill = area / max(math.pi * radius * radius, 1e-6)
    scores = {"square": rect_fill, "triangle": triangle_fill, "circle": circle_fill}
    return max(scores, key=scores.get)


def _background_and_blob(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The background colour (median of a 3-px border ring) and the largest region far from it (the shape), or
    None when there is no region of at least 1% of the image."""
    import cv2
    ring = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3), pixels[:, :3].reshape(-1, 3),
                           pixels[:, -3:].reshape(-1, 3)])
    background = np.median(ring, axis=0)
    foreground = (np.linalg.norm(pixels - background, axis=-1) > 60).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count < 2:
        return background, None
    mask = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return background, (mask if mask.sum() >= 0.01 * mask.size else None)


def blob_mask(image: Image.Image) -> np.ndarray | None:
    return _background_and_blob(np.asarray(image.convert("RGB"), dtype=np.float32))[1]


def _normalised(mask: np.ndarray, size: int = 32) -> np.ndarray:
    import cv2
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA) > 127


def nearest_template(image: Image.Image, shapes: tuple[str, ...] = (*SHAPES, "heart")) -> str | None:
    """Which shape's template (rendered, cropped to its box) the image's blob overlaps most (IoU): a simple
    template match that also knows shapes the checker's geometry rules don't."""
    mask = blob_mask(image)
    if mask is None:
        return None
    blob = _normalised(mask)
    scores = {}
    for shape in shapes:
        template = _normalised(np.asarray(render(ShapeSpec("red", shape, "white", "center"), 128).convert("L")) < 200)
        scores[shape] = (blob & template).sum() / max((blob | template).sum(), 1)
    return max(scores, key=scores.get)


def check(image: Image.Image, caption: str) -> Check:
    import cv2
    spec = parse_caption(caption)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    background_rgb, mask = _background_and_blob(pixels)
    background = _nearest(background_rgb, BACKGROUNDS)
    colour = shape = position = None
    if mask is not None:
        # Colour: median of the blob's interior (edges are blended with the background).
        interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        colour = _nearest(np.median(pixels[interior if interior.sum() > 4 else mask], axis=0), COLOURS)
        shape = classify_shape(mask)
        # Position: the anchor nearest to the blob's centroid.
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Check(
        colour=colour, shape=shape, background=background, position=position,
        colour_ok=colour == spec.colour, shape_ok=shape == spec.shape, background_ok=background == spec.background,
        position_ok=None if spec.position is None else position == spec.position,
    )
