"""The studio under load and over time, measured the way its users meet it: the real `diffusion-studio serve` in a
process of its own (auth on, a users file of 50 users with one API token each, builtin:shapes, every limit as
shipped: rate_per_minute, rate_burst, max_active_jobs, max_queue, batch_images, preview_interval), this process
as its clients on loopback (asyncio + httpx, each client its own connections and token; bench/load_clients.py).
Every job is tiny (32x32 px, 2 steps) so that the figures are the studio's, not the model's:

1. many users: 50 clients x 4 jobs as 50 different users, every job sent at once;
2. one user: 50 clients x 4 jobs all as ONE user (one token shared), every job sent at once;
3. soak: 1,000 mixed jobs (txt2img, img2img, inpaint, ControlNet, cached repeats, cancelled while queued and while
   running, invalid bodies) from 16 clients of 4 users, each client one job after another.

Clients honour 429 + Retry-After (they sleep that long, plus at most 0.25 s, and send again) and count every 429.
Per phase: admitted, 429s (and whether each had Retry-After), done, failed, lost (admitted, outcome never came or
the job vanished), cancelled, invalid refused, p50/p95 queue wait (the job record's created_at -> started_at) and
end-to-end time (the client's first POST -> its outcome), and whether the server's history holds exactly the
admitted jobs, all finished (no job nobody was told of, none gone); for the soak also the server's RSS, open file
descriptors and threads (psutil on its pid), the database (studio.db + -wal) and the outputs folder, at the start,
after a warm-up (the baseline for growth: by then every mode has run and its models are loaded) and at the end,
with the peaks. Goals as PASS/FAIL lines, and a markdown table for README.

    python bench/load.py [--quick] [--json results.json]

--quick (one to two minutes): 20 clients x 2 jobs per phase, a soak of 120. Its resource goals are printed but do not
decide the exit status (too few jobs to judge growth); every other goal does, in both runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from load_clients import (FINAL, INVALID_BODIES, StudioClient, Tally, centre_mask,  # noqa: E402
                          percentile, png_base64, shape_image)
from servers import ServeProcess, make_users  # noqa: E402  (the tests' own: `serve` in its own process)

SIZE, STEPS = 32, 2
RSS_GROWTH_GOAL = 0.05
FD_SLACK = 4  # a log rotation, a lazily opened file: more than this is a leak
SOAK_MIX = {  # shares of the soak's jobs
    "txt2img": 0.40, "img2img": 0.14, "inpaint": 0.14, "controlnet": 0.14, "cached": 0.06,
    "cancel-queued": 0.03, "cancel-running": 0.03, "invalid": 0.06}
SOAK_USERS = 4
WARMUP_SHARE = 0.1  # the soak's first 10% of jobs warm it up; its resources after them are the growth baseline


@dataclass
class Plan:
    users: int  # phase 1's users (the users file holds max(users, SOAK_USERS))
    jobs_per_client: int
    soak_jobs: int
    soak_clients: int
    quick: bool


# -- bodies ------------------------------------------------------------------------------------------------------
class Bodies:
    """Request bodies for every kind of job; seeds count up so no two generations are the same request."""

    def __init__(self):
        self.seed = 0
        image = png_base64(shape_image(SIZE))
        self.inputs = {"img2img": {"init_image": image, "strength": 0.6},
                       "inpaint": {"init_image": image, "mask_image": png_base64(centre_mask(SIZE))},
                       "controlnet": {"control_image": image}}  # the base's built-in canny ControlNet

    def body(self, mode: str = "txt2img", seed: bool = True, steps: int = STEPS, size: int = SIZE) -> dict:
        self.seed += 1
        body = {"prompt": f"a red circle number {self.seed}", "width": size, "height": size, "steps": steps,
                "mode": mode, **self.inputs.get(mode, {})}
        if seed:
            body["seed"] = self.seed
        return body

    def invalid(self) -> dict:
        self.seed += 1
        return dict(INVALID_BODIES[self.seed % len(INVALID_BODIES)])


# -- the server's resources --------------------------------------------------------------------------------------
def resources(pid: int, data_dir: Path) -> dict:
    process = psutil.Process(pid)
    database = sum(path.stat().st_size for path in (data_dir / "studio.db", data_dir / "studio.db-wal")
                   if path.exists())
    inodes: dict[int, int] = {}  # a cached repeat's images are hard links to the original's: count them once
    for path in (data_dir / "outputs").rglob("*"):
        if path.is_file():
            stat = path.stat()
            inodes[stat.st_ino] = stat.st_size
    return {"rss": process.memory_info().rss, "fds": process.num_fds(), "threads": process.num_threads(),
            "database": database, "outputs": sum(inodes.values()), "output_files": len(inodes)}


async def sample_peaks(pid: int, peaks: dict, stop: asyncio.Event) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        peaks["rss"] = max(peaks.get("rss", 0), process.memory_info().rss)
        peaks["fds"] = max(peaks.get("fds", 0), process.num_fds())
        peaks["threads"] = max(peaks.get("threads", 0), process.num_threads())
        await asyncio.sleep(0.5)


async def idle(url: str, token: str, timeout: float = 600) -> None:
    """Until the studio has nothing queued or running (between phases, so one doesn't bleed into the next)."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queue = (await client.get("/api/v1/queue")).json()
            if queue["queued"] == 0 and queue["running"] == 0:
                return
            await asyncio.sleep(0.5)
    raise TimeoutError("the studio still had jobs queued or running")


async def history_jobs(url: str, tokens: list[tuple[str, str]], since: float) -> dict[str, int]:
    """The jobs the studio's history holds, created since `since`, of these users: status -> count. Each client
    counts what it was told; this counts what the server kept (a job nobody was told of, or one that vanished)."""
    statuses: dict[str, int] = {}
    for token in dict(tokens).values():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            offset = 0
            while True:
                page = (await client.get("/api/v1/history", params={"since": since, "limit": 500,
                                                                    "offset": offset})).raise_for_status().json()
                for job in page:
                    statuses[job["status"]] = statuses.get(job["status"], 0) + 1
                if len(page) < 500:
                    break
                offset += 500
    return statuses


# -- the phases --------------------------------------------------------------------------------------------------
async def burst(url: str, tokens: list[tuple[str, str]], jobs_per_client: int, bodies: Bodies) -> Tally:
    """One client per (user, token); each sends all its jobs at once (no seed: never a cache hit)."""
    tally = Tally()
    since, started = time.time(), time.perf_counter()
    clients = [StudioClient(url, user, token, tally, started) for user, token in tokens]
    try:
        await asyncio.gather(*(client.run(bodies.body(seed=False)) for client in clients
                               for _ in range(jobs_per_client)))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    tally.wall_s = time.perf_counter() - started
    await idle(url, tokens[0][1])
    tally.history = await history_jobs(url, tokens, since)
    return tally


MODES = ("txt2img", "img2img", "inpaint", "controlnet")


def soak_kinds(count: int, clients: int, rng: random.Random) -> list[list[str]]:
    """Each client's kinds of job, in order: the mix's shares of `count`, shuffled. Each client starts with a
    txt2img (its user then has a done explicit-seed job for a cached repeat to hit), then one of the four modes in
    turn, so that the warm-up (every client's first jobs) runs every mode and loads every model."""
    kinds = [kind for kind, share in SOAK_MIX.items() for _ in range(max(1, round(share * count)))]
    kinds = (kinds + ["txt2img"] * count)[:count]
    openings = [["txt2img", MODES[index % len(MODES)]] for index in range(clients)]
    for opening in openings:
        for kind in opening:
            kinds.remove(kind)
    rng.shuffle(kinds)
    return [opening + kinds[index::clients] for index, opening in enumerate(openings)]


async def soak(url: str, tokens: list[tuple[str, str]], plan: Plan, bodies: Bodies, serve_pid: int,
               data_dir: Path) -> tuple[Tally, dict]:
    """The mix in two stages with the studio idle between them and after: a warm-up (each client's first jobs,
    10% of the soak), whose end is the baseline for growth, then the rest."""
    tally = Tally()
    rng = random.Random(16)
    seen = {"start": resources(serve_pid, data_dir)}
    peaks: dict = {}
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_peaks(serve_pid, peaks, stop))
    done_seeded: dict[str, list[dict]] = {}  # user -> bodies of their done explicit-seed txt2img jobs
    since, started = time.time(), time.perf_counter()
    clients = [StudioClient(url, *tokens[index % len(tokens)], tally, started) for index in range(plan.soak_clients)]
    plans = soak_kinds(plan.soak_jobs, len(clients), rng)
    warmup = max(2, round(WARMUP_SHARE * plan.soak_jobs / len(clients)))

    async def client_run(client: StudioClient, kinds: list[str]) -> None:
        for kind in kinds:
            if kind == "invalid":
                body = bodies.invalid()
            elif kind == "cached":
                body = rng.choice(done_seeded.get(client.user) or [bodies.body()])  # none: counts as a miss
            elif kind == "cancel-running":
                body = bodies.body(steps=40, size=64)  # long enough to be caught at its first step
            elif kind == "cancel-queued":
                body = bodies.body()
            else:
                body = bodies.body(kind)
            job = await client.run(body, kind)
            if kind == "txt2img" and job is not None and job["status"] == "done":
                done_seeded.setdefault(client.user, []).append(body)

    async def stage(part: slice) -> None:
        await asyncio.gather(*(client_run(client, kinds[part]) for client, kinds in zip(clients, plans)))
        await idle(url, tokens[0][1])

    try:
        await stage(slice(0, warmup))
        await asyncio.sleep(1)
        seen["baseline"] = resources(serve_pid, data_dir)
        seen["warmup_jobs"] = tally.sent
        await stage(slice(warmup, None))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    tally.wall_s = time.perf_counter() - started
    await asyncio.sleep(2)  # the server closes the clients' connections
    seen["end"] = resources(serve_pid, data_dir)
    stop.set()
    await sampler
    seen["peak"] = peaks
    tally.history = await history_jobs(url, tokens, since)
    return tally, seen


