"""LoRA proof: teach builtin:shapes a shape it has never seen ("heart") from 8 images, then measure.

    python bench/lora_proof.py [--steps 500] [--prompts 30] [--prior 32] [--repeats 4] [--learning-rate 1e-3]
                               [--lora-layers attn2.to_k,attn2.to_v] [--no-text-encoder] [--weights 0,0.9,1]

Prints, at each LoRA weight (0: the base model): heart prompts that produce a heart (template match, goal >= 0.6)
and base prompts still right with the LoRA loaded (checker, goal >= 0.8). The measurement
is `diffusion_studio.workshop.quality.lora_proof` (its recipe: LORA_PROOF_SETTINGS); tests/test_lora_proof.py runs
a short version.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_studio.workshop.quality import lora_proof  # noqa: E402
from diffusion_studio.cli import _quiet_libraries  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--prior", type=int, default=32, help="ordinary images beside the 8 hearts")
    parser.add_argument("--repeats", type=int, default=4, help="times each heart image is in the dataset")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--lora-layers", help="comma-separated UNet modules (default: the proof's recipe)")
    parser.add_argument("--no-text-encoder", action="store_true", help="adapt the UNet only")
    parser.add_argument("--weights", default="0,0.9,1", help="comma-separated LoRA weights to measure (0: the base)")
    args = parser.parse_args()
    overrides = {}
    if args.learning_rate:
        overrides["learning_rate"] = args.learning_rate
    if args.lora_layers:
        overrides["lora_layers"] = args.lora_layers.split(",")
    if args.no_text_encoder:
        overrides["train_text_encoder"] = False
    _quiet_libraries()
    with tempfile.TemporaryDirectory() as scratch:
        result = lora_proof(Path(scratch), Path(os.environ.get("DS_DATA_DIR", scratch)), args.steps, args.prompts,
                            prior=args.prior, repeats=args.repeats,
                            weights=tuple(float(w) for w in args.weights.split(",")), **overrides)
    print(f"LoRA proof: {args.prompts} prompts each, {args.steps} steps on 8 hearts x{args.repeats} + {args.prior} "
          f"prior images{', ' + str(overrides) if overrides else ''}; goals: hearts >= 0.6, base >= 0.8")
    for weight, scores in result.items():
        print(f"lora_weight {weight:<4g} heart_prompts_make_hearts {scores['heart']:.3f}  "
              f"base_prompts_still_right {scores['base_kept']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
