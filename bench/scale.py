"""How the studio scales over workers and what the Ray executor costs, measured the way a user meets it: the real
`diffusion-studio serve` in a process of its own (settings by DS_* env), this process as its HTTP client, each job
waited on over its SSE stream; the built-in `builtin:shapes` at its default size, default preview_interval.
One line per figure, each a ratio of two studios measured side by side in this run:

1. scaling efficiency, local executor: N jobs (distinct seeds, same parameters) submitted at once to a studio with
   2 workers (DS_DEVICES='["cpu","cpu"]') vs one with 1 (DS_DEVICES='["cpu"]'): throughput ratio / 2; goal >= 0.85.
2. the same for the Ray executor (DS_RAY_WORKERS=2 vs 1; the studio starts and stops its own local Ray).
3. Ray dispatch overhead: one worker, jobs one at a time (the client waits for each), Ray (1 actor) vs local
   (1 worker): per-job time ratio - 1; goal <= 5%.
Every studio runs with torch_threads=1 (one torch thread per worker) and batch_images=1 (no cross-user batching, so
the service can't merge the concurrent jobs into one pipeline call), per-user limits lifted (one client, many
jobs), and is warmed up (one job per worker) before it is timed. Only one studio runs at a time (two busy studios
on a small machine would make every figure meaningless); rounds alternate the order (1, 2, 2, 1, ...) so that
drift in the machine's load doesn't decide a ratio. Under each figure, where the CPU went while it was timed (per
second of wall time: the serve process's event loop thread, its pool threads (the local engines, PNG saves), Ray's
actors and its own processes, this client, and every other process on the machine) and the ceiling the cores
allow say why a goal is missed.

With more than one CUDA GPU (torch.cuda.device_count() > 1, or --gpus N) the same figures measure N GPUs: devices
cuda:0..N-1 vs cuda:0 (local) and N vs 1 GPU actors (Ray).

    python bench/scale.py [--jobs 16] [--steps 20] [--rounds 3] [--sequential 6] [--workers 2] [--gpus N]
                          [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory, mkdtemp

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from servers import ServeProcess  # noqa: E402  (the tests' own: `diffusion-studio serve` in its own process)
from service import run_job  # noqa: E402  (bench/service.py's: submit, then wait on the job's SSE stream)

import torch  # noqa: E402  (after service, which sets HF_HUB_OFFLINE before the libraries load)

FINAL = ("done", "failed", "cancelled", "interrupted")
STUDIO = {"DS_TORCH_THREADS": "1", "DS_BATCH_IMAGES": "1", "DS_WORKERS": "1",
          # one client sends every job: the per-user rate and active-job limits would throttle it, not the workers
          "DS_RATE_PER_MINUTE": "1000000", "DS_RATE_BURST": "100000", "DS_MAX_ACTIVE_JOBS": "100000",
          "DS_MAX_QUEUE": "100000"}


@dataclass
class Setup:
    executor: str  # "local" | "ray"
    workers: int
    gpus: bool

    @property
    def name(self) -> str:
        return f"{self.executor}-{self.workers}"

    def env(self) -> dict[str, str]:
        if self.executor == "local":
            device = "cuda:{}" if self.gpus else "cpu"
            return {"DS_EXECUTOR": "local", "DS_DEVICES": json.dumps([device.format(i) for i in range(self.workers)])}
        # GPU actors when Ray sees GPUs. RAY_ADDRESS=local: a Ray of its own even when another one runs on this
        # machine, which ray.init(address=None) would join instead (it reads /tmp/ray/ray_current_cluster).
        return {"DS_EXECUTOR": "ray", "DS_RAY_WORKERS": str(self.workers), "RAY_ADDRESS": "local"}


# -- where the CPU goes ------------------------------------------------------------------------------------------
@dataclass
class Usage:
    """CPU seconds of the serve process's threads and its descendant processes, this process, and the machine."""

    threads: dict[int, float]
    children: dict[int, tuple[str, float]]
    client: float
    machine_busy: float
    at: float = field(default_factory=time.perf_counter)

    @classmethod
    def now(cls, serve_pid: int) -> Usage:
        serve = psutil.Process(serve_pid)
        threads = {thread.id: thread.user_time + thread.system_time for thread in serve.threads()}
        children = {}
        for child in serve.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                children[child.pid] = (_role(child), times.user + times.system)
        mine = psutil.Process().cpu_times()
        machine = psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return cls(threads, children, mine.user + mine.system, busy)


def _role(process: psutil.Process) -> str:
    """An engine actor, or the rest of Ray (GCS, raylet, idle workers, ...)."""
    with contextlib.suppress(psutil.Error):
        title = " ".join(process.cmdline())
        if "Engine" in title:  # the actor's process title: ray::EngineActor...
            return "actors"
    return "ray"