# -- the report --------------------------------------------------------------------------------------------------
def machine() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
            f"{psutil.cpu_count()} cores ({psutil.cpu_count(logical=False)} physical), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, load average {load}; Python "
            f"{platform.python_version()}")


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def describe(name: str, tally: Tally) -> str:
    s = tally.summary()
    fairness = ""
    if len(tally.finished_by_user) > 1:
        ends = sorted(tally.finished_by_user.values())
        fairness = (f"; per-user completion (last job's end): first {ends[0]:.1f} s, median "
                    f"{percentile(ends, 50):.1f} s, last {ends[-1]:.1f} s")
    return (f"{name}: sent {s['sent']}, admitted {s['admitted']}, 429s {s['throttled']} "
            f"({s['throttled'] - s['throttled_without_retry_after']} with Retry-After), done {s['done']}, failed "
            f"{s['failed']}, interrupted {s['interrupted']}, lost {s['lost']}, cancelled {s['cancelled']} "
            f"(cancel too late: done {s['cancel_too_late']}), invalid refused {s['invalid_refused']}, cached hits "
            f"{s['cached_hits']}, queue wait p50/p95 {seconds(s['wait_p50_s'])}/{seconds(s['wait_p95_s'])} s, "
            f"end-to-end p50/p95 {seconds(s['end_to_end_p50_s'])}/{seconds(s['end_to_end_p95_s'])} s; "
            f"connections dropped unanswered (sent again) {s['dropped']}; "
            f"{tally.wall_s:.0f} s wall, {s['admitted'] / tally.wall_s:.1f} jobs/s{fairness}"
            + "".join(f"\n    unexpected: {problem}" for problem in tally.problems))


