"""Loading single-file checkpoints: the studio's loader against diffusers' own `from_single_file`, side by side.

On full-size random-weight fp16 checkpoints in the original single-file layout (tests/full_size.py, built once into
--work): detection + load time, peak RSS against the file's bytes and the loaded weights' bytes, and one UNet step
at 512 px (batch 1, CFG: 2 rows). Each measurement runs in its own fresh process (peak RSS = its ru_maxrss); a
sampler thread records RSS every 20 ms and diffusers' conversion steps are wrapped to say which one held the peak.

    .venv/bin/python bench/models.py                   # v1, then xl_base if 18 GB are available
    .venv/bin/python bench/models.py --variants v1     # SD 1.5 only
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

PIPELINES = {"v1": "StableDiffusionPipeline", "xl_base": "StableDiffusionXLPipeline"}
LOADERS = ("studio", "diffusers")
XL_NEEDS_GB = 18
GB = 1e9


# -- in the measuring process ---------------------------------------------------------------------------------------
class RssTracer:
    """RSS every 20 ms; wrapped functions record their RSS on entry, on exit and the peak while they ran.
    `limit_bytes` of anonymous memory (file pages can be dropped, anonymous ones can't) ends the process (exit 3)
    before it can push the shared machine into the OOM killer."""

    def __init__(self, limit_bytes: float):
        import psutil

        self.process = psutil.Process()
        self.samples: list[tuple[float, int]] = []
        self.peak_anon = 0  # RSS less its file-backed pages (a mapped checkpoint's pages count in RSS too)
        self.calls: list[dict] = []
        self.limit = limit_bytes
        self.depth = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            info = self.process.memory_info()
            rss = info.rss
            self.peak_anon = max(self.peak_anon, rss - info.shared)
            self.samples.append((time.perf_counter(), rss))
            if rss - info.shared > self.limit:
                print(json.dumps({"aborted": f"{(rss - info.shared) / GB:.1f} GB of anonymous memory passed the "
                                             f"{self.limit / GB:.1f} GB limit",
                                  "calls": self.calls}), flush=True)
                os._exit(3)
            time.sleep(0.02)

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            started, rss_in = time.perf_counter(), self.process.memory_info().rss
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                ended = time.perf_counter()
                self.calls.append({"name": name, "depth": self.depth, "s": round(ended - started, 2),
                                   "rss_in_gb": round(rss_in / GB, 2),
                                   "rss_out_gb": round(self.process.memory_info().rss / GB, 2),
                                   "peak_gb": round(max(self.peak_between(started, ended), rss_in) / GB, 2)})
        return traced

    def patch_diffusers(self):
        """Wrap the single-file steps where diffusers looks them up (module globals and its class table), before
        anything imports them by name."""
        from diffusers.loaders import single_file, single_file_model, single_file_utils

        names = ["load_single_file_checkpoint", "load_single_file_sub_model", "convert_ldm_unet_checkpoint",
                 "convert_ldm_vae_checkpoint", "create_diffusers_clip_model_from_ldm", "convert_open_clip_checkpoint",
                 "convert_ldm_clip_checkpoint", "load_model_dict_into_meta", "load_state_dict"]
        for module in (single_file_utils, single_file, single_file_model):
            for name in names:
                if hasattr(module, name):
                    setattr(module, name, self.wrap(name, getattr(module, name)))
        for cls_name, entry in single_file_model.SINGLE_FILE_LOADABLE_CLASSES.items():
            if cls_name in ("UNet2DConditionModel", "AutoencoderKL", "ControlNetModel"):
                fn = entry["checkpoint_mapping_fn"]
                entry["checkpoint_mapping_fn"] = self.wrap(f"{fn.__name__} ({cls_name})", fn)


def load_with_studio(path: Path, work: Path):
    """Through the engine's own path: a PipelineManager for a config naming the file, no config folder."""
    from diffusion_studio.config import StudioConfig
    from diffusion_studio.engine.pipelines import PipelineManager

    data = Path(tempfile.mkdtemp(dir=work))
    config = StudioConfig(data_dir=data, models_dir=data / "models", models={"bench": {"source": str(path)}})
    with PipelineManager(config).use("bench") as (entry, _):
        return entry.pipeline


def load_with_diffusers(path: Path, variant: str):
    """diffusers' own from_single_file with the shipped configs (and the shipped tokenizer files: the config
    folders carry only the tokenizer settings)."""
    import diffusers
    import torch

    from diffusion_studio.engine.model_configs import config_folder
    from diffusion_studio.engine.model_configs.clip_tokenizer import clip_tokenizer

    tokenizers = {"tokenizer": clip_tokenizer("clip_l")}
    if variant.startswith("xl"):
        tokenizers["tokenizer_2"] = clip_tokenizer("open_clip")
    cls = getattr(diffusers, PIPELINES[variant])
    return cls.from_single_file(str(path), config=str(config_folder(variant)), local_files_only=True,
                                dtype=torch.float32, **tokenizers)


def detect(loader: str, path: Path) -> tuple[str, float]:
    started = time.perf_counter()
    if loader == "studio":
        from diffusion_studio.engine.identify import identify_file

        variant = identify_file(path).variant
    else:  # what diffusers runs when it isn't given a config: its model type from the tensors
        import torch
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
        variant = infer_diffusers_model_type(meta)
    return variant, time.perf_counter() - started


def unet_step_s(pipe, steps: int = 2) -> float:
    """One denoising step of the UNet at 512 px with classifier-free guidance (2 rows); the last of `steps`."""
    import torch

    unet = pipe.unet
    rows, dtype = 2, unet.dtype
    latents = torch.randn(rows, unet.config.in_channels, 64, 64, dtype=dtype)
    context = torch.randn(rows, 77, unet.config.cross_attention_dim, dtype=dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, 1280, dtype=dtype),
                                      "time_ids": torch.tensor([[512, 512, 0, 0, 512, 512]] * rows, dtype=dtype)}
    timings = []
    with torch.inference_mode():
        for _ in range(steps):
            started = time.perf_counter()
            unet(latents, torch.tensor([500] * rows), context, **extra)
            timings.append(time.perf_counter() - started)
    return timings[-1]


