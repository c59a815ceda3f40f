"""Shapes world: captions follow the grammar, renders are seeded, and the checker is right on ground truth."""

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusion_studio.builtin.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    ShapesWorld,
    check,
    parse_caption,
    render,
)


def test_same_seed_same_stream():
    a, b = ShapesWorld(seed=3).batch(5), ShapesWorld(seed=3).batch(5)
    assert a[1] == b[1]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[0], b[0]))
    assert ShapesWorld(seed=4).batch(5)[1] != a[1]


def test_vocabulary_and_grammar():
    assert set(SHAPES) == {"circle", "square", "triangle", "star"}
    assert set(COLOURS) == {"red", "green", "blue", "yellow", "purple", "orange"}
    assert set(BACKGROUNDS) == {"white", "black", "gray"}
    assert set(POSITIONS) == {"top left", "top right", "bottom left", "bottom right", "center"}
    captions = ShapesWorld(seed=0).batch(300)[1]
    assert any(" at the " in c for c in captions) and any(c.endswith(" in the center") for c in captions)
    assert any(c.endswith("background") for c in captions)
    for caption in captions:
        assert parse_caption(caption).caption == caption
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_caption("a red hexagon on a white background")


def test_checker_is_right_on_ground_truth():
    world = ShapesWorld(seed=11)
    results = [check(*world.sample()).all_ok for _ in range(600)]
    assert sum(results) / len(results) >= 0.99


def test_checker_survives_blur_and_noise():
    world, rng = ShapesWorld(seed=12), np.random.default_rng(0)
    correct = 0
    for _ in range(200):
        image, caption = world.sample()
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=float)
        noisy = np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)
        correct += check(Image.fromarray(noisy), caption).all_ok
    assert correct / 200 >= 0.97


def test_checker_catches_each_wrong_attribute():
    image = render(ShapeSpec("red", "star", "white", "top left"), rng=random.Random(1))
    right = check(image, "a red star on a white background at the top left")
    assert right.all_ok and (right.colour, right.shape, right.background, right.position) == (
        "red", "star", "white", "top left")
    assert not check(image, "a blue star on a white background").colour_ok
    assert not check(image, "a red circle on a white background").shape_ok
    assert not check(image, "a red star on a black background").background_ok
    assert check(image, "a red star on a white background at the bottom right").position_ok is False
    assert check(image, "a red star on a white background").position_ok is None
    blank = Image.new("RGB", (64, 64), (250, 250, 250))
    empty = check(blank, "a red star on a white background")
    assert empty.background_ok and empty.shape is None and not empty.all_ok


def test_template_match_knows_a_shape_outside_the_vocabulary():
    from diffusion_studio.builtin.shapes import nearest_template

    rng = random.Random(5)
    for shape in (*SHAPES, "heart"):
        for _ in range(10):
            spec = ShapeSpec(rng.choice(list(COLOURS)), shape, rng.choice(list(BACKGROUNDS)),
                             rng.choice(list(POSITIONS)))
            assert nearest_template(render(spec, rng=rng)) == shape
    assert nearest_template(Image.new("RGB", (64, 64), "white")) is None
