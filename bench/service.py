"""The job service's overhead and gains, measured side by side in one run, one line per figure:

1. API round trip (POST /api/v1/jobs, wait on its SSE stream) vs the raw pipeline call on the same request;
   goal <= 1.05.
2. cache hit vs generation for a repeated explicit-seed request; goal >= 100x.
3. 8 concurrent clients (different prompts and seeds, same parameters) with cross-user batching vs the same 8
   requests one at a time, as behind a global lock; goal >= 2x.
4. RSS growth over N jobs through the API after a warm-up; goal <= 5%.

    python bench/service.py [--jobs 200] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from diffusion_studio.builtin.catalog import builtin_folder  # noqa: E402
from diffusion_studio.cli import _quiet_libraries  # noqa: E402
from diffusion_studio.config import StudioConfig  # noqa: E402
from diffusion_studio.server import build_app  # noqa: E402


def serve(config: StudioConfig):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, app.state.studio


def run_job(client: httpx.Client, body: dict) -> dict:
    """Submit and wait on the job's event stream (as a client should: polling a tiny model's job every few ms
    from the server's own process mostly measures GIL contention)."""
    created = client.post("/api/v1/jobs", json=body).json()
    job_id = created["id"]
    if created["status"] == "done":  # answered from the cache at once: nothing to wait for
        return client.get(f"/api/v1/jobs/{job_id}").json()
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as events:
        for line in events.iter_lines():
            if line.startswith("event: ") and line[7:] in ("done", "failed", "cancelled", "interrupted"):
                break
    return client.get(f"/api/v1/jobs/{job_id}").json()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    _quiet_libraries()
    with tempfile.TemporaryDirectory() as data_dir:
        config = StudioConfig(data_dir=data_dir, models_dir=data_dir, preview_interval=0,
                              rate_per_minute=1e6, rate_burst=100_000)  # one client, many jobs: no throttling
        base, server, studio = serve(config)
        client = httpx.Client(base_url=base, timeout=120)
        raw = StableDiffusionPipeline.from_pretrained(builtin_folder("shapes", config.data_dir))
        raw.set_progress_bar_config(disable=True)
        prompt = "a red circle on a white background"

        # 1. Round trip vs raw call, interleaved.
        run_job(client, {"prompt": prompt, "steps": args.steps})  # warm-up: loads the model in the studio
        raw(prompt, num_inference_steps=args.steps)
        api_s, raw_s = [], []
        for index in range(args.repeats):
            started = time.perf_counter()
            run_job(client, {"prompt": prompt, "steps": args.steps})  # no seed: never a cache hit
            api_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            raw(prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(index))
            raw_s.append(time.perf_counter() - started)
        ratio = statistics.median(api_s) / statistics.median(raw_s)
        print(f"api_round_trip_vs_raw_ratio {ratio:.3f}  (api {statistics.median(api_s) * 1000:.0f} ms, raw "
              f"{statistics.median(raw_s) * 1000:.0f} ms, median of {args.repeats}, {args.steps} steps; goal <= 1.05)")

        # 2. Cache hit vs generation.
        body = {"prompt": prompt, "steps": args.steps, "seed": 99}
        started = time.perf_counter()
        run_job(client, body)
        generated_s = time.perf_counter() - started
        hits = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            job = run_job(client, body)
            hits.append(time.perf_counter() - started)
            assert job["result"].get("cached"), "expected a cache hit"
        hit_s = statistics.median(hits)
        print(f"cache_hit_speedup {generated_s / hit_s:.0f}x  (generation {generated_s * 1000:.0f} ms, hit "
              f"{hit_s * 1000:.1f} ms; goal >= 100x)")

        # 3. 8 concurrent clients: cross-user batching vs one job at a time (a global lock), alternating.
        def clients(round_index: int) -> float:
            bodies = [{"prompt": f"a {colour} star on a black background", "steps": args.steps,
                       "seed": 1000 * round_index + index}
                      for index, colour in enumerate(("red", "green", "blue", "yellow") * 2)]
            started = time.perf_counter()
            threads = [threading.Thread(target=run_job, args=(httpx.Client(base_url=base, timeout=300), body))
                       for body in bodies]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return time.perf_counter() - started

        batched_s, locked_s = [], []
        for round_index in range(args.repeats):
            for batch_images, times in ((8, batched_s), (1, locked_s)):
                studio.jobs.batch_images = batch_images
                times.append(clients(2 * round_index + (batch_images == 1)))
        studio.jobs.batch_images = config.batch_images
        speedup = statistics.median(locked_s) / statistics.median(batched_s)
        print(f"eight_clients_batching_vs_global_lock {speedup:.2f}x  (batched {statistics.median(batched_s):.2f} s, "
              f"one at a time {statistics.median(locked_s):.2f} s, median of {args.repeats}; goal >= 2x)")

        # 4. RSS growth over many jobs.
        process = psutil.Process()
        for _ in range(10):
            run_job(client, {"prompt": prompt, "steps": 2})
        before = process.memory_info().rss
        for index in range(args.jobs):
            run_job(client, {"prompt": f"{prompt} {index % 7}", "steps": 2})
        after = process.memory_info().rss
        print(f"rss_growth_over_{args.jobs}_jobs {100 * (after - before) / before:.2f}%  "
              f"({before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB; goal <= 5%)")
        server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
