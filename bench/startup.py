"""How long the studio takes to start, measured the way a user meets it: the real `diffusion-studio serve` (the
console script beside this interpreter) in a fresh process on a free port, timed from the launch to the port
accepting a connection and to the first HTTP 200 of `/` (the page, usable: Gradio's config is built into it).
Models still load on first use; nothing here generates.

Two data dirs, the runs alternating between them (fresh, history, fresh, history, ...) so that a busy machine
slows both alike:
- fresh: a new, empty data dir each run (the first start of an install, or of a new data dir);
- history: one data dir with a history of --history finished jobs (their rows and 64 px PNGs) that every run
  starts on again (a studio's later starts: its hashes file, history and outputs are there).

Prints median and p90 seconds to the port and to `/` for each, the CPU seconds serve used until `/` answered (on a
machine others are using, the wall time grows with their load and this does not), and the goal line: `/` within
GOAL_S (wall time).

    python bench/startup.py [--runs 5] [--history 500] [--json results.json]
    python bench/startup.py --why    # where the start goes: `python -X importtime` top offenders (cumulative)
                                     # and a cProfile of build_app, in this machine's terms

The first start after an install also compiles the package's .pyc files; `--no-bytecode-cache` starts each run
with PYTHONDONTWRITEBYTECODE=1 and a private, empty PYTHONPYCACHEPREFIX, to see that cost. Otherwise the starts use
and write the .pyc cache as an installed studio does, even from a shell with PYTHONDONTWRITEBYTECODE set (that alone
made every start compile the studio's ~80 modules again, about 0.3 s here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

GOAL_S = 5.0
LAUNCH_TIMEOUT_S = 120.0
POLL_S = 0.02
ENV = {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
       "NO_PROXY": "localhost,127.0.0.1"}


def serve_command() -> list[str]:
    """The installed console script beside this interpreter (what a user runs), else the module."""
    script = Path(sys.executable).with_name("diffusion-studio")
    return [str(script)] if script.exists() else [sys.executable, "-m", "diffusion_studio.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def page_answers(client: httpx.Client, port: int) -> bool:
    try:
        return client.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) the process has used so far; None where /proc can't tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def start_once(data_dir: Path, extra_env: dict[str, str] | None = None) -> dict:
    """One start: seconds from launching `serve` to the port accepting and to the first 200 of `/`, and the CPU
    seconds serve used until then (a start is one thread's work: on a quiet machine about its wall time; on a busy
    one the wall time grows with the load and the CPU time does not)."""
    port = free_port()
    env = {**os.environ, **ENV, **(extra_env or {})}
    env.pop("DS_CONFIG_FILE", None)
    if "PYTHONDONTWRITEBYTECODE" not in (extra_env or {}):
        # An install has its .pyc files (pip compiles a wheel's; an editable install writes them on its first
        # start): a shell that turns the cache off must not make every start compile the studio's modules.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [*serve_command(), "serve", "--port", str(port), "--data-dir", str(data_dir),
               "--models-dir", str(data_dir / "models")]
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        port_s = page_s = cpu_s = None
        try:
            with httpx.Client() as client:
                while page_s is None:
                    if process.poll() is not None or time.perf_counter() - started > LAUNCH_TIMEOUT_S:
                        log.seek(0)
                        raise RuntimeError("serve did not start:\n" + log.read().decode(errors="replace")[-3000:])
                    if port_s is None:
                        if accepts(port):
                            port_s = time.perf_counter() - started
                        else:
                            time.sleep(POLL_S)
                            continue
                    if page_answers(client, port):
                        page_s = time.perf_counter() - started
                        cpu_s = cpu_seconds(process.pid)
                    else:
                        time.sleep(POLL_S)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return {"port_s": port_s, "page_s": page_s, "cpu_s": cpu_s}


def make_history(data_dir: Path, jobs: int) -> None:
    """`jobs` finished jobs as the studio keeps them: a row each and its 64 px PNG under outputs/<day>/."""
    from PIL import Image

    from diffusion_studio.requests import GenerationRequest
    from diffusion_studio.service.store import JobRecord, JobStatus, JobStore

    store = JobStore(data_dir / "studio.db")
    day = data_dir / "outputs" / time.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for index in range(jobs):
        request = GenerationRequest(prompt=f"a red circle {index}", steps=4, width=64, height=64, seed=index)
        record = JobRecord(id=f"job{index:06d}", user="local", request=request.model_dump(mode="json"),
                           status=JobStatus.done, created_at=now - (jobs - index) * 60.0,
                           started_at=now - (jobs - index) * 60.0 + 1, finished_at=now - (jobs - index) * 60.0 + 2)
        path = day / f"{index:06d}-txt2img-{index}-0.png"
        Image.new("RGB", (64, 64), ((index * 37) % 256, 80, 160)).save(path)
        store.add(record)
        record.result = {"seeds": [index], "image_ids": store.add_images(record, [path], [index])}
        store.update(record)


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered), "p90": p90, "min": ordered[0], "max": ordered[-1]}


def measure(runs: int, history_jobs: int, bytecode_cache: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        history_dir = root / "history"
        make_history(history_dir, history_jobs)
        start_once(history_dir)  # once untimed: the history dir as a studio leaves it (hashes file, stand-ins)
        times: dict[str, list[dict]] = {"fresh": [], "history": []}
        for run in range(runs):
            for kind in ("fresh", "history"):
                extra = {}
                if not bytecode_cache:
                    extra = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(root / f"pyc-{kind}-{run}")}
                data_dir = root / f"fresh-{run}" if kind == "fresh" else history_dir
                times[kind].append(start_once(data_dir, extra))
                row = times[kind][-1]
                cpu = f"  (CPU {row['cpu_s']:.2f} s)" if row["cpu_s"] is not None else ""
                print(f"  run {run + 1}/{runs} {kind:<7}  port {row['port_s']:.2f} s  / {row['page_s']:.2f} s{cpu}",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {kind: {"port_s": summary([t["port_s"] for t in rows]), "page_s": summary([t["page_s"] for t in rows]),
                   "cpu_s": summary([t["cpu_s"] for t in rows]) if all(t["cpu_s"] is not None for t in rows) else None,
                   "runs": rows} for kind, rows in times.items()}


def importtime_offenders(top: int) -> list[tuple[float, int, str]]:
    """`python -X importtime` of what `serve` imports before it listens (the CLI and the server modules): the
    `top` modules by cumulative import time, as (seconds, nesting depth, name). importtime's own bookkeeping
    inflates the figures; compare them with each other, not with the start's seconds."""
    code = ("import diffusion_studio.cli as c; c._quiet_libraries(); c._skip_gradio_stub_files(); "
            "import diffusion_studio.server")
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                            env={**os.environ, **ENV}, timeout=300, check=False)
    rows = []
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)", line)
        if match:
            rows.append((int(match.group(2)) / 1e6, (len(match.group(3)) - 1) // 2, match.group(4)))
    return sorted(rows, reverse=True)[:top]


HEAVY = ("torch", "diffusers", "transformers", "peft", "scipy", "sympy", "torch._dynamo", "cv2", "pandas", "ray",
         "gradio", "safetensors.torch", "accelerate")

WHY_SCRIPT = """
import cProfile, importlib.abc, io, pstats, sys, tempfile, time, traceback
from pathlib import Path
HEAVY, TOP = {heavy!r}, {top}
first = {{}}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in HEAVY and name not in first:
            ours = [f"{{frame.filename.split('/src/')[-1]}}:{{frame.lineno}}" for frame in traceback.extract_stack()
                    if "diffusion_studio" in frame.filename]
            first[name] = ours[-1] if ours else "(not ours)"
        return None

sys.meta_path.insert(0, Watch())
phases, started = [], time.perf_counter()
def phase(label):
    global started
    now = time.perf_counter()
    phases.append((label, now - started))
    started = now

import diffusion_studio.cli
phase("import diffusion_studio.cli")
diffusion_studio.cli._quiet_libraries()
diffusion_studio.cli._skip_gradio_stub_files()  # as serve does
import diffusion_studio.server
phase("import diffusion_studio.server (gradio, fastapi, the studio's modules)")
from diffusion_studio.config import StudioConfig
from diffusion_studio.studio import Studio
data = Path(tempfile.mkdtemp())
config = StudioConfig(data_dir=data, models_dir=data / "models")
studio = Studio(config)
phase("Studio(config)")
profile = cProfile.Profile()
profile.enable()
app = diffusion_studio.server.build_app(config, studio)
profile.disable()
phase("build_app (the Blocks, the mount)")
print("phases (s):")
for label, seconds in phases:
    print(f"  {{seconds:6.2f}}  {{label}}")
print("first imported by (our innermost frame):")
for name in HEAVY:
    print(f"  {{name:<18}} {{first.get(name, 'not imported')}}")
out = io.StringIO()
pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(TOP)
print("build_app, cProfile (cumulative):")
print(out.getvalue())
"""


def why_report(top: int) -> str:
    """The start's phases in one process (imports, Studio, build_app), which of our modules first imports each
    heavy library, and a cProfile of build_app."""
    result = subprocess.run([sys.executable, "-c", WHY_SCRIPT.format(heavy=HEAVY, top=top)], capture_output=True,
                            text=True, env={**os.environ, **ENV}, timeout=300, check=False)
    return result.stdout[-30000:] + result.stderr[-3000:]


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()}, {os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="starts per data dir, alternating (default 5)")
    parser.add_argument("--history", type=int, default=500, help="finished jobs in the history data dir")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="every start compiles the .pyc files again (the first start after an install)")
    parser.add_argument("--why", action="store_true", help="where the start goes: import times and a profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}  {machine()}")
    if args.why:
        print("\npython -X importtime, `import diffusion_studio.cli, diffusion_studio.server`, cumulative s "
              "(indented: imported by the row above it in the tree):")
        for seconds, depth, name in importtime_offenders(args.top):
            print(f"  {seconds:6.3f}  {'  ' * min(depth, 12)}{name}")
        print()
        print(why_report(args.top))
        return 0
    print(f"{' '.join(serve_command())} serve: {args.runs} starts per data dir, alternating"
          + ("; no bytecode cache" if args.no_bytecode_cache else ""))
    figures = measure(args.runs, args.history, not args.no_bytecode_cache)
    for kind, label in (("fresh", "fresh data dir"), ("history", f"{args.history}-job history")):
        port, page = figures[kind]["port_s"], figures[kind]["page_s"]
        cpu = figures[kind]["cpu_s"]
        print(f"{label:<18} port accepts: median {port['median']:.2f} s, p90 {port['p90']:.2f} s;  "
              f"first 200 of /: median {page['median']:.2f} s, p90 {page['p90']:.2f} s"
              + (f";  serve's CPU to /: median {cpu['median']:.2f} s" if cpu else ""))
    worst = max(figures[kind]["page_s"]["median"] for kind in figures)
    verdict = "PASS" if worst <= GOAL_S else "FAIL"
    print(f"{verdict}: serve to the first 200 of / within {GOAL_S:g} s (median, worse data dir: {worst:.2f} s)")
    print(f"after: {machine()}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "goal_s": GOAL_S, **figures}, indent=2))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