def goals(phases: dict[str, Tally], seen: dict) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """(correctness goals, resource goals): each a line and whether it passed."""
    correctness = []
    for name, tally in phases.items():
        s = tally.summary()
        correctness += [
            (f"{name}: 0 lost ({s['lost']})", s["lost"] == 0),
            (f"{name}: 0 failed that should have succeeded ({s['failed_unexpectedly']}), 0 refused that should "
             f"have been admitted ({s['refused_unexpectedly']}), 0 server errors ({s['server_errors']})",
             s["failed_unexpectedly"] == s["refused_unexpectedly"] == s["server_errors"] == 0),
            (f"{name}: the history holds exactly the admitted jobs, all finished ({sum(tally.history.values())} "
             f"jobs: {', '.join(f'{n} {status}' for status, n in sorted(tally.history.items()))})",
             sum(tally.history.values()) == s["admitted"]
             and sum(tally.history.get(status, 0) for status in FINAL) == s["admitted"]),
            (f"{name}: every 429 had Retry-After ({s['throttled_without_retry_after']} of {s['throttled']} had "
             f"none)", s["throttled_without_retry_after"] == 0),
            (f"{name}: the counts add up (admitted {s['admitted']} = done {s['done']} + failed {s['failed']} + "
             f"cancelled {s['cancelled']} + interrupted {s['interrupted']} + lost {s['lost']}; sent {s['sent']} = "
             f"admitted + refused)", s["accounted"]),
        ]
    s = phases["soak"].summary()
    correctness += [
        (f"soak: every invalid body refused with a 4xx ({s['invalid_refused']} refused: "
         f"{', '.join(f'{n} x {code}' for code, n in sorted(s['invalid_codes'].items()))}; {s['invalid_admitted']} "
         f"admitted)", s["invalid_admitted"] == 0 and s["invalid_refused"] > 0),
        (f"soak: every repeat answered from the cache ({s['cached_hits']} hits, {s['cached_misses']} misses)",
         s["cached_misses"] == 0 and s["cached_hits"] > 0),
    ]
    base, end, start = seen["baseline"], seen["end"], seen["start"]
    growth = end["rss"] / base["rss"] - 1
    resource = [
        (f"soak: RSS growth after warm-up {100 * growth:+.1f}% ({base['rss'] / 2**20:.0f} -> "
         f"{end['rss'] / 2**20:.0f} MiB; goal <= {100 * RSS_GROWTH_GOAL:.0f}%)", growth <= RSS_GROWTH_GOAL),
        (f"soak: open file descriptors flat ({start['fds']} at start, {base['fds']} after warm-up, {end['fds']} "
         f"at end, peak {seen['peak']['fds']}; goal: end <= start + {FD_SLACK})", end["fds"] <= start["fds"] + FD_SLACK),
    ]
    return correctness, resource


