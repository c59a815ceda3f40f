"""The clients of bench/load.py: asyncio + httpx, one AsyncClient (its own connections and bearer token) per
simulated client, all in the bench's process (the studio runs in a process of its own). A job is sent the way a
well-behaved client sends it: POST /api/v1/jobs, on 429 sleep the Retry-After it was given and send again, then
follow the job's SSE stream to its outcome and read the job record. `Tally` counts what happened, per phase."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx
from PIL import Image, ImageDraw

FINAL = ("done", "failed", "cancelled", "interrupted")
OUTCOME_TIMEOUT_S = 600  # an admitted job with no outcome this long after admission counts as lost
JITTER_S = 0.25  # added to each Retry-After sleep (at most), so a crowd told "5 s" doesn't return as one


@dataclass
class Tally:
    """What one phase's jobs did. Every job sent ends in exactly one of: an outcome (done, failed, cancelled,
    interrupted), lost (admitted, no outcome), or refused (a 4xx other than 429)."""

    sent: int = 0  # jobs the phase sent (each counted once, however many 429s it met)
    admitted: int = 0
    throttled: int = 0  # 429 responses
    throttled_without_retry_after: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {status: 0 for status in FINAL})
    lost: int = 0
    invalid_refused: int = 0  # a deliberately bad body answered 4xx (not 429)
    invalid_codes: dict[int, int] = field(default_factory=dict)  # their status codes
    invalid_admitted: int = 0  # a deliberately bad body answered 2xx: a validation gap
    refused_unexpectedly: int = 0  # a good body answered 4xx (not 429)
    server_errors: int = 0  # 5xx, or a transport error other than a dropped connection
    dropped: int = 0  # POSTs whose connection the server closed without an answer (sent again, fresh connection)
    failed_unexpectedly: int = 0  # a job that should have succeeded ended failed/interrupted
    cancel_too_late: int = 0  # a job to cancel that was done before the cancel arrived
    cached_hits: int = 0
    cached_misses: int = 0  # a repeat of a done explicit-seed job that was not answered from the cache
    waits: list[float] = field(default_factory=list)  # created_at -> started_at, of jobs that ran
    end_to_end: list[float] = field(default_factory=list)  # first POST -> outcome, as the client saw it
    finished_by_user: dict[str, float] = field(default_factory=dict)  # user -> when their last job ended (s)
    problems: list[str] = field(default_factory=list)  # the first few unexpected answers, for the report
    wall_s: float = 0.0  # the phase's length
    history: dict[str, int] = field(default_factory=dict)  # the server's history of the phase: status -> jobs

    def problem(self, text: str) -> None:
        if len(self.problems) < 8:
            self.problems.append(text)

    @property
    def accounted(self) -> bool:
        """admitted = done + failed + cancelled + interrupted + lost, and every job sent is admitted or refused."""
        return (self.admitted == sum(self.outcomes.values()) + self.lost
                and self.sent == self.admitted + self.invalid_refused + self.refused_unexpectedly
                + self.server_errors)

    def summary(self) -> dict:
        """The phase's figures as plain data (bench/load.py prints them; tests read them from --json)."""
        return {"sent": self.sent, "admitted": self.admitted, "throttled": self.throttled,
                "throttled_without_retry_after": self.throttled_without_retry_after, **self.outcomes,
                "lost": self.lost, "invalid_refused": self.invalid_refused, "invalid_codes": self.invalid_codes,
                "invalid_admitted": self.invalid_admitted,
                "refused_unexpectedly": self.refused_unexpectedly, "server_errors": self.server_errors,
                "dropped": self.dropped,
                "failed_unexpectedly": self.failed_unexpectedly, "cancel_too_late": self.cancel_too_late,
                "cached_hits": self.cached_hits, "cached_misses": self.cached_misses,
                "wait_p50_s": percentile(self.waits, 50), "wait_p95_s": percentile(self.waits, 95),
                "end_to_end_p50_s": percentile(self.end_to_end, 50),
                "end_to_end_p95_s": percentile(self.end_to_end, 95),
                "accounted": self.accounted, "problems": self.problems}


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(pct) - 1]


