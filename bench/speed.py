"""Speed of one image, side by side: a raw diffusers call vs the studio's engine at its defaults vs its fast path.

    python bench/speed.py [--cases builtin,sd15-256,sd15-512] [--prompts 100] [--repeats 3]
                          [--fast step_cache=2,fuse_qkv] [--json results.json]
    python bench/speed.py --quick    # the built-in only, 4 prompts at 4 steps: the bench still runs (tests)

Each arm is a process of its own (as a user's program would be), loaded once; the parent then asks each for one
image in turn (raw, default, fast, then the next prompt in a rotated order), so a busy machine slows all three
alike. Per arm: seconds per image (the whole call: text encoding, the denoising loop, the decode), the loop's
it/s, the process's peak RSS and, on the built-in, the shapes checker's adherence (colour + shape + background
all right; the same prompts and seeds for every arm). Ratios are raw seconds / arm seconds.

Cases:
- builtin: builtin:shapes, 64 px, 20 steps (its default), --prompts prompts from the shapes world.
- sd15-256 / sd15-512: the full SD 1.5 architecture from its published config with random weights (speed does
  not depend on the values; the checkpoint is written once under --work), --repeats images each, at
  --sd-steps steps. Guidance 7.5 as SD 1.5 users run it.

The raw arm is what a diffusers user writes: the pipeline from the same files, the same scheduler (Euler), the same
size, steps, guidance and per-image CPU generator. The studio's arms go through `Engine.run` with a request, as the
job service does (previews every 2 steps, as the studio's default config).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("raw", "default", "fast")
DEFAULT_FAST = "step_cache=2,fuse_qkv"
BUILTIN_STEPS = 20


def parse_fast(text: str) -> tuple[dict, int]:
    """'step_cache=2,fuse_qkv' -> (performance options, the request's step_cache)."""
    options, step_cache = {}, 1
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name == "step_cache":
            step_cache = int(value)
        else:
            options[name] = value.lower() not in ("0", "false", "off") if value else True
    return options, step_cache


# -- a child: one arm, loaded once, answering "run <index>" lines with one JSON line each -----------------------
def case_settings(case: str, args) -> dict:
    if case == "builtin":
        return {"size": 64, "steps": args.steps or BUILTIN_STEPS, "guidance": 5.0}
    size = int(case.split("-")[1])
    return {"size": size, "steps": args.sd_steps, "guidance": 7.5}


def child(arm: str, case: str, args) -> None:
    import torch

    from diffusion_studio.cli import _quiet_libraries

    _quiet_libraries()
    torch.set_num_threads(os.cpu_count() or 1)  # as a plain diffusers process has (the studio's default too)
    settings = case_settings(case, args)
    prompts = prompt_list(case, args)
    generate = raw_arm(case, args, settings) if arm == "raw" else studio_arm(arm, case, args, settings)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command == "quit":
            break
        index = int(value)
        prompt, spec = prompts[index % len(prompts)]
        started = time.perf_counter()
        image, step_times = generate(prompt, index)
        seconds = time.perf_counter() - started
        ok = None
        if spec is not None:
            from diffusion_studio.builtin.shapes import check

            ok = bool(check(image, spec).colour_shape_background_ok)
        loop = sum(step_times)
        print(json.dumps({"s": seconds, "it_s": len(step_times) / loop if loop else 0.0, "ok": ok}), flush=True)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


def prompt_list(case: str, args) -> list[tuple[str, str | None]]:
    if case != "builtin":
        return [("a photograph of an astronaut riding a horse", None)]
    from diffusion_studio.workshop.quality import random_specs

    return [(spec.caption, spec.caption) for spec in random_specs(args.prompts, 1234)]


def sd15_checkpoint(work: Path) -> Path:
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
    from models import build  # bench/models.py: the full-size random-weight file, written once

    return build(work, "v1")


def raw_arm(case: str, args, settings: dict):
    import diffusers
    import torch

    if case == "builtin":
        from diffusion_studio.builtin.catalog import builtin_folder, ensure_standins

        ensure_standins(args.data_dir)  # nothing to build where the built-ins are trained (the committed weights)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(builtin_folder("shapes", args.data_dir),
                                                                 safety_checker=None, requires_safety_checker=False)
    else:
        sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
        from models import load_with_diffusers

        pipe = load_with_diffusers(sd15_checkpoint(args.work), "v1")
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str, index: int):
        times, last = [], [time.perf_counter()]

        def step_end(pipeline, step, timestep, kwargs):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            return kwargs

        with torch.inference_mode():
            last[0] = time.perf_counter()
            image = pipe(prompt, num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                         width=settings["size"], height=settings["size"],
                         generator=torch.Generator("cpu").manual_seed(index), callback_on_step_end=step_end).images[0]
        return image, times

    return generate


