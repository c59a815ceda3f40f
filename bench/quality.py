"""Quality of the built-in models, measured by the shapes-world checker (no learned judge).

    python bench/quality.py [--prompts 200] [--only txt2img,img2img,inpaint,controlnet,xl]

Prints one line per figure:
- txt2img on builtin:shapes at default settings: colour+shape+background all right; position right where named.
- img2img at strength 0.5: the prompt's colour, with the source's shape and position kept.
- inpainting: pixels outside the mask unchanged (max abs difference), the masked region matching the prompt.
- ControlNet (builtin:shapes-canny): IoU of dilated canny edges of control vs result, and the prompt's colour.
- builtin:shapes-xl: colour, shape and background all right.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_studio.builtin.shapes import COLOURS, POSITIONS, ShapeSpec, check, random_spec, render  # noqa: E402
from diffusion_studio.cli import _quiet_libraries  # noqa: E402
from diffusion_studio.config import StudioConfig  # noqa: E402
from diffusion_studio.engine.runner import Engine  # noqa: E402
from diffusion_studio.requests import GenerationRequest  # noqa: E402


def prompts(count: int, seed: int = 1234) -> list[ShapeSpec]:
    rng = random.Random(seed)
    return [random_spec(rng) for _ in range(count)]


def generate(engine: Engine, specs: list[ShapeSpec], model: str, **fields) -> list[Image.Image]:
    images = []
    for index, spec in enumerate(specs):
        request = GenerationRequest(model=model, prompt=spec.caption, seed=index, **fields)
        images.append(engine.run(request).images[0])
    return images


def txt2img(engine: Engine, count: int, model: str = "builtin:shapes", label: str = "txt2img") -> None:
    specs = prompts(count)
    checks = [check(image, spec.caption) for image, spec in zip(generate(engine, specs, model), specs)]
    all_ok = sum(c.colour_ok and c.shape_ok and c.background_ok for c in checks) / len(checks)
    positioned = [c.position_ok for c in checks if c.position_ok is not None]
    print(f"{label}_colour_shape_background {all_ok:.3f}  ({model}, {len(checks)} prompts, default settings)")
    print(f"{label}_colour {np.mean([c.colour_ok for c in checks]):.3f}  shape {np.mean([c.shape_ok for c in checks]):.3f}"
          f"  background {np.mean([c.background_ok for c in checks]):.3f}")
    if positioned:
        print(f"{label}_position {np.mean(positioned):.3f}  ({len(positioned)} prompts naming a position)")


def img2img(engine: Engine, count: int) -> None:
    rng, passed = random.Random(7), 0
    for index, spec in enumerate(prompts(count, seed=99)):
        source = render(spec, rng=rng)
        other = rng.choice([c for c in COLOURS if c != spec.colour])
        target = ShapeSpec(other, spec.shape, spec.background, spec.position)
        request = GenerationRequest(mode="img2img", prompt=target.caption, init_image=source, strength=0.5,
                                    seed=index)
        result = check(engine.run(request).images[0], target.caption)
        passed += result.colour_ok and result.shape_ok and result.position_ok is not False
    print(f"img2img_recolour_keep_shape_position {passed / count:.3f}  (strength 0.5, {count} images)")


def inpaint(engine: Engine, count: int) -> None:
    rng, matched, worst = random.Random(8), 0, 0
    for index, spec in enumerate(prompts(count, seed=77)):
        spec = ShapeSpec(spec.colour, spec.shape, spec.background, spec.position or "center")
        empty = Image.new("RGB", (64, 64), tuple(int(v) for v in np.asarray(render(spec, rng=rng))[0, 0]))
        mask = Image.new("L", (64, 64), 0)
        cx, cy = {"top left": (18, 18), "top right": (46, 18), "bottom left": (18, 46), "bottom right": (46, 46),
                  "center": (32, 32)}[spec.position]
        mask.paste(255, (cx - 16, cy - 16, cx + 16, cy + 16))
        request = GenerationRequest(mode="inpaint", prompt=spec.caption, init_image=empty, mask_image=mask,
                                    mask_blur=0, strength=1.0, seed=index)
        image = engine.run(request).images[0]
        outside = np.asarray(mask) == 0
        worst = max(worst, int(np.abs(np.asarray(image, int) - np.asarray(empty, int))[outside].max()))
        matched += check(image, spec.caption).all_ok
    print(f"inpaint_region_matches_prompt {matched / count:.3f}  ({count} images)")
    print(f"inpaint_outside_mask_max_abs_diff {worst}  (0-255 scale; goal: small)")


def controlnet(engine: Engine, count: int) -> None:
    rng, ious, colours = random.Random(9), [], 0
    kernel = np.ones((5, 5), np.uint8)
    for index, spec in enumerate(prompts(count, seed=55)):
        control = render(spec, rng=rng)
        other = rng.choice(list(COLOURS))
        target = ShapeSpec(other, spec.shape, spec.background, spec.position)
        result = engine.run(GenerationRequest(mode="controlnet", prompt=target.caption, control_image=control,
                                              seed=index))
        edges = [cv2.dilate(np.asarray(image.convert("L")), kernel) > 0 for image in
                 (result.control_image, engine.control_preview(GenerationRequest(
                     mode="controlnet", control_image=result.images[0])))]
        ious.append((edges[0] & edges[1]).sum() / max((edges[0] | edges[1]).sum(), 1))
        colours += check(result.images[0], target.caption).colour_ok
    print(f"controlnet_edge_iou {np.mean(ious):.3f}  (dilated canny edges, {count} images)")
    print(f"controlnet_colour {colours / count:.3f}")


def position_words(engine: Engine, model: str = "builtin:shapes") -> None:
    """How differently the text encoder encodes captions that differ only in position (1.0: it can't tell them
    apart, and the UNet can't place shapes; this caught a collapsed encoder once)."""
    captions = [ShapeSpec("red", "circle", "white", position).caption for position in POSITIONS]
    with engine.manager.use(model) as (base, _), torch.inference_mode():
        pipe = base.pipeline
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        hidden = torch.nn.functional.normalize(pipe.text_encoder(ids)[0].flatten(1), dim=1)
    similarity = hidden @ hidden.T
    off_diagonal = similarity[~torch.eye(len(captions), dtype=torch.bool)]
    print(f"text_encoder_position_similarity {off_diagonal.mean():.4f}  (mean cosine between captions differing "
          f"only in position; near 1.0 means the position words have collapsed)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--only", default="position_words,txt2img,img2img,inpaint,controlnet,xl")
    args = parser.parse_args()
    _quiet_libraries()
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine(StudioConfig(data_dir=os.environ.get("DS_DATA_DIR", scratch), models_dir=scratch,
                                     preview_interval=0))
        for name, run in (("position_words", lambda: position_words(engine)),
                          ("txt2img", lambda: txt2img(engine, args.prompts)),
                          ("img2img", lambda: img2img(engine, max(20, args.prompts // 4))),
                          ("inpaint", lambda: inpaint(engine, max(20, args.prompts // 4))),
                          ("controlnet", lambda: controlnet(engine, max(20, args.prompts // 4))),
                          ("xl", lambda: txt2img(engine, max(20, args.prompts // 2), "builtin:shapes-xl", "xl"))):
            if name in parts:
                run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