# -- request bodies ----------------------------------------------------------------------------------------------
def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def shape_image(size: int) -> Image.Image:
    """A red circle on white, the kind of picture builtin:shapes knows."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="red")
    return image


def centre_mask(size: int) -> Image.Image:
    """White (repaint) in the middle, black (keep) around it."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    return mask


# Deliberately bad bodies, each naming one field that must be refused with a 4xx before anything runs.
INVALID_BODIES = (
    {"prompt": "bad", "steps": 0},
    {"prompt": "bad", "width": 4},
    {"prompt": "bad", "width": 100_000},
    {"prompt": "bad", "scheduler": "no such sampler"},
    {"prompt": "bad", "mode": "no such mode"},
    {"prompt": "bad", "mode": "img2img", "init_image": "this is not base64 !"},
    {"prompt": "bad", "strength": 2.0},
    {"prompt": "bad", "no_such_field": 1},
    {"prompt": "bad", "steps": "many"},
    {"prompt": "bad", "seed": -5},
)


# -- one job -----------------------------------------------------------------------------------------------------
class StudioClient:
    """One simulated client: its own connections, its user's token, and the jobs it sends one after another or
    at once. `started` is the phase's start (perf_counter), for per-user completion times."""

    def __init__(self, url: str, user: str, token: str, tally: Tally, started: float):
        self.user = user
        self.tally = tally
        self.started = started
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                      timeout=httpx.Timeout(60, read=OUTCOME_TIMEOUT_S))

    async def close(self) -> None:
        await self.http.aclose()

    async def submit(self, body: dict) -> tuple[int, dict | None, float]:
        """POST until the answer is not a 429: (status code, its JSON body or None, when it was first sent)."""
        first = time.perf_counter()
        slept, drops = None, 0
        while True:
            try:
                response = await self.http.post("/api/v1/jobs", json=body)
            except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
                # The server closed the (kept-alive) connection with the request unanswered. httpx has dropped
                # that connection from its pool; the next attempt opens a fresh one. bench/load.py checks the
                # history afterwards: a request that did arrive would show up there as a job nobody admitted.
                self.tally.dropped += 1
                self.tally.problem(f"POST /api/v1/jobs: {type(exc).__name__} ({exc or 'no answer'}) after "
                                   f"{'a first send' if slept is None else f'sleeping {slept:.2f} s for a 429'}")
                drops += 1
                if drops <= 3:
                    continue
                return 0, None, first
            except httpx.HTTPError as exc:
                self.tally.problem(f"POST /api/v1/jobs: {type(exc).__name__}: {exc}")
                return 0, None, first
            if response.status_code != 429:
                with contextlib.suppress(ValueError):
                    return response.status_code, response.json(), first
                return response.status_code, None, first
            self.tally.throttled += 1
            retry_after = response.headers.get("Retry-After")
            if retry_after is None or not retry_after.isdigit():
                self.tally.throttled_without_retry_after += 1
                self.tally.problem(f"429 without a usable Retry-After ({retry_after!r}): {response.text[:200]}")
                retry_after = "1"
            slept = int(retry_after) + random.uniform(0, JITTER_S)
            await asyncio.sleep(slept)

    async def outcome(self, job_id: str, cancel_at: str | None = None) -> dict | None:
        """The job's record once it has an outcome, or None when it never came (or the job vanished). `cancel_at`:
        "queued" cancels at once, "running" at its first step event."""
        deadline = time.monotonic() + OUTCOME_TIMEOUT_S
        if cancel_at == "queued":
            await self.cancel(job_id)
        with contextlib.suppress(httpx.HTTPError):
            async with self.http.stream("GET", f"/api/v1/jobs/{job_id}/events") as events:
                if events.status_code == 404:
                    return None
                async for line in events.aiter_lines():
                    if cancel_at == "running" and line in ("event: step", "event: running"):
                        cancel_at = None
                        await self.cancel(job_id)
                    if line.startswith("event: ") and line[7:] in FINAL:
                        break
        # The stream ended (or broke): the record says the outcome; poll a while in case the stream broke early.
        while time.monotonic() < deadline:
            try:
                response = await self.http.get(f"/api/v1/jobs/{job_id}")
            except httpx.HTTPError:
                await asyncio.sleep(1)
                continue
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                self.tally.problem(f"GET job {job_id}: HTTP {response.status_code} {response.text[:200]}")
            elif (job := response.json())["status"] in FINAL:
                return job
            await asyncio.sleep(0.5)
        return None

    async def cancel(self, job_id: str) -> None:
        try:
            response = await self.http.post(f"/api/v1/jobs/{job_id}/cancel")
        except httpx.HTTPError as exc:  # the job's outcome then says whether it ran
            self.tally.problem(f"cancel {job_id}: {type(exc).__name__}: {exc}")
            return
        if response.status_code != 200:
            self.tally.problem(f"cancel {job_id}: HTTP {response.status_code} {response.text[:200]}")

    async def run(self, body: dict, kind: str = "txt2img") -> dict | None:
        """Send one job of `kind` (a mode, "cached", "cancel-queued", "cancel-running" or "invalid") and count
        what became of it. The job's record, if it has an outcome."""
        tally = self.tally
        tally.sent += 1
        code, created, first = await self.submit(body)
        if kind == "invalid":
            if 400 <= code < 500:
                tally.invalid_refused += 1
                tally.invalid_codes[code] = tally.invalid_codes.get(code, 0) + 1
                return None
            if 200 <= code < 300:
                tally.invalid_admitted += 1
                tally.problem(f"invalid body admitted ({code}): {json.dumps(body)[:120]}")
                code = 202  # it is a job now: follow it like any other, so the counts still add up
            else:
                tally.server_errors += 1
                tally.problem(f"invalid body got {code}: {json.dumps(body)[:120]}: {created}")
                return None
        elif code >= 500 or code == 0:
            tally.server_errors += 1
            tally.problem(f"{kind}: HTTP {code}: {str(created)[:200]}")
            return None
        elif code != 202:
            tally.refused_unexpectedly += 1
            tally.problem(f"{kind}: HTTP {code}: {str(created)[:200]}")
            return None
        tally.admitted += 1
        cancel_at = {"cancel-queued": "queued", "cancel-running": "running"}.get(kind)
        job = await self.outcome(created["id"], cancel_at)  # a cache hit is final at once: its stream says so
        if job is None:
            tally.lost += 1
            tally.problem(f"{kind} job {created['id']} lost: no outcome within {OUTCOME_TIMEOUT_S} s, or gone")
            return None
        self._count(job, kind, first)
        return job

    def _count(self, job: dict, kind: str, first: float) -> None:
        tally = self.tally
        now = time.perf_counter()
        status = job["status"]
        tally.outcomes[status] += 1
        tally.end_to_end.append(now - first)
        tally.finished_by_user[self.user] = max(tally.finished_by_user.get(self.user, 0.0), now - self.started)
        result = job.get("result") or {}
        if job.get("started_at") is not None and not result.get("cached"):
            tally.waits.append(job["started_at"] - job["created_at"])
        if kind.startswith("cancel"):
            if status == "done":
                tally.cancel_too_late += 1
            elif status != "cancelled":
                tally.failed_unexpectedly += 1
                tally.problem(f"{kind} job {job['id']} ended {status}: {job.get('error')}")
            return
        if status != "done":
            tally.failed_unexpectedly += 1
            tally.problem(f"{kind} job {job['id']} ended {status}: {job.get('error')}")
        elif kind == "cached":
            if result.get("cached"):
                tally.cached_hits += 1
            else:
                tally.cached_misses += 1
