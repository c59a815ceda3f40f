"""JobService: the one way work reaches the engine. A bounded asyncio queue, fair across users (round-robin,
higher priority first), with states queued -> running -> done / failed / cancelled / interrupted, cancel of queued
and running jobs, pause/resume of the whole queue, per-job event streams, and records that outlive a crash.

Engine calls run in worker threads (`asyncio.to_thread`), `workers` at a time, so nothing blocks the event loop and
there is no global lock: two jobs on different models, or on one model, run side by side. A worker that takes a
job also takes queued jobs with the same `batch_key()` (any user's, up to `batch_images` images) and runs them as
one pipeline call; each job still gets its own events, cancel, time limit, record, and its lone-run bits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch

from ..requests import GenerationRequest, GenerationResult, RequestError, StepEvent
from .cache import ResultCache
from .limits import UserLimits
from .metrics import StudioMetrics
from .store import JobRecord, JobStatus, JobStore

log = logging.getLogger(__name__)

BatchRunner = Callable[..., list[GenerationResult]]  # Engine.run_batch(requests, on_steps, cancels)
Saver = Callable[[GenerationResult], list]  # Studio.save(result) -> image paths


FINISHED_KINDS = {status.value for status in JobStatus if status.finished}


class QueueFull(RuntimeError):
    """The queue is at its bound; `retry_after_s` is a hint for HTTP 429 / the UI message."""

    def __init__(self, length: int, retry_after_s: int = 5):
        super().__init__(f"the queue is full ({length} jobs waiting); try again in {retry_after_s} s")
        self.length = length
        self.retry_after_s = retry_after_s


class JobNotFound(KeyError):
    pass


@dataclass(frozen=True)
class JobEvent:
    """What a job's subscribers receive: a state change, a step (with preview), or the final record."""

    kind: str  # "queued" | "position" | "running" | "step" | "done" | "failed" | "cancelled" | "interrupted"
    job_id: str
    data: dict[str, Any]


