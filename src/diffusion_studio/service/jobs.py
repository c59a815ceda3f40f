"""JobService: the one way work reaches the engine. A bounded queue, fair across users (round-robin, higher
priority first), with states queued -> running -> done / failed / cancelled / interrupted, cancel of queued and
running jobs, pause/resume of the whole queue, per-job event streams, and records that outlive a crash.

Each job is one live `Job` object from submit to outcome: the validated request itself, its user, priority, batch
and cache keys, cancel flag, time limit, listeners and record. Queue, batching, cancel, the engine call and recovery
all use it; the SQLite row is its persisted copy (a stored request is validated again only when it is recovered
after a restart). Every job ends with an `Outcome` on its final event.

Whatever runs the work, this is the one queue: an executor (service/executor.py: engines in this process, one
worker per device, or engine actors on a Ray cluster) only runs the batches it is handed. The dispatcher takes the
next job, plus queued jobs with the same `batch_key()` (any user's, up to `batch_images` images) to run as one
pipeline call, and hands them to a free worker: one already holding their model if any, else the least recently
used. Each job still gets its own events, cancel, time limit, record, and its lone-run bits. A worker that dies
mid-batch (`WorkerLost`) has its jobs run again once on another worker; jobs wait while there is none.

The service survives its own faults: a failed write (disk full, read-only folder, SQLite error) fails that job at
once, in memory and to its listeners, and reaches the store when the store can write again; while the data dir
can't be written the workers hold the queue and `health()` says why; a worker task that dies is restarted.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable


from ..engine.runner import WorkItem
from ..requests import GenerationRequest, GenerationResult, StepEvent
from .cache import ResultCache
from .executor import BatchRunner, Executor, LocalExecutor, Worker, WorkerLost, choose_worker
from .limits import UserLimits
from .metrics import StudioMetrics
from .outcomes import ErrorKind, JobError, Outcome, StudioError, classify, is_storage_fault, storage_reason
from .store import JobRecord, JobStatus, JobStore

log = logging.getLogger(__name__)

Saver = Callable[[GenerationResult], list]  # Studio.save(result) -> image paths

STORAGE_RECHECK_S = 1.0  # how often a degraded service tries its data dir again
RUNS_PER_JOB = 2  # a job whose worker dies runs once more elsewhere; a second death fails it


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
    """What a job's listeners receive: a state change, a step (with preview), or the outcome (final event)."""

    kind: str  # "queued" | "position" | "running" | "step" | "done" | "failed" | "cancelled" | "interrupted"
    job_id: str
    data: dict[str, Any]
    outcome: Outcome | None = None  # set on the final event only

    @property
    def final(self) -> bool:
        return self.outcome is not None


@dataclass(eq=False)
class Job:
    """One job, live in the service from submit to outcome."""

    record: JobRecord  # what is persisted
    request: GenerationRequest  # validated once, at submit (or on recovery)
    batch_key: str | None
    cache_key: str | None
    listeners: list[asyncio.Queue] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    timed_out: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    timer: asyncio.TimerHandle | None = None  # the time limit
    model: str | None = None  # the base model's name, to prefer a worker that holds it
    runs: int = 0  # workers it was handed to (more than one after a worker died under it)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def user(self) -> str:
        return self.record.user

    @property
    def priority(self) -> int:
        return self.record.priority

    @property
    def status(self) -> JobStatus:
        return self.record.status