def table(phases: dict[str, Tally]) -> str:
    rows = ["| phase | jobs | admitted | 429s (all with Retry-After) | done | failed | lost | cancelled | "
            "invalid refused | connections dropped | queue wait p50 / p95 | end-to-end p50 / p95 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, tally in phases.items():
        s = tally.summary()
        retry = "yes" if s["throttled_without_retry_after"] == 0 else f"no: {s['throttled_without_retry_after']}"
        rows.append(f"| {name} | {s['sent']} | {s['admitted']} | {s['throttled']} ({retry}) | {s['done']} | "
                    f"{s['failed'] + s['interrupted']} | {s['lost']} | {s['cancelled']} | {s['invalid_refused']} | "
                    f"{s['dropped']} | "
                    f"{seconds(s['wait_p50_s'])} / {seconds(s['wait_p95_s'])} s | "
                    f"{seconds(s['end_to_end_p50_s'])} / {seconds(s['end_to_end_p95_s'])} s |")
    return "\n".join(rows)


def resource_table(seen: dict) -> str:
    mib = lambda value: f"{value / 2**20:.1f} MiB"  # noqa: E731
    rows = ["| soak: server | start | after warm-up | end | peak |", "|---|---|---|---|---|"]
    for key, label, shown in (("rss", "RSS", mib), ("fds", "open file descriptors", str),
                              ("threads", "threads", str), ("database", "studio.db + -wal", mib),
                              ("outputs", "outputs folder", mib), ("output_files", "output files", str)):
        peak = shown(seen["peak"][key]) if key in seen["peak"] else "-"
        rows.append(f"| {label} | {shown(seen['start'][key])} | {shown(seen['baseline'][key])} | "
                    f"{shown(seen['end'][key])} | {peak} |")
    return "\n".join(rows)


# -- the run -----------------------------------------------------------------------------------------------------
async def measure(serve: ServeProcess, tokens: dict[str, str], plan: Plan, data_dir: Path) -> tuple[dict, dict]:
    bodies = Bodies()
    names = sorted(tokens)
    first = names[0]
    # One job first, so that phase 1's times aren't its first model load.
    warm = Tally()
    client = StudioClient(serve.url, first, tokens[first], warm, time.perf_counter())
    await client.run(bodies.body(seed=False))
    await client.close()
    if warm.outcomes["done"] != 1:
        raise RuntimeError(f"the warm-up job did not finish: {warm.problems}")
    phases: dict[str, Tally] = {}
    many = [(name, tokens[name]) for name in names[:plan.users]]
    print(f"phase 1: {plan.users} clients x {plan.jobs_per_client} jobs, each client its own user", flush=True)
    phases["many users"] = await burst(serve.url, many, plan.jobs_per_client, bodies)
    print("  " + describe("many users", phases["many users"]), flush=True)
    print(f"phase 2: {plan.users} clients x {plan.jobs_per_client} jobs, all one user ({first})", flush=True)
    phases["one user"] = await burst(serve.url, [(first, tokens[first])] * plan.users, plan.jobs_per_client, bodies)
    print("  " + describe("one user", phases["one user"]), flush=True)
    print(f"phase 3: soak of {plan.soak_jobs} mixed jobs from {plan.soak_clients} clients of {SOAK_USERS} users "
          f"({', '.join(f'{kind} {share:.0%}' for kind, share in SOAK_MIX.items())})", flush=True)
    soak_tokens = [(name, tokens[name]) for name in names[:SOAK_USERS]]
    phases["soak"], seen = await soak(serve.url, soak_tokens, plan, bodies, serve.process.pid, data_dir)
    print("  " + describe("soak", phases["soak"]), flush=True)
    return phases, seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of one to two minutes")
    parser.add_argument("--users", type=int, help="phase 1 and 2 clients (50; --quick 20)")
    parser.add_argument("--jobs-per-client", type=int, help="jobs each phase 1/2 client sends at once (4; quick 2)")
    parser.add_argument("--soak", type=int, dest="soak_jobs", help="soak jobs (1000; --quick 120)")
    parser.add_argument("--soak-clients", type=int, help="soak clients, spread over 4 users (16; --quick 8)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    defaults = {"users": (50, 20), "jobs_per_client": (4, 2), "soak_jobs": (1000, 120), "soak_clients": (16, 8)}
    plan = Plan(quick=args.quick, **{name: getattr(args, name) or values[args.quick]
                                     for name, values in defaults.items()})
    if plan.soak_clients < SOAK_USERS or plan.soak_jobs < 2 * plan.soak_clients:
        parser.error(f"--soak-clients must be at least {SOAK_USERS}, and --soak at least twice --soak-clients")
    print(machine(), flush=True)
    print(f"studio: auth on, {max(plan.users, SOAK_USERS)} users with a token each, builtin:shapes, {SIZE}x{SIZE} "
          f"px, {STEPS} steps, limits as shipped", flush=True)
    with tempfile.TemporaryDirectory(prefix="load-") as scratch:
        data_dir = Path(scratch)
        started = time.perf_counter()
        names = [f"user{index:02d}" for index in range(max(plan.users, SOAK_USERS))]
        _, tokens = make_users(data_dir / "users.json", {name: f"password-{name}" for name in names})
        serve = ServeProcess(data_dir, DS_AUTH="on")
        try:
            phases, seen = asyncio.run(measure(serve, tokens, plan, data_dir))
        except BaseException:
            print("the studio's log ends:\n" + serve.output()[-4000:], flush=True)
            raise
        finally:
            serve.stop(timeout=120)
        tracebacks = serve.output().count("Traceback (most recent call last)")
    print(f"growth baseline: the studio idle after the soak's first {seen['warmup_jobs']} jobs (every client's "
          f"first jobs: every mode has run and loaded its models by then)")
    print(resource_table(seen))
    print()
    print(table(phases))
    print()
    correctness, resource = goals(phases, seen)
    correctness.append((f"server log: no tracebacks ({tracebacks})", tracebacks == 0))
    for line, ok in correctness + resource:
        judged = "" if ok or not plan.quick or (line, ok) not in resource else " (not judged in --quick)"
        print(f"{'PASS' if ok else 'FAIL'} {line}{judged}")
    dropped = sum(tally.dropped for tally in phases.values())
    if dropped:
        print(f"note: {dropped} POSTs met a kept-alive connection the server closed unanswered (uvicorn closes idle "
              "connections after 5 s, httpx reuses them for up to 5 s); each was sent again on a fresh connection, "
              "and the history check above shows none of them had made a job")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "plan": plan.__dict__,
            "phases": {name: {**tally.summary(), "history": tally.history} for name, tally in phases.items()},
            "resources": seen, "tracebacks": tracebacks,
            "goals": [{"goal": line, "passed": ok, "kind": kind} for kinds, kind in
                      ((correctness, "correctness"), (resource, "resource")) for line, ok in kinds]}, indent=2))
    failed = [line for line, ok in correctness if not ok] + ([] if plan.quick else
                                                               [line for line, ok in resource if not ok])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
