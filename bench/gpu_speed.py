"""The fast path on a GPU: SD 1.5 at 512² and SDXL at 1024², fp16, batch 1 and 8, plain vs fast, it/s and peak VRAM,
beside published figures for the same GPU class. One short run (GPU time is scarce): about 5-8 minutes on an
A100/H100-class GPU, most of it the first compile.

    python bench/gpu_speed.py [--steps 20] [--batches 1,8] [--models sd15,sdxl] [--json gpu.json]
    python bench/gpu_speed.py --tiny --device cpu --steps 2 --batches 1    # the script itself, anywhere (tests)

The models are the published architectures (the configs shipped in engine/model_configs) with random fp16
weights built directly on the device: nothing to download, and speed does not depend on the values. Each is
timed as a diffusers pipeline twice: plain (diffusers' defaults, SDPA attention), then with the studio's fast path
from engine/performance.py applied to the same pipeline (fused QKV projections, channels-last, regional
torch.compile of the repeated transformer blocks), and then that plus step caching (DeepCache-style, every 2nd
step reusing the deep features), so each option's share shows. it/s counts denoising steps per second of the
loop (one step of a batch of 8 counts once); the compile's first run is a warm-up, not in the figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

# Published it/s, fp16, batch 1, SD 1.5 at 512² (the references): plain / torch.compile / stable-fast.
PUBLISHED = {"A100": (35.6, 41.9, 61.8), "H100": (54.5, 66.0, 104.6)}
SIZES = {"sd15": 512, "sdxl": 1024}
VARIANTS = {"sd15": "v1", "sdxl": "xl_base"}


def build_pipeline(model: str, device: str, dtype, tiny: bool):
    import diffusers
    import torch

    if tiny:
        from diffusion_studio.builtin.architectures import build_sd_pipeline, build_sdxl_pipeline

        pipe = build_sd_pipeline() if model == "sd15" else build_sdxl_pipeline()
    else:
        from full_size import build_components  # tests/full_size.py: the published configs, random init

        from diffusion_studio.engine.model_configs.clip_tokenizer import clip_tokenizer

        parts = build_components(VARIANTS[model], device=device)
        scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012)
        if model == "sd15":
            pipe = diffusers.StableDiffusionPipeline(**parts, tokenizer=clip_tokenizer("clip_l"), scheduler=scheduler,
                                                     safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
        else:
            pipe = diffusers.StableDiffusionXLPipeline(**parts, tokenizer=clip_tokenizer("clip_l"),
                                                       tokenizer_2=clip_tokenizer("open_clip"), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def time_run(pipe, size: int, batch: int, steps: int, step_cache: int, repeats: int, device: str) -> dict:
    import torch

    from diffusion_studio.engine.performance import step_caching

    cuda = device.startswith("cuda")
    times = []

    def step_end(pipeline, step, timestep, kwargs):
        times.append(time.perf_counter())
        return kwargs

    loops = []
    for repeat in range(repeats + 1):  # the first: warm-up (and the compile)
        times.clear()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with torch.inference_mode(), step_caching(pipe.unet, step_cache):
            pipe(["a photograph of an astronaut riding a horse"] * batch, num_inference_steps=steps,
                 width=size, height=size, output_type="latent", callback_on_step_end=step_end)
        if cuda:
            torch.cuda.synchronize()
        if repeat:  # from the first step's end to the last's: the loop, without the text encoding
            loops.append((times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[0] - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"it_per_s": 1 / statistics.median(loops), "peak_vram_gb": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the built-in-sized architectures (checks the script)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from diffusion_studio.config import PerformanceOptions
    from diffusion_studio.engine.performance import apply_load_options

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine (see README, Performance)")
        return 2
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {gpu}, torch {torch.__version__}, "
          f"{'fp16' if dtype == torch.float16 else 'fp32'}", flush=True)
    results = []
    for model in args.models.split(","):
        size = 64 if args.tiny else SIZES[model]
        pipe = build_pipeline(model, args.device, dtype, args.tiny)
        for batch in map(int, args.batches.split(",")):
            results.append({"model": model, "size": size, "batch": batch, "arm": "plain",
                            **time_run(pipe, size, batch, args.steps, 1, args.repeats, args.device)})
        compiled = PerformanceOptions(fuse_qkv=True, channels_last=True, compile=args.device.startswith("cuda"))
        apply_load_options(pipe, compiled, ROOT / "data")
        arms = [("fast", 1), ("fast+step_cache=2", 2)]
        for name, step_cache in arms:
            for batch in map(int, args.batches.split(",")):
                results.append({"model": model, "size": size, "batch": batch, "arm": name,
                                **time_run(pipe, size, batch, args.steps, step_cache, args.repeats, args.device)})
        del pipe
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        for row in results:
            if row["model"] != model:
                continue
            plain = next(r for r in results if r["model"] == model and r["batch"] == row["batch"]
                         and r["arm"] == "plain")
            print(f"  {model} {size}² batch {row['batch']}: {row['arm']:18s} {row['it_per_s']:7.2f} it/s  "
                  f"x{row['it_per_s'] / plain['it_per_s']:.2f}  peak VRAM {row['peak_vram_gb']:.2f} GiB", flush=True)
    for name, (plain, compiled, fast) in PUBLISHED.items():
        if name in gpu:
            print(f"published for {name} (SD 1.5 512², fp16, batch 1): plain {plain}, torch.compile {compiled}, "
                  f"stable-fast {fast} it/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
