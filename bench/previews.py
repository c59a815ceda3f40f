"""Previews on builtin:shapes: the linear latent map vs the tiny distilled decoder vs the real VAE decode.

    python bench/previews.py [--prompts 8] [--steps 20] [--mid 10] [--repeats 60] [--threads N]

Generates `--prompts` fixed shapes-world prompts (seeds 0..n-1, 64 px, guidance 5) with the built-in, keeps each
one's latents after step `--mid` and after the last step, and prints:
- per-preview time (ms, medians of interleaved calls linear, tiny, real, ... on the same latents, each call ending
  in a PIL image as the studio sends it) and the ratios to the real decode;
- each preview's error against the real VAE decode of the same latents (mean abs error on 0-255 and PSNR, at
  64 px; the linear map's 16 px image is scaled up bilinearly, as a browser would), at step `--mid` and at the end;
- and the mid-run previews' error against the final image (how much the preview tells of the result).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_studio.builtin.catalog import COMMITTED_DIR  # noqa: E402
from diffusion_studio.builtin.shapes import ShapesWorld  # noqa: E402
from diffusion_studio.cli import _quiet_libraries  # noqa: E402
from diffusion_studio.engine.preview import (latents_to_image, latents_to_preview, preview_decoder,  # noqa: E402
                                             preview_map)


def real_decode(vae, latents: torch.Tensor) -> Image.Image:
    with torch.inference_mode():
        rgb = vae.decode(latents[:1] / vae.config.scaling_factor).sample[0]
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def errors(preview: Image.Image, reference: Image.Image) -> tuple[float, float]:
    """(mean abs error on 0-255, PSNR in dB) of `preview` scaled to `reference`'s size."""
    a = np.asarray(preview.resize(reference.size, Image.BILINEAR), dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float(np.abs(a - b).mean()), 10 * np.log10(255 ** 2 / max(mse, 1e-10))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mid", type=int, default=10, help="the mid-run step whose latents are previewed")
    parser.add_argument("--repeats", type=int, default=60, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    _quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(COMMITTED_DIR / "shapes")
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    mapping, decoder = preview_map(vae), preview_decoder(vae)
    if decoder is None:
        print("no tiny preview decoder for builtin:shapes's VAE (train one: "
              "python -m diffusion_studio.builtin.preview_decoder --train)")
        return 1
    _, prompts = ShapesWorld(seed=424242).batch(args.prompts)

    # 1. Latents at step `mid` and at the end, per prompt.
    mids, finals = [], []
    for seed, prompt in enumerate(prompts):
        kept = {}

        def keep(pipeline, step, timestep, kwargs):
            kept[step + 1] = kwargs["latents"].clone()
            return kwargs

        pipe(prompt, height=64, width=64, num_inference_steps=args.steps, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(seed), callback_on_step_end=keep, output_type="latent")
        mids.append(kept[args.mid])
        finals.append(kept[args.steps])

    methods = {
        "linear": lambda latents: latents_to_preview(latents, mapping),
        "tiny": lambda latents: latents_to_image(latents, decoder),
        "real": lambda latents: real_decode(vae, latents),
    }

    # 2. Per-preview time, interleaved on the same latents.
    times = {name: [] for name in methods}
    for round_index in range(args.repeats):
        latents = mids[round_index % len(mids)]
        for name, method in methods.items():
            started = time.perf_counter()
            method(latents)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    for name, value in medians.items():
        print(f"preview_ms_{name} {value:.3f}")
    print(f"preview_time_ratio_tiny_to_real {medians['tiny'] / medians['real']:.3f}")
    print(f"preview_time_ratio_linear_to_real {medians['linear'] / medians['real']:.3f}")
    print(f"  (medians of {args.repeats} interleaved calls, 64 px, torch threads {torch.get_num_threads()})")

    # 3. Error of each preview against the real decode of the same latents, and mid-run ones against the result.
    final_images = [real_decode(vae, latents) for latents in finals]
    for label, step_latents in ((f"step{args.mid}of{args.steps}", mids), (f"final{args.steps}", finals)):
        references = [real_decode(vae, latents) for latents in step_latents]
        for name, method in methods.items():
            if name == "real":
                continue
            pairs = [errors(method(latents), reference) for latents, reference in zip(step_latents, references)]
            print(f"{label}_vs_real_decode_{name}_mae {np.mean([p[0] for p in pairs]):.2f}  "
                  f"psnr {np.mean([p[1] for p in pairs]):.2f}")
    for name, method in methods.items():
        pairs = [errors(method(latents), final) for latents, final in zip(mids, final_images)]
        print(f"step{args.mid}of{args.steps}_vs_final_image_{name}_mae {np.mean([p[0] for p in pairs]):.2f}  "
              f"psnr {np.mean([p[1] for p in pairs]):.2f}")
    print(f"  ({args.prompts} prompts, seeds 0-{args.prompts - 1}, {args.steps} steps, 64 px; mae on 0-255)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