class FairQueue:
    """Per-user FIFO lanes served round-robin; among the lanes' heads, higher priority goes first."""

    def __init__(self):
        self._lanes: OrderedDict[str, deque[JobRecord]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def push(self, job: JobRecord) -> None:
        self._lanes.setdefault(job.user, deque()).append(job)

    def pop(self) -> JobRecord | None:
        if not self._lanes:
            return None
        best = max(self._lanes, key=lambda user: self._lanes[user][0].priority)  # max keeps the first: round-robin
        job = self._lanes[best].popleft()
        lane = self._lanes.pop(best)
        if lane:
            self._lanes[best] = lane  # to the back of the rotation
        return job

    def take(self, wanted: Callable[[JobRecord], bool], limit: int) -> list[JobRecord]:
        """Remove and return up to `limit` jobs that `wanted` accepts, in the order they would run. A user whose
        job rides along has had a turn: their lane goes to the back of the rotation, as after `pop`."""
        taken = []
        for job_id in self.order():
            if len(taken) == limit:
                break
            job = self._find(job_id)
            if wanted(job):
                taken.append(self.remove(job_id))
                if job.user in self._lanes:
                    self._lanes.move_to_end(job.user)
        return taken

    def _find(self, job_id: str) -> JobRecord:
        return next(job for lane in self._lanes.values() for job in lane if job.id == job_id)

    def remove(self, job_id: str) -> JobRecord | None:
        for user, lane in self._lanes.items():
            for job in lane:
                if job.id == job_id:
                    lane.remove(job)
                    if not lane:
                        del self._lanes[user]
                    return job
        return None

    def order(self) -> list[str]:
        """Job ids in the order they would run now."""
        lanes = OrderedDict((user, deque(lane)) for user, lane in self._lanes.items())
        shadow = FairQueue()
        shadow._lanes = lanes
        ids = []
        while (job := shadow.pop()) is not None:
            ids.append(job.id)
        return ids


class JobService:
    def __init__(self, store: JobStore, run_batch: BatchRunner, save: Saver, max_queue: int = 64, workers: int = 1,
                 validate: Callable[[dict], GenerationRequest] | None = None,
                 identify: Callable[[GenerationRequest], str] | None = None, cache_entries: int = 1024,
                 time_limit_s: float | None = None, limits: UserLimits | None = None, batch_images: int = 8):
        """`identify(request)` names the weights a request would use (for cache keys); without it, no cache.
        `batch_images`: most images in one cross-user batch (1: every job runs alone)."""
        self.store = store
        self._identify = identify
        self.time_limit_s = time_limit_s
        self.limits = limits
        self.cache = ResultCache(cache_entries)
        self._cache_keys: dict[str, str] = {}  # job id -> cache key, for jobs that may fill the cache
        self._run_batch = run_batch
        self.batch_images = batch_images
        self._batch_keys: dict[str, tuple[str, int]] = {}  # queued job id -> (batch key, images)
        self._save = save
        self._validate = validate or GenerationRequest.model_validate
        self.max_queue = max_queue
        self.workers = workers
        self._queue = FairQueue()
        self._wakeup: asyncio.Condition | None = None
        self._paused = False
        self._running: dict[str, threading.Event] = {}
        self._users: dict[str, str] = {}  # job id -> user, for jobs queued or running
        self._subscribers: dict[str, list[asyncio.Queue]] = {}
        self._tasks: list[asyncio.Task] = []
        self.metrics = StudioMetrics(queue_length=self.queue_length, running=lambda: len(self._running))

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Condition()
        for job in self.store.recover():  # a crash left these queued: they run again, in their old order
            self._queue.push(job)
            self._users[job.id] = job.user
        self._tasks = [asyncio.create_task(self._worker(), name=f"job-worker-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for cancel in self._running.values():
            cancel.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # -- clients --------------------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, user: str, priority: int = 0,
                     listener: asyncio.Queue | None = None) -> JobRecord:
        """Queue a job. `listener` is subscribed before the job can start, so it misses none of its events."""
        if self.limits is not None:
            self.limits.admit(user, self.active_jobs(user))
        cacheable = self._identify is not None and request.seed is not None and self.cache.max_entries > 0
        key = self.cache.key(request, self._identify(request)) if cacheable else None
        cached = self._cached(key, request, user, priority, listener) if key else None
        if cached is not None:
            return cached
        if len(self._queue) >= self.max_queue:
            raise QueueFull(len(self._queue))
        job = JobRecord(id=secrets.token_hex(8), user=user, request=request.model_dump(mode="json"),
                        priority=priority)
        self.store.add(job)
        if key:
            self._cache_keys[job.id] = key
        batch_key = request.batch_key()
        if batch_key is not None:
            self._batch_keys[job.id] = (batch_key, request.batch_size)
        self._users[job.id] = user
        if listener is not None:
            self._subscribers.setdefault(job.id, []).append(listener)
        async with self._wakeup:
            self._queue.push(job)
            self._wakeup.notify()
        self._publish(job.id, "queued", {"position": self.position(job.id)})
        return job

    async def follow(self, request: GenerationRequest, user: str, priority: int = 0) -> AsyncIterator[JobEvent]:
        """Submit and yield the job's events up to and including its outcome. A client that stops listening
        (a closed browser tab, a cancelled handler) cancels the job, so no work runs for nobody."""
        async for event in self.follow_many([request], user, priority):
            yield event

    async def follow_many(self, requests: list[GenerationRequest], user: str,
                          priority: int = 0) -> AsyncIterator[JobEvent]:
        """Submit several jobs at once (so compatible ones can share batches) and yield all their events, until
        every one has its outcome. Stopping early cancels the unfinished ones."""
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        try:
            for request in requests:
                jobs.append(await self.submit(request, user, priority, listener=events))
            unfinished = {job.id for job in jobs}
            while unfinished:
                event = await events.get()
                yield event
                if event.kind in FINISHED_KINDS:
                    unfinished.discard(event.job_id)
        finally:
            for job in jobs:
                self.unsubscribe(job.id, events)
                if not self.store.get(job.id).status.finished:
                    await self.cancel(job.id)

    def _cached(self, key: str, request: GenerationRequest, user: str, priority: int,
                listener: asyncio.Queue | None) -> JobRecord | None:
        """A finished job answering from an earlier identical one: its images copied, `cached: True`."""
        source = self.store.get(self.cache.get(key) or "")
        if source is None or source.status != JobStatus.done:
            return None
        now = time.time()
        job = JobRecord(id=secrets.token_hex(8), user=user, request=request.model_dump(mode="json"),
                        priority=priority, status=JobStatus.running, created_at=now, started_at=now)
        self.store.add(job)
        copies = []
        for image_id in source.result["image_ids"]:
            original = Path(self.store.image(image_id)["path"])
            copy = original.with_name(f"{original.stem}-{job.id}{original.suffix}")
            try:  # each job owns a name for its files: deleting one never breaks another
                os.link(original, copy)
            except OSError:  # a file system without hard links
                shutil.copyfile(original, copy)
            copies.append(copy)
        job.result = {**source.result, "cached": True,
                      "image_ids": self.store.add_images(job, copies, source.result["seeds"])}
        if listener is not None:
            self._subscribers.setdefault(job.id, []).append(listener)
        self.metrics.cache_hits.inc()
        self._finish(job, JobStatus.done)
        return job

    def get(self, job_id: str, user: str | None = None) -> JobRecord:
        job = self.store.get(job_id)
        if job is None or (user is not None and job.user != user):
            raise JobNotFound(job_id)  # another user's job is reported as missing, not as forbidden
        return job

    def position(self, job_id: str) -> int | None:
        """1 = next to run; None when not waiting."""
        order = self._queue.order()
        return order.index(job_id) + 1 if job_id in order else None

    async def cancel(self, job_id: str, user: str | None = None) -> JobRecord:
        job = self.get(job_id, user)
        if job.status == JobStatus.queued and self._queue.remove(job_id) is not None:
            self._users.pop(job_id, None)
            self._batch_keys.pop(job_id, None)
            self._finish(job, JobStatus.cancelled, error="cancelled before it started")
        elif job.id in self._running:
            self._running[job.id].set()  # the engine stops within one step; the worker records it
        return self.store.get(job_id)

    async def pause(self) -> None:
        self._paused = True

    async def resume(self) -> None:
        async with self._wakeup:
            self._paused = False
            self._wakeup.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def active_jobs(self, user: str) -> int:
        """The user's queued and running jobs."""
        return sum(1 for owner in self._users.values() if owner == user)

    def queue_length(self) -> int:
        return len(self._queue)

    def status(self) -> dict:
        return {"queued": len(self._queue), "running": len(self._running), "paused": self._paused,
                "max_queue": self.max_queue, "workers": self.workers, "batch_images": self.batch_images}

    def subscribe(self, job_id: str) -> asyncio.Queue:
        """A queue of JobEvents for one job; unsubscribe when done."""
        events: asyncio.Queue = asyncio.Queue()
        self._subscribers.setdefault(job_id, []).append(events)
        return events

    def unsubscribe(self, job_id: str, events: asyncio.Queue) -> None:
        listeners = self._subscribers.get(job_id, [])
        if events in listeners:
            listeners.remove(events)
        if not listeners:
            self._subscribers.pop(job_id, None)

    # -- work -----------------------------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            async with self._wakeup:
                await self._wakeup.wait_for(lambda: not self._paused and len(self._queue) > 0)
                jobs = self._take_batch()
            for position, waiting_id in enumerate(self._queue.order(), start=1):  # one pass, not one per job
                self._publish(waiting_id, "position", {"position": position})
            await self._execute(jobs)

    def _take_batch(self) -> list[JobRecord]:
        """The next job, plus queued jobs that can share its pipeline call (same batch key), within the budget."""
        first = self._queue.pop()
        key, images = self._batch_keys.pop(first.id, (None, 0))
        if key is None or images >= self.batch_images:
            return [first]
        budget = self.batch_images - images

        def fits(job: JobRecord) -> bool:
            nonlocal budget
            other_key, other_images = self._batch_keys.get(job.id, (None, 0))
            if other_key != key or other_images > budget:
                return False
            budget -= other_images
            return True

        others = self._queue.take(fits, limit=self.batch_images)
        for job in others:
            self._batch_keys.pop(job.id, None)
        return [first, *others]

    async def _execute(self, jobs: list[JobRecord]) -> None:
        runs = [self._begin(job) for job in jobs]
        try:
            if len(runs) > 1:
                try:
                    results = await self._engine_call(runs)
                except Exception as exc:  # one bad request must not fail the others: each runs again alone
                    log.warning("a batch of %d jobs failed (%s); running them one by one", len(runs), exc)
                else:
                    for run, result in zip(runs, results):
                        await self._settle(run, self._record(run, result))
                    return
            for run in runs:
                await self._settle(run, self._run_alone(run))
        finally:
            for run in runs:
                run.close()
                self._running.pop(run.job.id, None)
                self._users.pop(run.job.id, None)
                self._cache_keys.pop(run.job.id, None)

    def _begin(self, job: JobRecord) -> "_Run":
        run = _Run(job, asyncio.get_running_loop(), self._publish, self.time_limit_s)
        self._running[job.id] = run.cancel
        job.status, job.started_at = JobStatus.running, time.time()
        self.store.update(job)
        self._publish(job.id, "running", {"queue_wait_s": job.started_at - job.created_at})
        return run

    async def _engine_call(self, runs: list["_Run"]) -> list[GenerationResult]:
        requests = [self._validate(run.job.request) for run in runs]
        return await asyncio.to_thread(self._run_batch, requests, [run.on_step for run in runs],
                                       [run.cancel for run in runs])

    async def _run_alone(self, run: "_Run") -> None:
        [result] = await self._engine_call([run])
        await self._record(run, result)

    async def _record(self, run: "_Run", result: GenerationResult) -> None:
        job = run.job
        paths = await asyncio.to_thread(self._save, result)
        image_ids = self.store.add_images(job, paths, result.seeds)
        job.result = {"seeds": result.seeds, "image_ids": image_ids, "model_id": result.model_id,
                      "device": result.device, "blocked": result.blocked, "batched_with": result.batched_with,
                      "timings": {"load_s": result.timings.load_s, "total_s": result.timings.total_s,
                                  "it_per_s": result.timings.it_per_s},
                      "peak_memory_bytes": result.peak_memory_bytes}
        if run.timed_out.is_set():
            self._finish(job, JobStatus.failed, error=f"time_limit: stopped after the {self.time_limit_s:g} s "
                                                      "limit for one job; ask for fewer steps or a smaller size")
        elif result.cancelled:
            self._finish(job, JobStatus.cancelled, error="cancelled while running")
        else:
            self._finish(job, JobStatus.done)
            if job.id in self._cache_keys:
                self.cache.put(self._cache_keys[job.id], job.id)

    async def _settle(self, run: "_Run", work) -> None:
        """Await one job's work; whatever goes wrong becomes that job's failure, as data."""
        job = run.job
        try:
            await work
        except RequestError as exc:
            self._finish(job, JobStatus.failed, error=str(exc))
        except torch.OutOfMemoryError:
            # Free what this job held before the next one starts; the tip says what helps.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._finish(job, JobStatus.failed, error="out_of_memory: the device ran out of memory; try a smaller "
                                                      "size or batch, or enable memory.vae_tiling / attention_slicing")
        except Exception as exc:  # reported as data on the job; the worker lives on for the next job
            log.exception("job %s failed", job.id)
            self._finish(job, JobStatus.failed, error=f"{type(exc).__name__}: {exc}")

    def _finish(self, job: JobRecord, status: JobStatus, error: str | None = None) -> None:
        job.status, job.finished_at, job.error = status, time.time(), error
        self.store.update(job)
        wait = job.started_at - job.created_at if job.started_at else None
        self.metrics.observe(status.value, wait, job.result, error)
        self._publish(job.id, status.value, {"error": error, "result": job.result})

    def _publish(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        for events in self._subscribers.get(job_id, []):
            events.put_nowait(JobEvent(kind, job_id, data))


class _Run:
    """One running job's controls: its cancel flag, its time limit, and its step-event publisher."""

    def __init__(self, job: JobRecord, loop: asyncio.AbstractEventLoop, publish, time_limit_s: float | None):
        self.job = job
        self.cancel = threading.Event()
        self.timed_out = threading.Event()
        self._loop, self._publish = loop, publish
        self._timer = loop.call_later(time_limit_s, self._stop_for_time) if time_limit_s else None

    def _stop_for_time(self) -> None:
        self.timed_out.set()
        self.cancel.set()  # the engine stops at its next step

    def on_step(self, event: StepEvent) -> None:  # called from the engine's thread
        data = {"step": event.step, "total": event.total, "eta_s": event.eta_s, "preview": event.preview}
        self._loop.call_soon_threadsafe(self._publish, self.job.id, "step", data)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
