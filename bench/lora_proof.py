"""LoRA proof: teach builtin:shapes a shape it has never seen ("heart") from 8 images, then measure.

    python bench/lora_proof.py [--steps 500] [--prompts 30]

Prints: heart prompts that produce a heart (template match, goal >= 0.6) and base prompts still right with the
LoRA loaded (checker, goal >= 0.8). tests/test_lora_proof.py runs a short version.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import StableDiffusionPipeline  # noqa: E402

from diffusion_studio.builtin.catalog import builtin_folder  # noqa: E402
from diffusion_studio.builtin.shapes import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    ShapeSpec,
    check,
    nearest_template,
    random_spec,
    render,
)
from diffusion_studio.config import StudioConfig  # noqa: E402
from diffusion_studio.engine.runner import Engine  # noqa: E402
from diffusion_studio.requests import GenerationRequest  # noqa: E402
from diffusion_studio.training.config import TrainConfig  # noqa: E402
from diffusion_studio.training.trainer import Trainer  # noqa: E402


def heart_specs(count: int, seed: int) -> list[ShapeSpec]:
    rng = random.Random(seed)
    return [ShapeSpec(rng.choice(list(COLOURS)), "heart", rng.choice(list(BACKGROUNDS)),
                      rng.choice(list(POSITIONS))) for _ in range(count)]


def write_dataset(folder: Path, count: int = 8, prior: int = 8, seed: int = 0) -> Path:
    """`count` images of the new concept, plus `prior` ordinary shapes-world images that the base model already
    draws (DreamBooth's prior preservation: without them the LoRA drifts every prompt towards hearts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index, spec in enumerate(heart_specs(count, seed)):
        render(spec, rng=rng).save(folder / f"heart{index}.png")
        (folder / f"heart{index}.txt").write_text(spec.caption)
    for index in range(prior):
        spec = random_spec(rng)
        render(spec, rng=rng).save(folder / f"prior{index}.png")
        (folder / f"prior{index}.txt").write_text(spec.caption)
    return folder


def prove(work: Path, data_dir: Path, steps: int, prompts: int, seed: int = 0,
          learning_rate: float = 4e-4) -> dict[str, float]:
    dataset = write_dataset(work / "hearts")
    base = builtin_folder("shapes", data_dir)
    config = TrainConfig(base="builtin:shapes", method="lora", dataset=str(dataset), resolution=64, steps=steps,
                         batch_size=8, learning_rate=learning_rate, lora_rank=8, lora_alpha=8, seed=seed,
                         checkpoint_every=max(steps, 1), output_dir=work / "run")
    lora = Trainer(config, StableDiffusionPipeline.from_pretrained(base)).run()
    engine = Engine(StudioConfig(data_dir=data_dir, models_dir=work, preview_interval=0))
    loras = [{"name": str(lora), "weight": 1.0}]
    heart_prompts = [spec.caption for spec in heart_specs(prompts, seed=1000)]
    hearts = [engine.run(GenerationRequest(prompt=prompt, seed=i, loras=loras)).images[0]
              for i, prompt in enumerate(heart_prompts)]
    without = [engine.run(GenerationRequest(prompt=prompt, seed=i)).images[0] for i, prompt in enumerate(heart_prompts)]
    rng = random.Random(2000)
    base_specs = [random_spec(rng) for _ in range(prompts)]
    kept = [check(engine.run(GenerationRequest(prompt=spec.caption, seed=i, loras=loras)).images[0], spec.caption)
            for i, spec in enumerate(base_specs)]
    return {"heart": sum(nearest_template(image) == "heart" for image in hearts) / prompts,
            "heart_without_lora": sum(nearest_template(image) == "heart" for image in without) / prompts,
            "base_kept": sum(c.colour_ok and c.shape_ok and c.background_ok for c in kept) / prompts}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=4e-4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        result = prove(Path(scratch), Path(os.environ.get("DS_DATA_DIR", scratch)), args.steps, args.prompts,
                       learning_rate=args.learning_rate)
    print(f"lora_heart_prompts_make_hearts {result['heart']:.3f}  (template match, {args.prompts} prompts, "
          f"{args.steps} steps on 8 images + 8 prior images; goal >= 0.6; without the LoRA "
          f"{result['heart_without_lora']:.3f})")
    print(f"lora_base_prompts_still_right {result['base_kept']:.3f}  (checker colour+shape+background; goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