def studio_arm(arm: str, case: str, args, settings: dict):
    from diffusion_studio.config import StudioConfig
    from diffusion_studio.engine.runner import Engine
    from diffusion_studio.requests import GenerationRequest

    options, step_cache = parse_fast(args.fast) if arm == "fast" else ({}, 1)
    models = {} if case == "builtin" else {"sd15": {"source": str(sd15_checkpoint(args.work))}}
    config = StudioConfig(data_dir=args.data_dir, models_dir=Path(args.data_dir) / "models", models=models,
                          performance=options)
    engine = Engine(config)
    model = "builtin:shapes" if case == "builtin" else "sd15"

    def generate(prompt: str, index: int):
        result = engine.run(GenerationRequest(model=model, prompt=prompt, seed=index, steps=settings["steps"],
                                              guidance=settings["guidance"], width=settings["size"],
                                              height=settings["size"], step_cache=step_cache))
        return result.images[0], result.timings.step_s

    return generate


# -- the parent ---------------------------------------------------------------------------------------------------
class Arm:
    def __init__(self, name: str, case: str, args):
        command = [sys.executable, __file__, "--child", name, "--case", case, "--data-dir", str(args.data_dir),
                   "--work", str(args.work), "--prompts", str(args.prompts), "--fast", args.fast,
                   "--sd-steps", str(args.sd_steps), "--steps", str(args.steps)]
        self.name = name
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=ROOT)
        self.runs: list[dict] = []
        self.peak_rss = 0

    def answer(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.name} arm stopped (exit {self.process.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, index: int, keep: bool = True) -> None:
        self.process.stdin.write(f"run {index}\n")
        self.process.stdin.flush()
        answer = self.answer()
        if keep:
            self.runs.append(answer)

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.peak_rss = self.answer()["peak_rss"]
        self.process.wait(timeout=60)


def measure(case: str, args) -> dict:
    arms = []
    try:
        for name in ARMS:  # loaded one after another (a load is no part of the figure)
            arms.append(Arm(name, case, args))
            arms[-1].answer()
        for arm in arms:
            arm.run(10_000, keep=False)  # warm-up: first-call costs (and a compile, if the fast path has one)
        count = args.prompts if case == "builtin" else args.repeats
        for index in range(count):
            shift = index % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                arm.run(index)
        for arm in arms:
            arm.close()
    finally:
        for arm in arms:
            if arm.process.poll() is None:
                arm.process.kill()
    rows = {}
    for arm in arms:
        oks = [run["ok"] for run in arm.runs if run["ok"] is not None]
        rows[arm.name] = {"s_per_image": statistics.median(run["s"] for run in arm.runs),
                          "it_per_s": statistics.median(run["it_s"] for run in arm.runs),
                          "peak_rss_gb": arm.peak_rss / 2**30,
                          "adherence": sum(oks) / len(oks) if oks else None, "images": len(arm.runs)}
    return rows


def report(case: str, rows: dict, args) -> list[str]:
    settings = case_settings(case, args)
    raw = rows["raw"]["s_per_image"]
    lines = [f"{case}: {settings['size']} px, {settings['steps']} steps, guidance {settings['guidance']:g}; "
             f"fast path: {args.fast}"]
    for name, row in rows.items():
        adherence = f"  adherence {row['adherence']:.3f}" if row["adherence"] is not None else ""
        lines.append(f"  {name:8s} {row['s_per_image']:8.3f} s/image  {row['it_per_s']:7.2f} it/s  "
                     f"peak RSS {row['peak_rss_gb']:5.2f} GB{adherence}  x{raw / row['s_per_image']:.2f} "
                     f"(raw s / this s, median of {row['images']})")
    speedup = raw / rows["fast"]["s_per_image"]
    goal = 1.5 if case == "builtin" else 1.2
    verdict = "PASS" if speedup >= goal else "FAIL"
    line = f"  {verdict}: fast path {speedup:.2f}x the raw call (goal >= {goal})"
    if rows["raw"]["adherence"] is not None:
        drift = rows["fast"]["adherence"] - rows["raw"]["adherence"]
        line += f"; adherence {drift:+.3f} vs raw (goal within 0.02)"
    lines.append(line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="builtin,sd15-256,sd15-512")
    parser.add_argument("--prompts", type=int, default=100, help="built-in: prompts (one image each, per arm)")
    parser.add_argument("--repeats", type=int, default=3, help="SD 1.5: images per arm")
    parser.add_argument("--steps", type=int, default=0, help="built-in steps (0: its default, 20)")
    parser.add_argument("--sd-steps", type=int, default=10)
    parser.add_argument("--fast", default=DEFAULT_FAST, help="the fast path: step_cache=N and performance options")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ds-bench-models")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=ARMS)
    parser.add_argument("--case")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.case, args)
        return 0
    if args.quick:
        args.cases, args.prompts, args.steps = "builtin", 4, 4
    args.work.mkdir(parents=True, exist_ok=True)
    args.data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="ds-speed-"))
    load = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {os.cpu_count()} CPUs, load "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    results = {}
    for case in args.cases.split(","):
        results[case] = measure(case, args)
        print("\n".join(report(case, results[case], args)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