def measure(loader: str, variant: str, path: Path, work: Path, limit_gb: float, steps: int) -> dict:
    tracer = RssTracer(limit_gb * GB)
    tracer.patch_diffusers()  # first: the studio's modules import diffusers' functions by name
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from diffusion_studio.engine.pipelines import module_bytes

    detected, detect_s = detect(loader, path)
    started = time.perf_counter()
    if loader == "studio":
        from diffusion_studio.requests import ModelLoadError, RequestError

        try:
            pipe = load_with_studio(path, work)
        except (RequestError, ModelLoadError) as exc:  # the studio refuses the file: say so, measure nothing
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    else:
        pipe = load_with_diffusers(path, variant)
    load_s = time.perf_counter() - started
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    time.sleep(0.05)  # one more sample
    load_anon = tracer.peak_anon
    weights = module_bytes(pipe.components.values())
    return {"detected": detected, "detect_s": detect_s, "load_s": load_s, "peak_rss": load_peak,
            "peak_anon": load_anon,
            "weights_bytes": weights, "weights_dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "pipeline": type(pipe).__name__, "unet_step_s": unet_step_s(pipe, steps),
            "calls": tracer.calls}


# -- the driver -----------------------------------------------------------------------------------------------------
def build(work: Path, variant: str) -> Path:
    from full_size import write_checkpoint

    path = work / f"{variant}-float16.safetensors"
    if not path.exists():
        started = time.perf_counter()
        partial = path.with_suffix(".partial")
        write_checkpoint(variant, partial)
        partial.rename(path)
        print(f"built {path.name} ({path.stat().st_size / GB:.2f} GB) in {time.perf_counter() - started:.0f} s",
              flush=True)
    return path


def available_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / GB


def warm_page_cache(path: Path) -> None:
    """Read the file once, so every loader starts with it in the page cache: otherwise whichever loader runs first
    pays the disk read and the second looks faster (SD 1.5 here: 19.8 s cold vs 8.9 s warm)."""
    with path.open("rb", buffering=0) as f:
        while f.read(16 * 2**20):
            pass


