"""bench/load.py: its clients see what they must (a 429 without Retry-After, a lost job, a failure, an invalid body
let through), checked against a fake jobs API that does each of those on purpose; and its --quick run against the
real studio (auth on, 20 users, limits as shipped) loses nothing, fails nothing and its counts add up."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from servers import serving

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from load_clients import StudioClient, Tally  # noqa: E402


def fake_jobs_api() -> FastAPI:
    """POST /api/v1/jobs by prompt: "throttled" is refused once with Retry-After, "no-retry-after" once without,
    "vanishes" is admitted and then gone (404), "fails" ends failed, "invalid" is refused 422 and "let-through" is
    admitted (as a studio that failed to validate it would)."""
    app = FastAPI()
    refused: set[str] = set()
    jobs: dict[str, str] = {}

    @app.post("/api/v1/jobs")
    async def create(request: Request):
        prompt = (await request.json())["prompt"]
        if prompt == "invalid":
            return JSONResponse({"detail": "steps: must be at least 1"}, status_code=422)
        if prompt in ("throttled", "no-retry-after") and prompt not in refused:
            refused.add(prompt)
            headers = {"Retry-After": "1"} if prompt == "throttled" else {}
            return JSONResponse({"detail": "slow down"}, status_code=429, headers=headers)
        job_id = f"job{len(jobs)}"
        jobs[job_id] = prompt
        return JSONResponse({"id": job_id, "status": "queued", "position": 1}, status_code=202)

    def record(job_id: str) -> dict | None:
        prompt = jobs.get(job_id)
        if prompt is None or prompt == "vanishes":
            return None
        now = time.time()
        return {"id": job_id, "status": "failed" if prompt == "fails" else "done", "created_at": now - 1,
                "started_at": now - 0.5, "result": {}, "error": None}

    @app.get("/api/v1/jobs/{job_id}/events")
    def events(job_id: str):
        job = record(job_id)
        if job is None:
            return JSONResponse({"detail": "no such job"}, status_code=404)
        return StreamingResponse(iter([f"event: {job['status']}\ndata: {json.dumps(job)}\n\n"]),
                                 media_type="text/event-stream")

    @app.get("/api/v1/jobs/{job_id}")
    def get(job_id: str):
        job = record(job_id)
        return job if job is not None else JSONResponse({"detail": "no such job"}, status_code=404)

    return app


def test_the_clients_count_what_a_studio_gets_wrong():
    async def send(url: str) -> Tally:
        tally = Tally()
        client = StudioClient(url, "someone", "token", tally, time.perf_counter())
        try:
            for prompt in ("ok", "throttled", "no-retry-after", "vanishes", "fails"):
                await client.run({"prompt": prompt})
            await client.run({"prompt": "invalid"}, "invalid")
            await client.run({"prompt": "let-through"}, "invalid")
        finally:
            await client.close()
        return tally

    with serving(fake_jobs_api()) as url:
        tally = asyncio.run(send(url))
    figures = tally.summary()
    assert (figures["throttled"], figures["throttled_without_retry_after"]) == (2, 1)
    assert figures["lost"] == 1 and figures["failed_unexpectedly"] == 1
    assert (figures["invalid_refused"], figures["invalid_codes"], figures["invalid_admitted"]) == (1, {422: 1}, 1)
    assert (figures["sent"], figures["admitted"], figures["done"], figures["failed"]) == (7, 6, 4, 1)
    assert tally.accounted and len(tally.waits) == 5


def test_quick_load_run_loses_nothing_and_its_counts_add_up(tmp_path):
    results = tmp_path / "load.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--quick", "--json", str(results)],
                         check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    figures = json.loads(results.read_text())
    phases = figures["phases"]
    assert list(phases) == ["many users", "one user", "soak"]
    for name, phase in phases.items():
        assert phase["lost"] == 0 and phase["failed_unexpectedly"] == 0 and phase["server_errors"] == 0, name
        assert phase["admitted"] == phase["done"] + phase["failed"] + phase["cancelled"] + phase["interrupted"], name
        assert phase["throttled_without_retry_after"] == 0, name
    # one user's 40 jobs at once meet its burst (20) and active-job cap (16): the limits as shipped did bite
    assert phases["one user"]["throttled"] > 0 and phases["one user"]["admitted"] == 40
    soak = phases["soak"]
    assert soak["sent"] == 120 and soak["invalid_refused"] > 0 and soak["invalid_admitted"] == 0
    assert soak["cached_hits"] > 0 and soak["cached_misses"] == 0
    assert soak["cancelled"] + soak["cancel_too_late"] > 0
    assert figures["tracebacks"] == 0
    for key in ("rss", "fds", "database", "outputs"):
        assert figures["resources"]["end"][key] > 0, key
    assert "| phase | jobs | admitted |" in run.stdout and "PASS soak: 0 lost (0)" in run.stdout