class FairQueue:
    """Per-user FIFO lanes served round-robin; among the lanes' heads, higher priority goes first."""

    def __init__(self):
        self._lanes: OrderedDict[str, deque[Job]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def push(self, job: Job) -> None:
        self._lanes.setdefault(job.user, deque()).append(job)

    def push_front(self, job: Job) -> None:
        """A job coming back (its worker died): first in its lane, its lane first in the rotation."""
        self._lanes.setdefault(job.user, deque()).appendleft(job)
        self._lanes.move_to_end(job.user, last=False)

    def pop(self) -> Job | None:
        if not self._lanes:
            return None
        best = max(self._lanes, key=lambda user: self._lanes[user][0].priority)  # max keeps the first: round-robin
        job = self._lanes[best].popleft()
        lane = self._lanes.pop(best)
        if lane:
            self._lanes[best] = lane  # to the back of the rotation
        return job

    def take(self, wanted: Callable[[Job], bool], limit: int) -> list[Job]:
        """Remove and return up to `limit` jobs that `wanted` accepts, in the order they would run. A user whose
        job rides along has had a turn: their lane goes to the back of the rotation, as after `pop`."""
        taken = []
        for job in self.order():
            if len(taken) == limit:
                break
            if wanted(job):
                self.remove(job.id)
                taken.append(job)
                if job.user in self._lanes:
                    self._lanes.move_to_end(job.user)
        return taken

    def remove(self, job_id: str) -> Job | None:
        for user, lane in self._lanes.items():
            for job in lane:
                if job.id == job_id:
                    lane.remove(job)
                    if not lane:
                        del self._lanes[user]
                    return job
        return None

    def order(self) -> list[Job]:
        """Jobs in the order they would run now."""
        shadow = FairQueue()
        shadow._lanes = OrderedDict((user, deque(lane)) for user, lane in self._lanes.items())
        jobs = []
        while (job := shadow.pop()) is not None:
            jobs.append(job)
        return jobs


class JobService:
    def __init__(self, store: JobStore, run_batch: BatchRunner | None, save: Saver, max_queue: int = 64,
                 workers: int = 1, validate: Callable[[dict], GenerationRequest] | None = None,
                 identify: Callable[[GenerationRequest], str] | None = None, cache_entries: int = 1024,
                 time_limit_s: float | None = None, limits: UserLimits | None = None, batch_images: int = 8,
                 check_storage: Callable[[], None] | None = None,
                 check: Callable[[GenerationRequest, str], None] | None = None, executor: Executor | None = None,
                 model_of: Callable[[GenerationRequest], str] | None = None, cache_scope: str = "user"):
        """Work runs on `executor`, or (without one) on `run_batch` in `workers` threads of this process.
        `identify(request)` names the weights a request would use (for cache keys; called off the event loop);
        without it, no cache. `check(request, user)` refuses, before queueing, what the engine can tell from names
        and file headers (an unknown model or LoRA, a name this user may not use); it too runs off the event loop,
        and jobs recovered after a restart pass it again before they are queued. `model_of(request)`: the name of
        the base model it runs on, matched against what workers hold (default: the request's `model` as given).
        `cache_scope`: "user" (each user's repeats hit only their own results) or "global" (shared).
        `batch_images`: most images in one cross-user batch (1: every job runs alone). `check_storage()` raises
        while the data dir can't be written (default: the store's own probe)."""
        self.store = store
        self._identify = identify
        self._check = check
        self.time_limit_s = time_limit_s
        self.limits = limits
        self.cache = ResultCache(cache_entries)
        self.cache_scope = cache_scope
        self.executor = executor or LocalExecutor.threads(run_batch, workers)
        self._model_of = model_of
        self.batch_images = batch_images
        self._save = save
        self._validate = validate or GenerationRequest.model_validate
        self._check_storage = check_storage or store.probe
        self.max_queue = max_queue
        self._queue = FairQueue()
        self._jobs: dict[str, Job] = {}  # queued and running
        self._wakeup: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused = False
        self._stopping = False
        self._dispatcher: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()  # one task per batch running on a worker
        self._keeper: asyncio.Task | None = None
        self._unsaved: dict[str, JobRecord] = {}  # records the store could not take yet
        self.storage_fault: str | None = None  # why the data dir can't be written, while it can't
        self._storage_checked = 0.0
        self.metrics = StudioMetrics(queue_length=self.queue_length, running=self.running_count)

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Condition()
        self._stopping = False
        try:
            recovered = self.store.recover()  # a crash left these queued: they run again, in their old order
        except Exception as exc:  # a store that can't be written at start: start degraded, recover later
            log.error("could not recover queued jobs: %s", exc)
            self._storage_failed(exc)
            recovered = []
        for record in recovered:
            await self._requeue(record)
        await self.executor.start(self._workers_changed)
        self._spawn_dispatcher()
        self._keeper = asyncio.create_task(self._keep_storage(), name="job-storage-keeper")

    async def stop(self) -> None:
        self._stopping = True
        for job in self._jobs.values():
            if job.status == JobStatus.running:
                job.cancel.set()
        tasks = [*self._batches, *(task for task in (self._dispatcher, self._keeper) if task)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._batches, self._dispatcher, self._keeper = set(), None, None
        await self.executor.stop()

    async def _requeue(self, record: JobRecord) -> None:
        """A job recovered after a restart: validated again, then queued with its batch and cache keys."""
        try:
            request = await asyncio.to_thread(self._validate, record.request)
            if self._check is not None:  # as at submit: a name the user may not use never runs
                await asyncio.to_thread(self._check, request, record.user)
            cache_key = await self._cache_key(request, record.user)
        except Exception as exc:
            job = Job(record, GenerationRequest(), None, None)
            self._finish(job, JobStatus.failed, classify(exc))
            return
        job = Job(record, request, request.batch_key(), cache_key, model=await self._model_name(request))
        self._jobs[job.id] = job
        self._queue.push(job)

    # -- clients --------------------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, user: str, priority: int = 0,
                     listener: asyncio.Queue | None = None) -> Job:
        """Queue a job. `listener` is subscribed before the job can start, so it misses none of its events."""
        if self.limits is not None:
            self.limits.admit(user, self.active_jobs(user))
        if self._check is not None:
            await asyncio.to_thread(self._check, request, user)
        cache_key = await self._cache_key(request, user)
        if self.storage_fault:
            raise StudioError(self._storage_error())
        if cache_key:
            cached = self._from_cache(cache_key, request, user, priority, listener)
            if cached is not None:
                return cached
        if len(self._queue) >= self.max_queue:
            raise QueueFull(len(self._queue))
        record = JobRecord(id=secrets.token_hex(8), user=user, request=request.model_dump(mode="json"),
                           priority=priority)
        self._store_write(self.store.add, record)
        job = Job(record, request, request.batch_key(), cache_key, listeners=[listener] if listener else [],
                  model=await self._model_name(request))
        self._jobs[job.id] = job
        async with self._wakeup:
            self._queue.push(job)
            self._wakeup.notify()
        self._publish(job, "queued", {"position": self.position(job.id)})
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
        jobs: list[Job] = []
        try:
            for request in requests:
                jobs.append(await self.submit(request, user, priority, listener=events))
            unfinished = {job.id for job in jobs}  # a job answered from the cache has its outcome queued already
            while unfinished:
                event = await events.get()
                yield event
                if event.final:
                    unfinished.discard(event.job_id)
        finally:
            for job in jobs:
                self._unlisten(job, events)
                if job.outcome is None:
                    await self.cancel(job.id)

    async def outcomes(self, requests: list[GenerationRequest], user: str, priority: int = 0,
                       on_event: Callable[[JobEvent], Any] | None = None) -> list[Outcome]:
        """Submit the requests together, follow them to their ends and return their outcomes in the requests'
        order: what a client that doesn't stream needs. `on_event` (plain or async) sees every event on the way
        (progress bars, an early cancel)."""
        outcomes: dict[str, Outcome] = {}
        order: list[str] = []
        async for event in self.follow_many(requests, user, priority):
            if event.job_id not in order:  # each job's first event comes in submission order
                order.append(event.job_id)
            if on_event is not None and asyncio.iscoroutine(seen := on_event(event)):
                await seen
            if event.final:
                outcomes[event.job_id] = event.outcome
        return [outcomes[job_id] for job_id in order]

    async def outcome(self, request: GenerationRequest, user: str, priority: int = 0,
                      on_event: Callable[[JobEvent], Any] | None = None) -> Outcome:
        """One job followed to its end (see `outcomes`)."""
        [outcome] = await self.outcomes([request], user, priority, on_event)
        return outcome

    def get(self, job_id: str, user: str | None = None) -> JobRecord:
        job = self._jobs.get(job_id)
        record = job.record if job else self._unsaved.get(job_id) or self.store.get(job_id)
        if record is None or (user is not None and record.user != user):
            raise JobNotFound(job_id)  # another user's job is reported as missing, not as forbidden
        return record

    def position(self, job_id: str) -> int | None:
        """1 = next to run; None when not waiting."""
        for position, job in enumerate(self._queue.order(), start=1):
            if job.id == job_id:
                return position
        return None

    async def cancel(self, job_id: str, user: str | None = None) -> JobRecord:
        record = self.get(job_id, user)
        job = self._jobs.get(job_id)
        if job is not None and self._queue.remove(job_id) is not None:
            self._finish(job, JobStatus.cancelled, JobError(ErrorKind.cancelled, "cancelled before it started"))
        elif job is not None:
            job.cancel.set()  # the engine stops within one step; the worker records it
        return record

    async def pause(self) -> None:
        self._paused = True

    async def resume(self) -> None:
        await self._wake_all(lambda: setattr(self, "_paused", False))

    @property
    def paused(self) -> bool:
        return self._paused

    def active_jobs(self, user: str) -> int:
        """The user's queued and running jobs."""
        return sum(1 for job in self._jobs.values() if job.user == user)

    def queue_length(self) -> int:
        return len(self._queue)

    def running_count(self) -> int:
        return sum(len(worker.jobs) for worker in self.executor.workers())

    def status(self) -> dict:
        """The queue and the workers (device, loaded models, current jobs), as /api/v1/queue and the System tab
        show them."""
        executor = self.executor.describe()  # its kind, workers and its own counts (Ray: actors pending, lost)
        workers = executor.pop("workers")
        return {"queued": len(self._queue), "running": self.running_count(), "paused": self._paused,
                "max_queue": self.max_queue, "workers": len(workers), "batch_images": self.batch_images,
                **executor, "worker_list": workers}

    def subscribe(self, job_id: str) -> asyncio.Queue:
        """A queue of JobEvents for one job (empty forever if the job has already ended); unsubscribe when done."""
        events: asyncio.Queue = asyncio.Queue()
        if job_id in self._jobs:
            self._jobs[job_id].listeners.append(events)
        return events

    def unsubscribe(self, job_id: str, events: asyncio.Queue) -> None:
        if job_id in self._jobs:
            self._unlisten(self._jobs[job_id], events)

    @staticmethod
    def _unlisten(job: Job, events: asyncio.Queue) -> None:
        if events in job.listeners:
            job.listeners.remove(events)

    # -- health ---------------------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """ok, or degraded with the reasons: the data dir can't be written, or a worker is down."""
        if time.monotonic() - self._storage_checked > STORAGE_RECHECK_S:
            await self._recheck_storage()
        reasons = []
        if self.storage_fault:
            reasons.append(f"storage: the data dir can't be written ({self.storage_fault}); queued jobs wait")
        if self._dispatcher is not None and self._dispatcher.done():
            reasons.append("workers: the dispatcher is down")
        reasons.extend(self.executor.health())
        return {"status": "degraded" if reasons else "ok", "reasons": reasons}

    def _storage_failed(self, exc: BaseException) -> None:
        if self.storage_fault is None:
            log.error("the data dir can't be written: %s", exc)
        self.storage_fault = storage_reason(exc)
        self.metrics.storage_faults.inc()

    def _storage_error(self) -> JobError:
        return JobError(ErrorKind.storage, f"the studio can't write its data now ({self.storage_fault}); try again "
                                           "later")

    def _store_write(self, write: Callable[[JobRecord], Any], record: JobRecord) -> None:
        """A write a client waits on (a new job): a storage fault refuses it as a 503, never a bare 500."""
        try:
            write(record)
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            self._storage_failed(exc)
            raise StudioError(self._storage_error()) from None

    def _persist(self, record: JobRecord) -> None:
        """Write a job's state; if the store can't take it now, keep it for when it can."""
        try:
            self.store.update(record)
            self._unsaved.pop(record.id, None)
        except Exception as exc:
            self._unsaved[record.id] = record
            self._storage_failed(exc)

    async def _recheck_storage(self) -> None:
        self._storage_checked = time.monotonic()
        try:
            await asyncio.to_thread(self._check_storage)
            for record in list(self._unsaved.values()):
                self.store.update(record)
                self._unsaved.pop(record.id, None)
        except Exception as exc:
            self._storage_failed(exc)
            return
        if self.storage_fault is not None:
            log.warning("the data dir can be written again; the queue goes on")
            await self._wake_all(lambda: setattr(self, "storage_fault", None))

    async def _keep_storage(self) -> None:
        while True:
            await asyncio.sleep(STORAGE_RECHECK_S)
            if self.storage_fault or self._unsaved:
                await self._recheck_storage()

    async def _wake_all(self, change: Callable[[], None]) -> None:
        async with self._wakeup:
            change()
            self._wakeup.notify_all()

    # -- work -----------------------------------------------------------------------------------------------
    def _spawn_dispatcher(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name="job-dispatcher")
        self._dispatcher.add_done_callback(self._dispatcher_ended)

    def _dispatcher_ended(self, task: asyncio.Task) -> None:
        if self._stopping:
            return
        log.error("the job dispatcher died (%r); starting a new one", None if task.cancelled() else task.exception())
        self.metrics.worker_restarts.inc()
        self._spawn_dispatcher()

    def _workers_changed(self) -> None:
        """The executor's workers joined or left: a new one may take queued work now."""
        if self._loop is not None and not self._stopping:
            self._loop.create_task(self._wake_all(lambda: None))

    def _free_workers(self) -> list[Worker]:
        return [worker for worker in self.executor.workers() if not worker.busy]

    def _can_start(self) -> bool:
        return not self._paused and not self.storage_fault and len(self._queue) > 0 and bool(self._free_workers())

    async def _dispatch(self) -> None:
        """Hand the next batch to the best free worker, as long as there are both."""
        while True:
            async with self._wakeup:
                await self._wakeup.wait_for(self._can_start)
                jobs = self._take_batch()
                worker = choose_worker(self._free_workers(), jobs[0].model)
                worker.jobs, worker.last_used = jobs, time.monotonic()
            for position, waiting in enumerate(self._queue.order(), start=1):  # one pass, not one per job
                self._publish(waiting, "position", {"position": position})
            task = asyncio.create_task(self._execute(worker, jobs), name=f"job-batch-{jobs[0].id}")
            self._batches.add(task)
            task.add_done_callback(lambda done, worker=worker, jobs=jobs: self._batch_ended(worker, jobs, done))

    def _batch_ended(self, worker: Worker, jobs: list[Job], task: asyncio.Task) -> None:
        """The worker is free again. A batch task only raises on a bug of ours (the engine's errors are each job's
        outcome): its unfinished jobs fail, counted, and the service goes on."""
        self._batches.discard(task)
        worker.jobs = []
        if self._stopping:
            return
        died = not task.cancelled() and task.exception() is not None
        if died:
            log.error("a job batch on %s died (%r)", worker.id, task.exception())
            self.metrics.worker_restarts.inc()
        for job in jobs:  # none may be left without an outcome, unless it went back to the queue (a lost worker)
            if job.outcome is None and self.position(job.id) is None and (died or job.status == JobStatus.running):
                self._finish(job, JobStatus.failed, JobError(ErrorKind.worker_lost, "the worker running this job "
                                                                                     "failed; submit it again"))
        self._workers_changed()

    def _take_batch(self) -> list[Job]:
        """The next job, plus queued jobs that can share its pipeline call (same batch key), within the budget."""
        first = self._queue.pop()
        if first.batch_key is None or first.request.batch_size >= self.batch_images:
            return [first]
        budget = self.batch_images - first.request.batch_size

        def fits(job: Job) -> bool:
            nonlocal budget
            if job.batch_key != first.batch_key or job.request.batch_size > budget:
                return False
            budget -= job.request.batch_size
            return True

        return [first, *self._queue.take(fits, limit=self.batch_images)]

    async def _execute(self, worker: Worker, jobs: list[Job]) -> None:
        for job in jobs:
            self._begin(job)
        try:
            if len(jobs) > 1:
                try:
                    results = await self._engine_call(worker, jobs)
                except WorkerLost:
                    raise
                except Exception as exc:  # one bad request must not fail the others: each runs again alone
                    log.warning("a batch of %d jobs failed (%s); running them one by one", len(jobs), exc)
                else:
                    for job, result in zip(jobs, results):
                        await self._settle(job, self._record(job, result, worker))
                    return
            for job in jobs:
                await self._settle(job, self._run_alone(worker, job))
        except WorkerLost as exc:
            await self._worker_lost(worker, [job for job in jobs if job.outcome is None], exc)
        except asyncio.CancelledError:
            if self._stopping:  # the server stops: running jobs end interrupted (and run again if re-sent)
                for job in jobs:
                    if job.outcome is None:
                        self._finish(job, JobStatus.interrupted, JobError(ErrorKind.interrupted,
                                                                          "the studio stopped while this job ran"))
            raise
        finally:
            worker.batches += 1
            for job in jobs:
                if job.timer is not None:
                    job.timer.cancel()

    async def _worker_lost(self, worker: Worker, jobs: list[Job], exc: WorkerLost) -> None:
        """The worker died under these jobs: each runs again, first in line, unless it already had its second run
        (or was being cancelled): nothing is lost silently."""
        log.error("worker %s (%s) was lost: %s", worker.id, worker.device, exc)
        if exc.started:
            self.metrics.worker_deaths.inc()
        for job in jobs:
            if job.timer is not None:
                job.timer.cancel()
            if not exc.started:  # the worker was gone before the batch reached it: that was no run
                job.runs -= 1
            if job.cancel.is_set():
                status, error = ((JobStatus.failed, self._time_limit_error()) if job.timed_out.is_set() else
                                 (JobStatus.cancelled, JobError(ErrorKind.cancelled, "cancelled while running")))
                self._finish(job, status, error)
            elif job.runs >= RUNS_PER_JOB:
                self._finish(job, JobStatus.failed, JobError(
                    ErrorKind.worker_lost, f"the worker running this job was lost {job.runs} times ({exc}); "
                                           "submit it again"))
            else:
                job.record.status, job.record.started_at = JobStatus.queued, None
                self._persist(job.record)
                async with self._wakeup:
                    self._queue.push_front(job)
                    self._wakeup.notify_all()
                self._publish(job, "queued", {"position": self.position(job.id), "rerun": True,
                                              "reason": f"worker {worker.id} ({worker.device}) was lost"})

    def _begin(self, job: Job) -> None:
        job.runs += 1
        record = job.record
        record.status, record.started_at = JobStatus.running, time.time()
        if self.time_limit_s:
            job.timer = self._loop.call_later(self.time_limit_s, self._stop_for_time, job)
        self._persist(record)
        self._publish(job, "running", {"queue_wait_s": record.started_at - record.created_at})

    @staticmethod
    def _stop_for_time(job: Job) -> None:
        job.timed_out.set()
        job.cancel.set()  # the engine stops at its next step

    async def _engine_call(self, worker: Worker, jobs: list[Job]) -> list[GenerationResult]:
        items = [WorkItem(job.request, self._step_publisher(job), job.cancel) for job in jobs]
        return await self.executor.run(worker, items)

    def _step_publisher(self, job: Job) -> Callable[[StepEvent], None]:
        def on_step(event: StepEvent) -> None:  # called from the engine's thread
            data = {"step": event.step, "total": event.total, "eta_s": event.eta_s, "preview": event.preview}
            self._loop.call_soon_threadsafe(self._publish, job, "step", data)
        return on_step

    async def _run_alone(self, worker: Worker, job: Job) -> None:
        [result] = await self._engine_call(worker, [job])
        await self._record(job, result, worker)

    async def _record(self, job: Job, result: GenerationResult, worker: Worker) -> None:
        record = job.record
        paths = await asyncio.to_thread(self._save, result)
        try:
            image_ids = self.store.add_images(record, paths, result.seeds)
        except Exception:
            for path in paths:  # files the history can't list would be orphans
                Path(path).unlink(missing_ok=True)
            raise
        record.result = {"seeds": result.seeds, "image_ids": image_ids, "model_id": result.model_id,
                         "device": result.device, "worker": worker.id, "blocked": result.blocked, "batched_with": result.batched_with,
                         "timings": {"load_s": result.timings.load_s, "total_s": result.timings.total_s,
                                     "it_per_s": result.timings.it_per_s},
                         "peak_memory_bytes": result.peak_memory_bytes}
        if job.timed_out.is_set():
            self._finish(job, JobStatus.failed, self._time_limit_error())
        elif result.cancelled:
            self._finish(job, JobStatus.cancelled, JobError(ErrorKind.cancelled, "cancelled while running"))
        else:
            self._finish(job, JobStatus.done)
            if job.cache_key:
                self.cache.put(job.cache_key, job.id)

    def _time_limit_error(self) -> JobError:
        return JobError(ErrorKind.time_limit, f"stopped after the {self.time_limit_s:g} s limit for one job; ask for "
                                              "fewer steps or a smaller size")

    async def _settle(self, job: Job, work) -> None:
        """Await one job's work; whatever goes wrong becomes that job's outcome, as data."""
        import torch
        try:
            await work
        except WorkerLost:
            raise  # not the job's fault: _execute runs it again elsewhere
        except Exception as exc:  # reported as data on the job; the worker lives on for the next job
            error = classify(exc)
            if error.kind == ErrorKind.out_of_memory:  # free what this job held before the next one starts
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            elif error.kind == ErrorKind.storage:
                self._storage_failed(exc)
            elif error.kind in (ErrorKind.internal, ErrorKind.model_load):
                log.exception("job %s failed", job.id)
            self._finish(job, JobStatus.failed, error)

    def _finish(self, job: Job, status: JobStatus, error: JobError | None = None) -> None:
        """The job's outcome: to its listeners at once, then to the store (or kept until the store can write)."""
        record = job.record
        record.status, record.finished_at, record.error = status, time.time(), error
        job.outcome = Outcome(status.value, record.result, error)
        self._jobs.pop(job.id, None)
        wait = record.started_at - record.created_at if record.started_at else None
        self.metrics.observe(status.value, wait, record.result, error.kind.value if error else None)
        self._publish(job, status.value, {"error": error.as_dict() if error else None, "result": record.result},
                      job.outcome)
        self._persist(record)

    def _publish(self, job: Job, kind: str, data: dict[str, Any], outcome: Outcome | None = None) -> None:
        for events in list(job.listeners):
            events.put_nowait(JobEvent(kind, job.id, data, outcome))

    async def _model_name(self, request: GenerationRequest) -> str | None:
        if self._model_of is None:
            return request.model
        try:
            return await asyncio.to_thread(self._model_of, request)
        except Exception:  # noqa: BLE001 (only a preference: the engine reports a bad name as the job's error)
            return request.model

    # -- the cache ------------------------------------------------------------------------------------------
    async def _cache_key(self, request: GenerationRequest, user: str) -> str | None:
        if self._identify is None or request.seed is None or self.cache.max_entries == 0:
            return None
        identity = await asyncio.to_thread(self._identify, request)  # it may read the model's files
        return self.cache.key(request, identity, user if self.cache_scope == "user" else None)

    def _from_cache(self, key: str, request: GenerationRequest, user: str, priority: int,
                    listener: asyncio.Queue | None) -> Job | None:
        """A finished job answering from an earlier identical one: its images copied, `cached: True`."""
        source = self.store.get(self.cache.get(key) or "")
        if source is None or source.status != JobStatus.done:
            return None
        now = time.time()
        record = JobRecord(id=secrets.token_hex(8), user=user, request=request.model_dump(mode="json"),
                           priority=priority, status=JobStatus.running, created_at=now, started_at=now)
        copies = []
        try:
            for image_id in source.result["image_ids"]:
                row = self.store.image(image_id)
                if row is None:  # deleted after the lookup: its file is going too
                    raise FileNotFoundError(image_id)
                original = Path(row["path"])
                copy = original.with_name(f"{original.stem}-{record.id}{original.suffix}")
                try:  # each job owns a name for its files: deleting one never breaks another
                    os.link(original, copy)
                except OSError as exc:  # a file system without hard links
                    if is_storage_fault(exc):
                        raise
                    shutil.copyfile(original, copy)
                copies.append(copy)
            self._store_write(self.store.add, record)
            record.result = {**source.result, "cached": True,
                             "image_ids": self.store.add_images(record, copies, source.result["seeds"])}
        except Exception as exc:
            for copy in copies:
                copy.unlink(missing_ok=True)
            if isinstance(exc, FileNotFoundError):  # its files went (deleted, pruned) after the lookup: a miss
                self.cache.forget(source.id)
                return None
            if isinstance(exc, StudioError) or not is_storage_fault(exc):
                raise
            self._storage_failed(exc)
            raise StudioError(self._storage_error()) from None
        job = Job(record, request, None, key, listeners=[listener] if listener else [])
        self.metrics.cache_hits.inc()
        self._finish(job, JobStatus.done)
        return job
