"""Engine overhead, measured side by side in one run (these machines are noisy: compare ratios, not seconds).

1. raw diffusers pipeline call vs Engine.run on the same request (previews and step events on), interleaved;
   goal: ratio <= 1.05.
2. switching modes txt2img -> img2img -> inpaint -> controlnet on one loaded base: time per switch (goal <= 10 ms)
   and weight bytes added by the switches (goal 0).

    python bench/engine.py [--repeats 7] [--steps 20] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from diffusion_studio.builtin.catalog import builtin_folder  # noqa: E402
from diffusion_studio.cli import _quiet_libraries  # noqa: E402
from diffusion_studio.config import StudioConfig  # noqa: E402
from diffusion_studio.engine.pipelines import module_bytes  # noqa: E402
from diffusion_studio.engine.runner import Engine  # noqa: E402
from diffusion_studio.requests import GenerationRequest, Mode  # noqa: E402


def overhead(engine: Engine, folder: Path, args) -> None:
    raw = StableDiffusionPipeline.from_pretrained(folder).to(engine.device)
    raw.set_progress_bar_config(disable=True)
    request = GenerationRequest(prompt="a red circle on a white background", steps=args.steps, seed=1,
                                width=args.size, height=args.size)
    events = []

    def raw_call():
        raw(prompt=[request.prompt], num_inference_steps=request.steps, guidance_scale=request.guidance,
            width=args.size, height=args.size, generator=[torch.Generator("cpu").manual_seed(1)])

    def engine_call():
        engine.run(request, on_step=events.append)

    raw_call(), engine_call()  # warm up both (first calls allocate)
    raw_times, engine_times = [], []
    for _ in range(args.repeats):
        for call, times in ((raw_call, raw_times), (engine_call, engine_times)):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
    raw_s, engine_s = statistics.median(raw_times), statistics.median(engine_times)
    print(f"engine_vs_raw_ratio {engine_s / raw_s:.3f}  (raw {raw_s * 1000:.0f} ms, engine {engine_s * 1000:.0f} ms;"
          f" median of {args.repeats}, txt2img {args.size}px {args.steps} steps, goal <= 1.05)")


def switching(engine: Engine, args) -> None:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill="red")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((20, 20, 44, 44), fill=255)
    manager = engine.manager
    with manager.use("builtin:shapes") as (base, _), manager.use("builtin:shapes-canny", "controlnet") as (cn, _):
        before = module_bytes(base.pipeline.components.values())
        modes = [Mode.txt2img, Mode.img2img, Mode.inpaint, Mode.controlnet]
        switch_ms, views = [], []
        for _ in range(args.repeats):
            for mode in modes:
                started = time.perf_counter()
                view = manager.view(base, mode, "Euler", cn.controlnet if mode == Mode.controlnet else None)
                switch_ms.append((time.perf_counter() - started) * 1000)
                views.append(view)
        # Unique weight storage across the base and every view, without the ControlNet (a separate model).
        modules = [m for v in views for name, m in v.components.items() if name != "controlnet"]
        added = module_bytes([*base.pipeline.components.values(), *modules]) - before
    print(f"mode_switch_ms {statistics.median(switch_ms):.2f}  (median over {len(switch_ms)} switches "
          f"txt2img->img2img->inpaint->controlnet, max {max(switch_ms):.2f}; goal <= 10)")
    print(f"mode_switch_weight_bytes_added {added}  (base weights {before} bytes; goal 0)")
    # The same switches through diffusers' own from_pipe, for comparison.
    with manager.use("builtin:shapes") as (base, _):
        from diffusion_studio.engine.pipelines import mode_pipeline

        started = time.perf_counter()
        for mode in modes[:3]:
            mode_pipeline("sd", mode).from_pipe(base.pipeline, dtype=manager.dtype)
        print(f"from_pipe_switch_ms {(time.perf_counter() - started) * 1000 / 3:.2f}  (diffusers from_pipe, for "
              "comparison)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    _quiet_libraries()
    with tempfile.TemporaryDirectory() as data_dir:
        engine = Engine(StudioConfig(data_dir=data_dir, models_dir=data_dir))
        print(f"device {engine.device}, torch threads {torch.get_num_threads()}", file=sys.stderr)
        overhead(engine, builtin_folder("shapes", Path(data_dir)), args)
        switching(engine, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
