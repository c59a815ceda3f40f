"""Floors on the committed built-in models, measured by the shapes-world checker on small samples, so that a
broken model fails CI. bench/quality.py measures the real bar on 200+ prompts; the README records both."""

import random

import pytest

from diffusion_studio.builtin.catalog import COMMITTED_DIR
from diffusion_studio.builtin.shapes import check, random_spec
from diffusion_studio.requests import GenerationRequest

# Raised as training progresses; each sits well under what bench/quality.py measured for the committed weights
# (see README, "Built-in model quality"). A random or broken model scores ~0 on all of them.
FLOORS = {"txt2img_colour_shape_background": 0.7}

needs_trained = pytest.mark.skipif(not (COMMITTED_DIR / "shapes").is_dir(),
                                   reason="no trained builtin:shapes committed")


@needs_trained
def test_shapes_txt2img_floor(engine):
    rng = random.Random(4321)
    specs = [random_spec(rng) for _ in range(20)]
    checks = [check(engine.run(GenerationRequest(prompt=spec.caption, seed=i)).images[0], spec.caption)
              for i, spec in enumerate(specs)]
    share = sum(c.colour_ok and c.shape_ok and c.background_ok for c in checks) / len(checks)
    assert share >= FLOORS["txt2img_colour_shape_background"], [c for c in checks if not c.all_ok][:3]
