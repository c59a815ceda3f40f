"""How good the built-in models are, measured by the shapes-world checker (no learned judge).

One measurement per mode, each returning named figures; `bench/quality.py` prints them on 200+ prompts and
`tests/test_builtin_quality.py` asserts floors on small samples, so the bench and CI measure the same thing.
Every figure is a share of prompts in [0, 1] unless its name says otherwise. Seeds are fixed: a figure is
reproducible for given weights.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ..builtin.catalog import builtin_folder
from ..builtin.shapes import BACKGROUNDS, COLOURS, POSITIONS, ShapeSpec, blob_mask, check, nearest_template, random_spec, render
from ..config import StudioConfig
from ..engine.runner import Engine
from ..requests import GenerationRequest
from ..training.config import LORA_CROSS_ATTENTION_KV, TrainConfig
from ..training.trainer import Trainer

EDGE_DILATION = np.ones((5, 5), np.uint8)
CONTROL_CANNY = (30, 60)  # thresholds that find the outline of every shapes-world colour pair


def random_specs(count: int, seed: int) -> list[ShapeSpec]:
    rng = random.Random(seed)
    return [random_spec(rng) for _ in range(count)]


def _share(flags) -> float:
    flags = list(flags)
    return float(np.mean(flags)) if flags else float("nan")


def txt2img(engine: Engine, count: int, model: str = "builtin:shapes", seed: int = 1234) -> dict[str, float]:
    """Default settings, one random prompt per seed: colour + shape + background all right, each alone, and
    position where the prompt names one."""
    specs = random_specs(count, seed)
    checks = [check(engine.run(GenerationRequest(model=model, prompt=spec.caption, seed=index)).images[0],
                    spec.caption) for index, spec in enumerate(specs)]
    return {
        "colour_shape_background": _share(c.colour_shape_background_ok for c in checks),
        "colour": _share(c.colour_ok for c in checks),
        "shape": _share(c.shape_ok for c in checks),
        "background": _share(c.background_ok for c in checks),
        "position": _share(c.position_ok for c in checks if c.position_ok is not None),
        "positioned_prompts": sum(c.position_ok is not None for c in checks),
    }


def img2img(engine: Engine, count: int, seed: int = 99) -> dict[str, float]:
    """Strength 0.5 on a rendered shape, prompt naming another colour: the new colour with shape and position
    (where named) kept."""
    rng, passed = random.Random(seed), []
    for index, spec in enumerate(random_specs(count, seed)):
        source = render(spec, rng=rng)
        other = rng.choice([c for c in COLOURS if c != spec.colour])
        target = ShapeSpec(other, spec.shape, spec.background, spec.position)
        result = check(engine.run(GenerationRequest(mode="img2img", prompt=target.caption, init_image=source,
                                                    strength=0.5, seed=index)).images[0], target.caption)
        passed.append(result.colour_ok and result.shape_ok and result.position_ok is not False)
    return {"recolour_keep_shape_position": _share(passed)}


def inpaint(engine: Engine, count: int, seed: int = 77, control_scale: float = 1.0) -> dict[str, float]:
    """An empty background with a 32 px hole where the prompt's position is: the region must come out as the
    prompt says, and pixels outside the mask must not change (max abs difference, 0-255). builtin:shapes inpaints
    through its inpainting ControlNet when one is trained; `control_scale` 0 switches its effect off (the
    baseline: latent blending alone)."""
    rng, matched, worst = random.Random(seed), [], 0
    for index, spec in enumerate(random_specs(count, seed)):
        spec = ShapeSpec(spec.colour, spec.shape, spec.background, spec.position or "center")
        empty = Image.new("RGB", (64, 64), tuple(int(v) for v in np.asarray(render(spec, rng=rng))[0, 0]))
        mask = Image.new("L", (64, 64), 0)
        cx, cy = (round(fraction * 64) for fraction in POSITIONS[spec.position])  # the hole sits on the anchor
        mask.paste(255, (cx - 16, cy - 16, cx + 16, cy + 16))
        image = engine.run(GenerationRequest(mode="inpaint", prompt=spec.caption, init_image=empty,
                                             mask_image=mask, mask_blur=0, strength=1.0, seed=index,
                                             control_scale=control_scale)).images[0]
        outside = np.asarray(mask) == 0
        worst = max(worst, int(np.abs(np.asarray(image, int) - np.asarray(empty, int))[outside].max()))
        matched.append(check(image, spec.caption).all_ok)
    return {"region_matches_prompt": _share(matched), "outside_mask_max_abs_diff": float(worst)}


def controlnet(engine: Engine, count: int, model: str = "builtin:shapes", seed: int = 55,
               control_scale: float = 1.0) -> dict[str, float]:
    """Canny edges of a rendered shape as the control, a prompt naming a random colour: IoU of the dilated control
    edges and the dilated outline of the generated shape, and the prompt's colour.

    The control uses low canny thresholds: at the default 100/200 a third of the shapes-world colour pairs (green or
    blue on gray, yellow on white) give no edges at all, and an empty control can't be followed. The generated
    shape's outline comes from the checker's blob mask, not from canny of the output, so a result in a colour close
    to its background in brightness is not scored as edgeless. `control_scale` 0 gives the baseline: the prompt
    names the control's position, so the base model alone already overlaps it somewhat."""
    rng, ious, colours = random.Random(seed), [], []
    for index, spec in enumerate(random_specs(count, seed)):
        target = ShapeSpec(rng.choice(list(COLOURS)), spec.shape, spec.background, spec.position)
        result = engine.run(GenerationRequest(model=model, mode="controlnet", prompt=target.caption,
                                              control_image=render(spec, rng=rng), canny_low=CONTROL_CANNY[0],
                                              canny_high=CONTROL_CANNY[1], control_scale=control_scale,
                                              seed=index))
        control = cv2.dilate(np.asarray(result.control_image.convert("L")), EDGE_DILATION) > 0
        ious.append(_iou(control, cv2.dilate(_outline(blob_mask(result.images[0])), EDGE_DILATION) > 0))
        colours.append(check(result.images[0], target.caption).colour_ok)
    return {"edge_iou": float(np.mean(ious)), "colour": _share(colours)}