def run_child(loader: str, variant: str, path: Path, args) -> dict:
    command = [sys.executable, __file__, "--measure", loader, variant, str(path), "--work", str(args.work),
               "--limit-gb", str(args.limit_gb), "--steps", str(args.steps)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    last = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not last:
        killed = " (killed: out of memory?)" if done.returncode == -9 else ""
        return {"error": f"exit {done.returncode}{killed}: {done.stderr.strip().splitlines()[-1][-200:]}"}
    result = json.loads(last[-1])
    result.setdefault("exit", done.returncode)
    return result


def table(rows: list[dict]) -> str:
    lines = [("| variant | loader | detected | detect s | load s | peak RSS GB | RSS / file | RSS / weights | "
              "peak anon GB | UNet step s (512 px, CFG) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "aborted" in r:
            lines.append(f"| {r['variant']} | {r['loader']} | {r.get('error') or r.get('aborted')} |||||||")
            continue
        lines.append(f"| {r['variant']} | {r['loader']} | {r['detected']} | {r['detect_s']:.3f} | {r['load_s']:.1f} | "
                     f"{r['peak_rss'] / GB:.2f} | {r['peak_rss'] / r['file_bytes']:.2f}× | "
                     f"{r['peak_rss'] / r['weights_bytes']:.2f}× | {r['peak_anon'] / GB:.2f} | {r['unet_step_s']:.1f} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    out = []
    by = {(r["variant"], r["loader"]): r for r in rows if "load_s" in r}
    for variant in PIPELINES:
        studio, diffusers = by.get((variant, "studio")), by.get((variant, "diffusers"))
        if studio and diffusers:
            out.append(f"{variant}: studio / diffusers — load time {studio['load_s'] / diffusers['load_s']:.2f}×, "
                       f"peak RSS {studio['peak_rss'] / diffusers['peak_rss']:.2f}×, "
                       f"UNet step {studio['unet_step_s'] / diffusers['unet_step_s']:.2f}×")
    return out


def peak_phases(row: dict, top: int = 4) -> str:
    calls = sorted(row.get("calls", []), key=lambda c: -c["peak_gb"])[:top]
    return "; ".join(f"{c['name']}: {c['rss_in_gb']}→{c['rss_out_gb']} GB (peak {c['peak_gb']}, {c['s']} s)"
                     for c in calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/studio-bench-models"))
    parser.add_argument("--variants", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--steps", type=int, default=2, help="UNet calls per measurement; the last one is reported")
    parser.add_argument("--limit-gb", type=float, default=17.0,
                        help="a measurement stops past this much anonymous memory")
    parser.add_argument("--measure", nargs=3, metavar=("LOADER", "VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.measure:
        loader, variant, path = args.measure
        print(json.dumps(measure(loader, variant, Path(path), args.work, args.limit_gb, args.steps)), flush=True)
        return

    rows = []
    paths = {variant: build(args.work, variant) for variant in args.variants}  # all first, so a build can't fail after minutes of measuring
    for variant, path in paths.items():
        for loader in args.loaders:
            if variant.startswith("xl") and available_gb() < XL_NEEDS_GB:  # before each: the machine is shared
                print(f"skipping {variant} with {loader}: {available_gb():.1f} GB available, a full-size SDXL "
                      f"load and step need {XL_NEEDS_GB} GB", flush=True)
                continue
            warm_page_cache(path)
            print(f"measuring {variant} with {loader} ({available_gb():.1f} GB available) ...", flush=True)
            row = {"variant": variant, "loader": loader, "file_bytes": path.stat().st_size,
                   **run_child(loader, variant, path, args)}
            rows.append(row)
            (args.work / "results.json").write_text(json.dumps(rows, indent=1))  # kept if a later one fails
            print(f"  {peak_phases(row) or row.get('error') or row.get('aborted')}", flush=True)
    print()
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, torch threads "
          f"{os.environ.get('BENCH_THREADS', '2')}, fp16 files loaded to fp32 on the CPU")
    print(table(rows))
    for line in ratios(rows):
        print(line)


if __name__ == "__main__":
    main()
