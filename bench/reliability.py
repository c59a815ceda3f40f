"""How the studio holds up against hostile input and its own faults, measured against the real `serve` command
(a process of its own, default settings except small limits so fuzzed jobs finish quickly), one line per row of
README's Reliability table:

1. fuzz: schemathesis (its CLI, seed 42) against the served /openapi.json: cases sent, failures (5xx, responses
   that contradict the schema);
2. bad inputs: tests/test_bad_input.py's table of malformed bodies sent over HTTP: how many were 4xx / 5xx / other;
3. faults injected / survived, each followed by a job that must run: a full disk mid-job and a read-only outputs
   folder (a real tmpfs and a read-only bind mount; needs root), kill -9 with a job running and one queued
   (restart: interrupted + ran);
4. shutdown: SIGTERM with a Gradio heartbeat, an SSE stream and a WebSocket open, seconds to exit.
The SQLite failure and worker death are injected inside the process by tests/test_faults.py (see the README).

    python bench/reliability.py [--max-examples 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from servers import ServeProcess as Serve, hold_open  # noqa: E402  (the tests' own helpers)
from test_bad_input import BODIES  # noqa: E402  (the same table the tests send)
from test_faults import fill  # noqa: E402
from test_fuzz import cases_of, run_schemathesis  # noqa: E402

SMALL = {"DS_LIMITS__MAX_WIDTH": "64", "DS_LIMITS__MAX_HEIGHT": "64", "DS_LIMITS__MAX_STEPS": "2",
         "DS_LIMITS__MAX_BATCH_SIZE": "2", "DS_LIMITS__MAX_IMAGES_PER_REQUEST": "2", "DS_RATE_PER_MINUTE": "100000",
         "DS_RATE_BURST": "100000", "DS_MAX_ACTIVE_JOBS": "1000", "DS_MAX_QUEUE": "1000", "DS_PREVIEW_INTERVAL": "0"}
SLOW_JOB = {"prompt": "long", "steps": 150, "width": 256, "height": 256}  # runs for minutes: stopped mid-way
LONG_JOBS = {**SMALL, "DS_LIMITS__MAX_STEPS": "150", "DS_LIMITS__MAX_WIDTH": "256", "DS_LIMITS__MAX_HEIGHT": "256"}
MEDIUM_JOB = {"prompt": "medium", "steps": 30, "width": 128, "height": 128}  # a few seconds: the disk fills meanwhile


def fuzz(url: str, max_examples: int) -> tuple[int, int]:
    """(cases sent, failures) of the tests' own schemathesis run."""
    with tempfile.TemporaryDirectory() as workdir:
        _, output = run_schemathesis(url, Path(workdir), max_examples)
    generated, passed = cases_of(output)
    return generated, generated - passed


def bad_inputs(url: str) -> dict[str, int]:
    counts = {"4xx": 0, "5xx": 0, "other": 0}
    for route, body, _, _ in BODIES:
        if isinstance(body, bytes):
            response = httpx.post(url + route, content=body, headers={"Content-Type": "application/json"},
                                  timeout=60)
        else:
            response = httpx.post(url + route, json=body, timeout=60)
        counts["4xx" if 400 <= response.status_code < 500 else "5xx" if response.status_code >= 500 else
               "other"] += 1
    return counts


def disk_faults(root: Path) -> list[tuple[str, bool, str]]:
    """A full disk mid-job, then a read-only outputs folder, on a real tmpfs; each followed by a job that must run."""
    mount = root / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        return [("disk full mid-job", False, "skipped: mounting a tmpfs needs root"),
                ("read-only outputs", False, "skipped: mounting needs root")]
    rows = []
    server = Serve(mount / "data", **LONG_JOBS)
    try:
        slow = server.job(MEDIUM_JOB)
        server.wait(slow, states=("running",))
        filler = fill(mount)
        failed = server.wait(slow)
        degraded = httpx.get(f"{server.url}/health").status_code
        refused = httpx.post(f"{server.url}/api/v1/jobs", json={"prompt": "x", "steps": 2}).status_code
        filler.unlink()
        time.sleep(2.5)
        after = server.wait(server.job({"prompt": "after", "steps": 2}))
        ok = failed["error"]["kind"] == "storage" and degraded == 503 and refused == 503 and after["status"] == "done"
        rows.append(("disk full mid-job", ok, f"job failed '{failed['error']['kind']}', /health {degraded}, new job "
                                              f"{refused}, after freeing: {after['status']}"))
        outputs = mount / "data" / "outputs"  # a read-only outputs folder: a read-only bind mount over it
        subprocess.run(["mount", "--bind", str(outputs), str(outputs)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(outputs)], check=True)
        try:
            failed = server.wait(server.job({"prompt": "read-only", "steps": 2}))
            degraded = httpx.get(f"{server.url}/health").status_code
        finally:
            subprocess.run(["umount", str(outputs)], check=True)
        time.sleep(2.5)
        after = server.wait(server.job({"prompt": "after", "steps": 2}))
        ok = failed["error"]["kind"] == "storage" and degraded == 503 and after["status"] == "done"
        rows.append(("read-only outputs", ok, f"job failed '{failed['error']['kind']}', /health {degraded}, after "
                                              f"rw: {after['status']}"))
    finally:
        server.stop(signal.SIGKILL)
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    return rows


def kill_and_restart(data_dir: Path) -> tuple[str, bool, str]:
    server = Serve(data_dir, **LONG_JOBS)
    running, queued = server.job(SLOW_JOB), server.job({"prompt": "queued", "steps": 2})
    server.wait(running, states=("running",))
    server.stop(signal.SIGKILL)
    again = Serve(data_dir, **SMALL)
    try:
        was_running = again.wait(running)["status"]
        was_queued = again.wait(queued)["status"]
    finally:
        again.stop(signal.SIGKILL)
    ok = was_running == "interrupted" and was_queued == "done"
    return "kill -9 mid-job", ok, f"running job: {was_running}, queued job after restart: {was_queued}"


def shutdown_with_streams(data_dir: Path) -> float:
    from websockets.sync.client import connect

    server = Serve(data_dir, **LONG_JOBS)
    running = server.job(SLOW_JOB)

    for url in (f"{server.url}/gradio_api/heartbeat/bench", f"{server.url}/api/v1/jobs/{running}/events"):
        threading.Thread(target=hold_open, args=(url,), daemon=True).start()
    with connect(server.url.replace("http", "ws") + "/api/v1/ws") as ws:
        ws.send(json.dumps({"action": "subscribe", "job_id": running}))
        server.wait(running, states=("running",))
        time.sleep(0.5)
        return server.stop(signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        server = Serve(root / "fuzz", **SMALL)
        try:
            sent, failures = fuzz(server.url, args.max_examples)
            print(f"fuzz_cases {sent}  failures {failures}  (schemathesis seed 42, {args.max_examples} examples per "
                  "operation; failures = 5xx or schema/status/content-type violations)")
            counts = bad_inputs(server.url)
            print(f"bad_inputs {len(BODIES)}  4xx {counts['4xx']}  5xx {counts['5xx']}  other {counts['other']}")
        finally:
            server.stop(signal.SIGKILL)
        faults = [*disk_faults(root), kill_and_restart(root / "kill")]
        for name, ok, detail in faults:
            print(f"fault '{name}': {'survived' if ok else 'NOT survived'} ({detail})")
        survived = sum(ok for _, ok, _ in faults)
        print(f"faults_injected {len(faults)}  survived {survived}")
        print(f"shutdown_with_open_streams_s {shutdown_with_streams(root / 'shutdown'):.2f}  (goal < 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