def _outline(mask: np.ndarray | None, size: int = 64) -> np.ndarray:
    if mask is None:
        return np.zeros((size, size), np.uint8)
    filled = mask.astype(np.uint8)
    return filled - cv2.erode(filled, np.ones((3, 3), np.uint8))  # the blob's one-pixel boundary


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def position_similarity(engine: Engine, model: str = "builtin:shapes") -> float:
    """Mean cosine between text-encoder outputs of captions differing only in position. Near 1.0 the position
    words have collapsed and the UNet cannot place shapes (this caught a collapsed encoder once)."""
    captions = [ShapeSpec("red", "circle", "white", position).caption for position in POSITIONS]
    with engine.manager.use(model) as (base, _), torch.inference_mode():
        pipe = base.pipeline
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        hidden = torch.nn.functional.normalize(pipe.text_encoder(ids)[0].flatten(1), dim=1)
    similarity = hidden @ hidden.T
    return float(similarity[~torch.eye(len(captions), dtype=torch.bool)].mean())


def heart_specs(count: int, seed: int) -> list[ShapeSpec]:
    rng = random.Random(seed)
    return [ShapeSpec(rng.choice(list(COLOURS)), "heart", rng.choice(list(BACKGROUNDS)),
                      rng.choice(list(POSITIONS))) for _ in range(count)]


def varied_heart_specs(count: int, seed: int) -> list[ShapeSpec]:
    """Hearts whose colours, backgrounds and positions each cycle through every value (in a seeded order), as a
    person choosing 8 example images would vary them: a random draw of 8 repeats some colours and misses others,
    and the LoRA then ties "heart" to the colours it saw."""
    rng = random.Random(seed)
    orders = [rng.sample(list(values), len(values)) for values in (COLOURS, BACKGROUNDS, POSITIONS)]
    return [ShapeSpec(orders[0][i % len(COLOURS)], "heart", orders[1][i % len(BACKGROUNDS)],
                      orders[2][i % len(POSITIONS)]) for i in range(count)]


