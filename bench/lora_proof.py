"""LoRA proof: teach builtin:shapes a shape it has never seen ("heart") from 8 images, then measure.

    python bench/lora_proof.py [--steps 500] [--prompts 30] [--learning-rate 4e-4] [--prior 8]

Prints: heart prompts that produce a heart (template match, goal >= 0.6) and base prompts still right with the
LoRA loaded (checker, goal >= 0.8). The measurement is `diffusion_studio.builtin.quality.lora_proof`;
tests/test_lora_proof.py runs a short version.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_studio.builtin.quality import lora_proof  # noqa: E402
from diffusion_studio.cli import _quiet_libraries  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=4e-4)
    parser.add_argument("--prior", type=int, default=8, help="ordinary images beside the 8 hearts")
    args = parser.parse_args()
    _quiet_libraries()
    with tempfile.TemporaryDirectory() as scratch:
        result = lora_proof(Path(scratch), Path(os.environ.get("DS_DATA_DIR", scratch)), args.steps, args.prompts,
                            learning_rate=args.learning_rate, prior=args.prior)
    print(f"lora_heart_prompts_make_hearts {result['heart']:.3f}  (template match, {args.prompts} prompts, "
          f"{args.steps} steps on 8 images + {args.prior} prior images, lr {args.learning_rate:g}; goal >= 0.6; "
          f"without the LoRA {result['heart_without_lora']:.3f})")
    print(f"lora_base_prompts_still_right {result['base_kept']:.3f}  (checker colour+shape+background; goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