@dataclass
class Window:
    """What one timed stretch cost, summed over the rounds of one setup."""

    wall: float = 0.0
    jobs: int = 0
    engine_s: list[float] = field(default_factory=list)  # each job's result.timings.total_s (its run in the worker)
    parts: dict[str, float] = field(default_factory=dict)

    def add(self, before: Usage, after: Usage, serve_pid: int) -> None:
        self.wall += after.at - before.at
        threads = {tid: cpu - before.threads.get(tid, 0.0) for tid, cpu in after.threads.items()}
        # The main thread runs the event loop (HTTP, SSE, dispatch); asyncio's pool threads run the engine's batches
        # (local executor), the PNG saves and the checks, a job's steps not always on the same thread.
        parts = {"serve event loop": threads.pop(serve_pid, 0.0), "serve pool threads": sum(threads.values())}
        for pid, (role, cpu) in after.children.items():
            parts[role] = parts.get(role, 0.0) + cpu - before.children.get(pid, (role, 0.0))[1]
        parts["bench client"] = after.client - before.client
        parts["other processes"] = max(0.0, after.machine_busy - before.machine_busy - sum(parts.values()))
        for name, cpu in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + cpu

    def ours_per_job(self) -> float:
        """CPU seconds per job of the studio and this client together (all but the machine's other processes)."""
        return sum(cpu for name, cpu in self.parts.items() if name != "other processes") / self.jobs

    def describe(self) -> str:
        shown = ", ".join(f"{name} {cpu / self.wall:.2f}" for name, cpu in self.parts.items()
                          if cpu / self.wall >= 0.005)
        studio = self.ours_per_job() * self.jobs - self.parts["bench client"]
        return (f"cores busy per s of wall: {shown}; total {sum(self.parts.values()) / self.wall:.2f} of "
                f"{psutil.cpu_count()}; per job: studio CPU {studio / self.jobs:.2f} s, engine run "
                f"{statistics.median(self.engine_s):.2f} s (median)")


# -- one studio --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def studio(setup: Setup, log=print):
    """A warmed-up `serve` with `setup`'s workers, stopped (its Ray with it) on exit."""
    with TemporaryDirectory() as data_dir:
        started = time.perf_counter()
        serve = ServeProcess(Path(data_dir), **STUDIO, **setup.env())
        try:
            with httpx.Client(base_url=serve.url, timeout=600) as client:
                workers = wait_for_workers(client, setup.workers)
            if setup.executor == "ray" and "Started a local Ray instance" not in serve.output():
                raise RuntimeError("the studio joined a Ray cluster that was already running, not its own")
            warm_up(serve.url, workers)
            log(f"  {setup.name}: started and warm in {time.perf_counter() - started:.0f} s "
                f"(workers {', '.join(sorted(workers))})")
            yield serve
        except Exception:
            saved = Path(mkdtemp(prefix=f"scale-{setup.name}-")) / "serve.log"
            saved.write_text(serve.output())
            log(f"  {setup.name} failed; its log is in {saved}; the end of it:\n{serve.output()[-4000:]}")
            raise
        finally:
            stop(serve, log)


def wait_for_workers(client: httpx.Client, count: int, timeout: float = 300) -> set[str]:
    """Ray's actors join a few seconds after the studio answers."""
    deadline = time.time() + timeout
    while len(workers := client.get("/api/v1/queue").json()["worker_list"]) < count:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(workers)} of {count} workers joined")
        time.sleep(0.5)
    return {worker["id"] for worker in workers}


def warm_up(url: str, workers: set[str]) -> None:
    """Until every worker has run a job (each loads its own copy of the model). Staggered: each job is sent once
    the one before it runs its steps (so it goes to another worker, and its model is loaded by then), because two
    first loads at once in one process break it: accelerate's init_empty_weights patches torch.nn.Module
    process-wide, and two threads in it can leave it patched, so every later load fails ("Cannot copy out of meta
    tensor"). A timed run loads nothing; the figures are unaffected."""
    warm: set[str] = set()
    for attempt in range(10):
        jobs: list[dict] = [{} for _ in workers]
        threads = []
        for index in range(len(workers)):
            stepping = threading.Event()
            threads.append(threading.Thread(target=_follow, args=(url, body(10_000 + 100 * attempt + index, 20),
                                                                  stepping, jobs, index)))
            threads[-1].start()
            stepping.wait(600)
        for thread in threads:
            thread.join()
        failed = [job for job in jobs if job.get("status") != "done"]
        if failed:
            raise RuntimeError(f"a warm-up job did not finish: {failed[0]}")
        warm |= {job["result"]["worker"] for job in jobs}
        if warm >= workers:
            return
    raise RuntimeError(f"workers {sorted(workers - warm)} never got a warm-up job")


