"""Prompt weighting, compel (as engine/prompts.py uses it) beside A1111's formula, and what the encoder costs.

For `a red (circle:w) on white` on a built-in base: how far each weighting moves the embedding from the unweighted
one (relative L2 over the whole chunk) and how far the two are from each other. A1111 multiplies each token's
embedding by its weight, then rescales the chunk so its mean equals the unweighted mean; compel moves weighted
tokens away from the empty prompt's embedding (w > 1) or blends toward the prompt with the tokens masked (w < 1).
Then the time to encode a plain prompt through the pipeline vs through the prompt encoder.

    python bench/prompts.py [--model builtin:shapes] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusion_studio.cli import _quiet_libraries  # noqa: E402
from diffusion_studio.config import StudioConfig  # noqa: E402
from diffusion_studio.engine.prompts import PromptEncoder, parse_attention  # noqa: E402
from diffusion_studio.engine.runner import Engine  # noqa: E402

TEMPLATE = "a red ({word}:{weight}) on white"


def a1111_weighting(encoder: PromptEncoder, text: str) -> torch.Tensor:
    """A1111's: the unweighted chunk, each token times its weight, rescaled to the unweighted chunk's mean (per
    text encoder; SDXL's two are concatenated)."""
    fragments = parse_attention(text)[0]
    parts = []
    for provider in encoder.providers:
        tokens, weights, _ = provider.get_token_ids_and_expand_weights([t for t, _ in fragments],
                                                                       [w for _, w in fragments], device="cpu")
        z = provider._encode_token_ids_to_embeddings(tokens.unsqueeze(0))
        weighted = z * weights.reshape(1, -1, 1)
        parts.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(parts, dim=-1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    _quiet_libraries()
    torch.set_num_threads(2)
    engine = Engine(StudioConfig(data_dir=os.environ.get("DS_DATA_DIR", "data"), models_dir=tempfile.mkdtemp()))
    with engine.manager.use(args.model) as (base, _), torch.inference_mode():
        pipe = base.pipeline
        encoder = PromptEncoder(pipe, 1)
        plain = encoder.encode_one(TEMPLATE.format(word="circle", weight=1))[0]
        print(f"{args.model}: '{TEMPLATE.format(word='circle', weight='w')}'")
        print("   w   compel vs plain   A1111 vs plain   compel vs A1111")
        for weight in (0.5, 0.8, 1.2, 1.5, 2.0):
            text = TEMPLATE.format(word="circle", weight=weight)
            compel = encoder.encode_one(text)[0]
            a1111 = a1111_weighting(encoder, text)
            print(f"{weight:4.1f}   {relative(compel, plain):15.3f}   {relative(a1111, plain):14.3f}   "
                  f"{relative(compel, a1111):15.3f}")

        def timed(call) -> float:
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
            return statistics.median(times) * 1000

        text = "a red circle on white"
        through_pipeline = timed(lambda: pipe.encode_prompt(prompt=text, device=pipe.device, num_images_per_prompt=1,
                                                            do_classifier_free_guidance=False))
        through_encoder = timed(lambda: PromptEncoder(pipe, 1).encode_one("a red (circle:1.2) on white"))
        print(f"encode, median of {args.repeats}: pipeline (plain) {through_pipeline:.2f} ms, "
              f"prompt encoder (weighted, incl. the empty prompt) {through_encoder:.2f} ms")


if __name__ == "__main__":
    main()
