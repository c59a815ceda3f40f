"""The job service's overhead and gains, measured side by side in one run, one line per figure. Every figure is
taken against real `diffusion-studio serve` processes (default settings unless a line says otherwise), this process
being their HTTP client:

1. The served round trip (POST /api/v1/jobs, wait on its SSE stream to `done`) vs the same request as a raw
   diffusers call in a process of its own (on its main thread), alternating A, B, A, B; medians; goal <= 1.05. Under
   it, the engine's own time inside the server (the job's `timings.total_s`) vs the raw call, to tell the API's cost
   from the engine's.
2. cache hit vs generation for a repeated explicit-seed request; goal >= 100x.
3. 8 concurrent clients (different prompts and seeds, same parameters) with cross-user batching vs the same 8
   requests one at a time, as behind a global lock (a second server with batch_images = 1), alternating; goal >= 2x.
4. RSS growth of the serve process over N jobs through the API after a warm-up; goal <= 5%.

    python bench/service.py [--jobs 200] [--steps 20] [--repeats 15] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx
import psutil

PROMPT = "a red circle on a white background"
GUIDANCE = 5.0  # the studio's default: the raw call does the same work


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(data_dir: str, **settings):
    """`diffusion-studio serve` in its own process (settings as DS_* variables); yields (base URL, its pid)."""
    port = free_port()
    env = {**os.environ, "DS_RATE_PER_MINUTE": "1000000", "DS_RATE_BURST": "100000",  # one client, many jobs
           "NO_PROXY": "localhost,127.0.0.1",
           **{f"DS_{key.upper()}": str(value) for key, value in settings.items()}}
    command = Path(sys.executable).with_name("diffusion-studio")  # the installed command, as a user runs it
    with tempfile.TemporaryFile() as log:  # not a pipe: a full pipe would stall the server
        process = subprocess.Popen([str(command), "serve", "--data-dir", data_dir, "--port", str(port)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=log)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"serve exited: {log.read().decode()[-2000:]}")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("serve did not answer within 180 s")
                time.sleep(0.2)
            yield base, process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


class RawProcess:
    """A raw diffusers pipeline on the built-in, in a process of its own, timing each call on its main thread."""

    def __init__(self, data_dir: str, size: int):
        self.process = subprocess.Popen([sys.executable, __file__, "--raw-worker", data_dir, str(size)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def run(self, steps: int, seed: int) -> float:
        self.process.stdin.write(f"{steps} {seed}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def raw_worker(data_dir: str, size: int) -> int:
    """The raw side of figure 1: load the pipeline, then run one call per line of stdin ("steps seed")."""
    import torch
    from diffusers import StableDiffusionPipeline

    from diffusion_studio.builtin.catalog import builtin_folder, ensure_standins

    ensure_standins(Path(data_dir))
    pipe = StableDiffusionPipeline.from_pretrained(builtin_folder("shapes", Path(data_dir)))
    pipe.set_progress_bar_config(disable=True)
    print("ready", flush=True)
    for line in sys.stdin:
        steps, seed = map(int, line.split())
        started = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, width=size, height=size,
             generator=torch.Generator().manual_seed(seed))
        print(time.perf_counter() - started, flush=True)
    return 0


def run_job(client: httpx.Client, body: dict) -> dict:
    """Submit and wait on the job's event stream, as a client should; the finished job's record."""
    created = client.post("/api/v1/jobs", json=body)
    created.raise_for_status()
    created = created.json()
    job_id = created["id"]
    if created["status"] == "done":  # answered from the cache at once: nothing to wait for
        return client.get(f"/api/v1/jobs/{job_id}").json()
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as events:
        for line in events.iter_lines():
            if line.startswith("event: ") and line[7:] in ("done", "failed", "cancelled", "interrupted"):
                break
    return client.get(f"/api/v1/jobs/{job_id}").json()


def round_trip(base: str, raw: RawProcess, args) -> None:
    """Figure 1: served round trip vs raw call, alternating (which goes first alternates too)."""
    body = {"prompt": PROMPT, "steps": args.steps, "width": args.size, "height": args.size, "guidance": GUIDANCE}
    with httpx.Client(base_url=base, timeout=120) as client:
        for _ in range(2):  # warm-up: the model loads in the studio, both sides' first calls
            run_job(client, body)
            raw.run(args.steps, 0)
        served_s, engine_s, raw_s = [], [], []
        for index in range(args.repeats):
            for side in (("served", "raw") if index % 2 == 0 else ("raw", "served")):
                if side == "raw":
                    raw_s.append(raw.run(args.steps, index))
                    continue
                started = time.perf_counter()
                job = run_job(client, body)  # no seed: never a cache hit
                served_s.append(time.perf_counter() - started)
                engine_s.append(job["result"]["timings"]["total_s"])
    served, engine, raw_median = (statistics.median(values) for values in (served_s, engine_s, raw_s))
    print(f"served_round_trip_vs_raw_ratio {served / raw_median:.3f}  (served {served * 1000:.0f} ms from a "
          f"separate client process, raw {raw_median * 1000:.0f} ms in its own process; median of {args.repeats}, "
          f"{args.steps} steps at {args.size} px; goal <= 1.05)")
    print(f"  engine_in_server_vs_raw_ratio {engine / raw_median:.3f}  (the engine's own {engine * 1000:.0f} ms; "
          f"the API and client add {(served - engine) * 1000:.0f} ms)")


def cache_hits(base: str, args) -> None:
    body = {"prompt": PROMPT, "steps": args.steps, "seed": 99}
    with httpx.Client(base_url=base, timeout=120) as client:
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


def eight_clients(base: str, round_index: int, steps: int) -> float:
    bodies = [{"prompt": f"a {colour} star on a black background", "steps": steps, "seed": 1000 * round_index + index}
              for index, colour in enumerate(("red", "green", "blue", "yellow") * 2)]

    def one(body):
        with httpx.Client(base_url=base, timeout=300) as client:
            run_job(client, body)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def batching(batched_base: str, locked_base: str, args) -> None:
    for base in (batched_base, locked_base):  # warm-up: each loads its model
        eight_clients(base, 0, 2)
    batched_s, locked_s = [], []
    for round_index in range(args.rounds):
        batched_s.append(eight_clients(batched_base, 2 * round_index + 1, args.steps))
        locked_s.append(eight_clients(locked_base, 2 * round_index + 2, args.steps))
    speedup = statistics.median(locked_s) / statistics.median(batched_s)
    print(f"eight_clients_batching_vs_global_lock {speedup:.2f}x  (batched {statistics.median(batched_s):.2f} s, "
          f"one at a time {statistics.median(locked_s):.2f} s, median of {args.rounds}; goal >= 2x)")


def rss_growth(base: str, pid: int, args) -> None:
    process = psutil.Process(pid)
    with httpx.Client(base_url=base, timeout=120) as client:
        for _ in range(10):
            run_job(client, {"prompt": PROMPT, "steps": 2})
        before = process.memory_info().rss
        for index in range(args.jobs):
            run_job(client, {"prompt": f"{PROMPT} {index % 7}", "steps": 2})
        after = process.memory_info().rss
    print(f"rss_growth_over_{args.jobs}_jobs {100 * (after - before) / before:.2f}%  "
          f"({before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB in the serve process; goal <= 5%)")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--raw-worker":
        return raw_worker(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15, help="alternating pairs for figures 1 and 2")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds for figure 3")
    parser.add_argument("--only", choices=["round-trip"], help="figure 1 alone")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}  ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as data_dir, serving(data_dir) as (base, pid):
        raw = RawProcess(data_dir, args.size)
        try:
            round_trip(base, raw, args)
        finally:
            raw.close()
        if args.only:
            return 0
        cache_hits(base, args)
        rss_growth(base, pid, args)
        with tempfile.TemporaryDirectory() as locked_dir, serving(locked_dir, batch_images=1) as (locked_base, _):
            batching(base, locked_base, args)
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