def _follow(url: str, job: dict, stepping: threading.Event, jobs: list[dict], index: int) -> None:
    """Submit `job` and follow its SSE stream; `stepping` is set at its first step (or its end)."""
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            job_id = client.post("/api/v1/jobs", json=job).raise_for_status().json()["id"]
            with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as events:
                for line in events.iter_lines():
                    if line == "event: step":
                        stepping.set()
                    elif line.startswith("event: ") and line[7:] in FINAL:
                        break
            jobs[index] = client.get(f"/api/v1/jobs/{job_id}").json()
    finally:
        stepping.set()


def stop(serve: ServeProcess, log) -> None:
    """SIGTERM, then make sure nothing it started (Ray's processes) outlives it."""
    try:
        descendants = psutil.Process(serve.process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        serve.stop(timeout=120)
    except Exception:  # noqa: BLE001 (it hung: say so, don't leave it running)
        log("  the studio did not stop within 120 s; killed")
        serve.kill()
    _, alive = psutil.wait_procs(descendants, timeout=30)
    if alive:
        log(f"  {len(alive)} processes it started outlived it by 30 s (killed): "
            + ", ".join(sorted({p.name() for p in alive if p.is_running()})))
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()


def body(seed: int, steps: int) -> dict:
    return {"prompt": "a red circle on a white background", "steps": steps, "seed": seed}


def submit_at_once(url: str, bodies: list[dict]) -> list[dict]:
    """One client thread per job, all started together (users submitting at the same moment)."""
    clients = [httpx.Client(base_url=url, timeout=600) for _ in bodies]
    results: list[dict] = [{} for _ in bodies]

    def one(index: int) -> None:
        results[index] = run_job(clients[index], bodies[index])

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    failed = [job for job in results if job.get("status") != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not finish: {failed[0]}")
    return results


def throughput(serve: ServeProcess, args, window: Window) -> float:
    """Jobs per second for `args.jobs` jobs submitted at once; the CPU it took goes into `window`."""
    bodies = [body(seed, args.steps) for seed in range(args.jobs)]  # the same jobs for every setup
    before = Usage.now(serve.process.pid)
    results = submit_at_once(serve.url, bodies)
    after = Usage.now(serve.process.pid)
    window.add(before, after, serve.process.pid)
    window.jobs += len(results)
    window.engine_s.extend(job["result"]["timings"]["total_s"] for job in results)
    merged = [job for job in results if job["result"].get("batched_with", 1) != 1]
    if merged:
        raise RuntimeError(f"{len(merged)} jobs were batched together although batch_images=1")
    return len(results) / (after.at - before.at)


def one_at_a_time(serve: ServeProcess, args) -> tuple[list[float], list[float]]:
    """(client seconds per job, engine seconds per job: result.timings.total_s inside the worker)."""
    walls, engine = [], []
    with httpx.Client(base_url=serve.url, timeout=600) as client:
        for seed in range(1000, 1000 + args.sequential):
            started = time.perf_counter()
            job = run_job(client, body(seed, args.steps))
            walls.append(time.perf_counter() - started)
            assert job["status"] == "done", job
            engine.append(job["result"]["timings"]["total_s"])
    return walls, engine


# -- the run -----------------------------------------------------------------------------------------------------
def machine(args, gpus: int, how: str) -> str:
    cores = f"{psutil.cpu_count()} cores ({psutil.cpu_count(logical=False)} physical)"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    where = f"{gpus} CUDA GPUs ({how}): {torch.cuda.get_device_name(0)}" if gpus else f"CPU workers ({how})"
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {cores}, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, load average {load}; torch {torch.__version__}, "
            f"1 torch thread per worker; {where}; {args.jobs} jobs at once, {args.sequential} one at a time, "
            f"{args.steps} steps of builtin:shapes, {args.rounds} rounds; batch_images=1 (no cross-user batching)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="jobs submitted at once per scaling measurement (16)")
    parser.add_argument("--steps", type=int, help="steps per job (20)")
    parser.add_argument("--rounds", type=int, help="times each studio is started and measured (3)")
    parser.add_argument("--sequential", type=int, help="jobs run one at a time per single-worker studio (6)")
    parser.add_argument("--workers", type=int, default=2, help="CPU workers of the scaled studios (2)")
    parser.add_argument("--gpus", type=int, help="measure N GPU workers vs 1 (default: every CUDA GPU if more "
                                                 "than one, else CPU workers; 0: CPU workers)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 4 jobs, 5 steps, 1 round")
    args = parser.parse_args()
    for name, full, quick in (("jobs", 16, 4), ("steps", 20, 5), ("rounds", 3, 1), ("sequential", 6, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    os.environ.pop("DS_RAY_ADDRESS", None)  # each studio starts (and stops) a local Ray of its own
    if args.gpus is None:
        found = torch.cuda.device_count()
        gpus, how = (found, "automatic") if found > 1 else (0, f"automatic: {found} CUDA GPUs")
    elif args.gpus > torch.cuda.device_count():
        parser.error(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    else:
        gpus, how = args.gpus, "--gpus"
    many = gpus or args.workers
    print(machine(args, gpus, how), flush=True)

    # --gpus 1: one studio per executor, for the dispatch overhead on a GPU (no scaling to measure)
    setups = [Setup(executor, count, gpus > 0) for executor in ("local", "ray") for count in sorted({1, many})]
    rates: dict[str, list[float]] = {setup.name: [] for setup in setups}
    windows = {setup.name: Window() for setup in setups}
    sequential: dict[str, tuple[list[float], list[float]]] = {"local-1": ([], []), "ray-1": ([], [])}
    for round_index in range(args.rounds):
        order = setups if round_index % 2 == 0 else setups[::-1]  # 1, N, 1, N then N, 1, N, 1: drift cancels
        print(f"round {round_index + 1} of {args.rounds}", flush=True)
        for setup in order:
            with studio(setup, log=lambda line: print(line, flush=True)) as serve:
                if setup.workers == 1:
                    walls, engine = one_at_a_time(serve, args)
                    sequential[setup.name][0].extend(walls)
                    sequential[setup.name][1].extend(engine)
                rates[setup.name].append(throughput(serve, args, windows[setup.name]))
            print(f"    {setup.name}: {rates[setup.name][-1]:.2f} jobs/s", flush=True)

    goal_note = f"{many} GPUs vs 1" if gpus else f"{many} workers vs 1, one torch thread each"
    for executor in ("local", "ray") if many > 1 else ():
        one, scaled = f"{executor}-1", f"{executor}-{many}"
        efficiency = statistics.median(rates[scaled]) / statistics.median(rates[one]) / many
        per_round = ", ".join(f"{b / a / many:.2f}" for a, b in zip(rates[one], rates[scaled]))
        print(f"scaling_efficiency_{executor}: {efficiency:.2f} (goal >= 0.85; {goal_note}; "
              f"{statistics.median(rates[one]):.2f} -> {statistics.median(rates[scaled]):.2f} jobs/s, median of "
              f"{args.rounds}; per round {per_round})")
        # What the cores allow: a job's CPU at one worker (its serve process, actors, this client) times N workers
        # at one worker's pace can't exceed the machine's cores. A ceiling near 1 with a low efficiency is the
        # executor's (its threads waiting on each other: the CPU per job grows, the cores aren't all busy).
        demand = windows[one].ours_per_job() * many * statistics.median(rates[one])
        print(f"    the {psutil.cpu_count()} cores allow at most {min(1.0, psutil.cpu_count() / demand):.2f} here "
              f"with nothing else running ({windows[one].ours_per_job():.2f} s of CPU per job at 1 worker, "
              f"x {many} workers x {statistics.median(rates[one]):.2f} jobs/s)")
        for name in (one, scaled):
            print(f"    {name}: {windows[name].describe()}")
    local_s, local_engine = sequential["local-1"]
    ray_s, ray_engine = sequential["ray-1"]
    overhead = statistics.median(ray_s) / statistics.median(local_s) - 1
    # The engine's own run varies by +-10% from one studio process to the next on a busy machine; what a job spends
    # outside it (dispatch, step events, saving, HTTP) is the executor's own part, and much steadier.
    outside = [statistics.median(wall - engine for wall, engine in zip(*sequential[name]))
               for name in ("ray-1", "local-1")]
    print(f"ray_dispatch_overhead_per_job: {100 * overhead:+.1f}% (goal <= 5%; one worker, one job at a time; "
          f"ray {1000 * statistics.median(ray_s):.0f} ms vs local {1000 * statistics.median(local_s):.0f} ms per "
          f"job, median of {len(ray_s)}; of which the engine's own run inside the worker: ray "
          f"{1000 * statistics.median(ray_engine):.0f} ms, local {1000 * statistics.median(local_engine):.0f} ms; "
          f"outside it: ray {1000 * outside[0]:.0f} ms, local {1000 * outside[1]:.0f} ms, the difference "
          f"{100 * (outside[0] - outside[1]) / statistics.median(local_s):+.1f}% of a local job)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