def write_heart_dataset(folder: Path, count: int = 8, prior: int = 32, seed: int = 0, repeats: int = 4) -> Path:
    """`count` varied images of the new concept, each written `repeats` times (so it is drawn that much more
    often), plus `prior` ordinary shapes-world images that the base model already draws (DreamBooth's prior
    preservation: without them the LoRA drifts every prompt towards hearts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index, spec in enumerate(varied_heart_specs(count, seed)):
        image = render(spec, rng=rng)
        for copy in range(repeats):
            image.save(folder / f"heart{index}-{copy}.png")
            (folder / f"heart{index}-{copy}.txt").write_text(spec.caption)
    for index in range(prior):
        spec = random_spec(rng)
        render(spec, rng=rng).save(folder / f"prior{index}.png")
        (folder / f"prior{index}.txt").write_text(spec.caption)
    return folder


# The proof's recipe (bench/lora_proof.py measured the alternatives; README, "LoRA proof"): Custom Diffusion's
# choice of adapting only the cross-attention keys and values, plus LoRA on the text encoder so the new word's
# tokens (untrained character fallbacks: h, e, a, r, t) get an embedding of their own.
LORA_PROOF_SETTINGS = {"learning_rate": 1e-3, "lora_layers": list(LORA_CROSS_ATTENTION_KV),
                       "train_text_encoder": True, "lora_rank": 8, "lora_alpha": 8}


def lora_proof(work: Path, data_dir: Path, steps: int, prompts: int, seed: int = 0, prior: int = 32,
               repeats: int = 4, weights: tuple[float, ...] = (1.0,),
               **train_settings) -> dict[float, dict[str, float]]:
    """Teach builtin:shapes a shape it has never drawn ("heart") with a LoRA from 8 images, each shown `repeats`
    times beside `prior` ordinary ones (DreamBooth's prior preservation, hearts half of what it sees), then measure
    at each LoRA weight: heart prompts that draw a heart (template match) and ordinary prompts still right (colour
    + shape + background). Weight 0 is the base model itself. `train_settings` override LORA_PROOF_SETTINGS."""
    dataset = write_heart_dataset(work / "hearts", prior=prior, repeats=repeats)
    config = TrainConfig(base="builtin:shapes", method="lora", dataset=str(dataset), resolution=64, steps=steps,
                         batch_size=8, seed=seed, checkpoint_every=max(steps, 1), output_dir=work / "run",
                         **{**LORA_PROOF_SETTINGS, **train_settings})
    lora = Trainer(config, StableDiffusionPipeline.from_pretrained(builtin_folder("shapes", data_dir))).run()
    engine = Engine(StudioConfig(data_dir=data_dir, models_dir=work, preview_interval=0))
    hearts = [spec.caption for spec in heart_specs(prompts, seed=1000)]
    ordinary = random_specs(prompts, seed=2000)

    def measure(weight: float) -> dict[str, float]:
        def draw(prompt: str, index: int) -> Image.Image:
            loras = [{"name": str(lora), "weight": weight}] if weight else []
            return engine.run(GenerationRequest(prompt=prompt, seed=index, loras=loras)).images[0]

        return {"heart": _share(nearest_template(draw(prompt, i)) == "heart" for i, prompt in enumerate(hearts)),
                "base_kept": _share(check(draw(spec.caption, i), spec.caption).colour_shape_background_ok
                                    for i, spec in enumerate(ordinary))}

    return {weight: measure(weight) for weight in weights}


def hires(engine: Engine, count: int, seed: int = 1357, upscaler: str = "Latent",
          strength: float = 0.5) -> dict[str, float]:
    """Hires fix (64 -> 128 px) on random prompts: the final image (checked at the model's 64 px) still shows the
    prompt, and keeps the first pass's composition: the blob of the plain 64 px image and of the hires one, scaled
    down, overlap (IoU; 1 = the same shape in the same place)."""
    passed, ious = [], []
    for index, spec in enumerate(random_specs(count, seed)):
        plain = engine.run(GenerationRequest(prompt=spec.caption, seed=index)).images[0]
        big = engine.run(GenerationRequest(prompt=spec.caption, seed=index, hires={
            "upscaler": upscaler, "denoising_strength": strength})).images[0]
        assert big.size == (plain.width * 2, plain.height * 2), big.size
        small = big.resize(plain.size, Image.BILINEAR)
        passed.append(check(small, spec.caption).colour_shape_background_ok)
        first, second = blob_mask(plain), blob_mask(small)
        ious.append(_iou(first, second) if first is not None and second is not None else 0.0)
    return {"colour_shape_background": _share(passed), "composition_iou": float(np.mean(ious))}


def outpaint(engine: Engine, count: int, seed: int = 2468, margin: int = 16) -> dict[str, float]:
    """A rendered shape on its background, the canvas extended by `margin` px on every side: the old pixels
    must be exactly the same (max abs difference), the new border plausible background (its median within the
    checker's distance of the background colour), and the whole picture still checks out for its caption."""
    rng, worst, border_ok, whole_ok = random.Random(seed), 0, [], []
    for index, spec in enumerate(random_specs(count, seed)):
        spec = ShapeSpec(spec.colour, spec.shape, spec.background, "center")
        source = render(spec, 64 - 2 * margin, rng=rng)
        result = engine.run(GenerationRequest(mode="inpaint", prompt=spec.caption, init_image=source,
                                              width=source.width, height=source.height, strength=1.0, seed=index,
                                              outpaint={"left": margin, "right": margin, "top": margin,
                                                        "bottom": margin})).images[0]
        pixels = np.asarray(result, int)
        kept = pixels[margin:-margin, margin:-margin]
        worst = max(worst, int(np.abs(kept - np.asarray(source, int)).max()))
        ring = np.ones(pixels.shape[:2], bool)
        ring[margin:-margin, margin:-margin] = False
        distance = np.linalg.norm(np.median(pixels[ring], axis=0) - np.array(BACKGROUNDS[spec.background]))
        border_ok.append(distance < 60)
        whole_ok.append(check(result, spec.caption).colour_shape_background_ok)
    return {"kept_max_abs_diff": float(worst), "border_is_background": _share(border_ok),
            "colour_shape_background": _share(whole_ok)}


def inpaint_only_masked(engine: Engine, count: int, seed: int = 3579, size: int = 128) -> dict[str, float]:
    """A big (`size` px) empty background with a 24 px hole; "only masked" inpaints the hole's box plus padding
    at the model's 64 px and pastes it back: outside the mask every pixel is the original's (max abs
    difference), and the repainted region, cut out, shows the prompt (checked as a centred shape)."""
    rng, worst, matched = random.Random(seed), 0, []
    for index, spec in enumerate(random_specs(count, seed)):
        spec = ShapeSpec(spec.colour, spec.shape, spec.background, "center")
        colour = tuple(int(v) for v in np.asarray(render(spec, rng=rng))[0, 0])
        empty = Image.new("RGB", (size, size), colour)
        cx, cy = rng.randrange(24, size - 24), rng.randrange(24, size - 24)
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (cx - 12, cy - 12, cx + 12, cy + 12))
        result = engine.run(GenerationRequest(mode="inpaint", prompt=spec.caption, init_image=empty, mask_image=mask,
                                              mask_blur=0, strength=1.0, seed=index, inpaint_area="masked",
                                              inpaint_padding=4)).images[0]
        assert result.size == empty.size, result.size
        outside = np.asarray(mask) == 0
        worst = max(worst, int(np.abs(np.asarray(result, int) - np.asarray(empty, int))[outside].max()))
        region = result.crop((cx - 16, cy - 16, cx + 16, cy + 16)).resize((64, 64), Image.BILINEAR)
        matched.append(check(region, spec.caption).colour_ok)
    return {"outside_mask_max_abs_diff": float(worst), "region_colour": _share(matched)}
