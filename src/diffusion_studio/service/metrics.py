"""Prometheus metrics for jobs and the service, in the studio's own registry (served at /metrics), and the last
hour of them as a ring buffer of samples (`MetricsHistory`) for the System tab's charts: Prometheus keeps only
totals and the current value, a chart needs the values over time. `StorageUsage` is what the history holds on
disk (outputs folder, database), read cheaply enough for every scrape."""

from __future__ import annotations

import asyncio
import math
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..libraries import loaded

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def _cuda_reserved_bytes() -> int:
    """torch's reserved CUDA memory; 0 until torch is loaded (read without importing it: the gauge is read by
    every /metrics scrape, from the server's start)."""
    torch = loaded("torch")
    return torch.cuda.memory_reserved() if torch is not None and torch.cuda.is_available() else 0


SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class StudioMetrics:
    def __init__(self, queue_length: Callable[[], int], running: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("studio_jobs_total", "Finished jobs by outcome", ["status"], registry=r)
        self.errors = Counter("studio_job_errors_total", "Failed jobs by error kind", ["kind"], registry=r)
        self.queue_wait = Histogram("studio_queue_wait_seconds", "Time from submit to start", buckets=SECONDS,
                                    registry=r)
        self.load = Histogram("studio_model_load_seconds", "Model load time inside jobs", buckets=SECONDS, registry=r)
        self.total = Histogram("studio_job_seconds", "Engine time per job", buckets=SECONDS, registry=r)
        self.step = Histogram("studio_step_seconds", "Mean denoising step time per job", buckets=SECONDS,
                              registry=r)
        self.it_per_s = Gauge("studio_last_it_per_second", "Denoising steps per second, last job", registry=r)
        self.peak_memory = Gauge("studio_last_peak_memory_bytes", "Peak memory of the last job", registry=r)
        self.cache_hits = Counter("studio_cache_hits_total", "Jobs answered from the result cache", registry=r)
        self.worker_restarts = Counter("studio_worker_restarts_total", "Job batch tasks or the dispatcher "
                                       "that died of a bug of ours (their jobs failed worker_lost)", registry=r)
        self.worker_deaths = Counter("studio_worker_deaths_total", "Workers lost while running a batch (process "
                                     "killed, node lost); their jobs ran again on another worker", registry=r)
        self.storage_faults = Counter("studio_storage_faults_total", "Writes to the data dir or the history "
                                      "database that failed", registry=r)
        Gauge("studio_queue_length", "Jobs waiting", registry=r).set_function(queue_length)
        Gauge("studio_jobs_running", "Jobs running now", registry=r).set_function(running)
        self._gpu = _gpu_utilisation()
        # What the caching allocator holds, beside each job's allocated peak: 0 until torch holds CUDA memory.
        Gauge("studio_cuda_reserved_bytes", "CUDA memory reserved by torch", registry=r).set_function(
            _cuda_reserved_bytes)
        if self._gpu is not None:
            Gauge("studio_gpu_utilisation_percent", "GPU utilisation (nvidia-ml-py)", registry=r).set_function(
                self._gpu)
        self._queue_length, self._running = queue_length, running
        self.history = MetricsHistory()
        self.storage: StorageUsage | None = None

    def watch_storage(self, outputs_dir: Path, db_path: Path) -> "StorageUsage":
        """Expose the outputs folder's size and file count and the database's size (the sampler walks the folder
        every OUTPUTS_WALK_S and after a prune, in a thread)."""
        self.storage = usage = StorageUsage(outputs_dir, db_path)
        r = self.registry
        Gauge("studio_outputs_bytes", "Bytes in the outputs folder (hard-linked names counted once; NaN until the "
              "first walk)", registry=r).set_function(lambda: usage.outputs_bytes)
        Gauge("studio_outputs_files", "Files in the outputs folder (hard-linked names counted once)",
              registry=r).set_function(lambda: usage.outputs_files)
        Gauge("studio_db_bytes", "Bytes of the history database (with its WAL)", registry=r).set_function(
            usage.db_bytes)
        return usage

    def observe(self, status: str, queue_wait_s: float | None, result: dict, error_kind: str | None) -> None:
        timings = result.get("timings") if status == "done" else None
        self.history.record_job(status, queue_wait_s, timings["it_per_s"] if timings else None,
                                result.get("peak_memory_bytes") if timings else None)
        self.jobs.labels(status).inc()
        if status == "failed":
            self.errors.labels(error_kind or "internal").inc()
        if queue_wait_s is not None:
            self.queue_wait.observe(queue_wait_s)
        timings = result.get("timings")
        if status == "done" and timings:
            self.load.observe(timings["load_s"])
            self.total.observe(timings["total_s"])
            if timings["it_per_s"]:
                self.step.observe(1.0 / timings["it_per_s"])
                self.it_per_s.set(timings["it_per_s"])
            self.peak_memory.set(result.get("peak_memory_bytes", 0))

    def gpu_utilisation(self) -> float | None:
        return self._gpu() if self._gpu is not None else None

    @property
    def has_gpu(self) -> bool:
        """Whether nvidia-ml-py found a GPU whose utilisation can be read."""
        return self._gpu is not None

    def sample(self) -> None:
        """Read the gauges (queue, running, memory, GPU) into the history's current interval."""
        torch = loaded("torch")  # not imported for it: until torch is loaded the studio holds no GPU memory
        cuda = torch is not None and torch.cuda.is_available()
        self.history.record_gauges(
            queue_length=self._queue_length(), running=self._running(), rss_bytes=psutil.Process().memory_info().rss,
            gpu_memory_bytes=torch.cuda.memory_reserved() if cuda else None,
            gpu_percent=self.gpu_utilisation())

    async def keep_sampling(self) -> None:
        """Sample once per interval until cancelled (the server runs this for its lifetime); walk the outputs
        folder when due, in a thread of its own so a large folder never delays a sample."""
        walk: asyncio.Future | None = None
        try:
            while True:
                try:
                    self.sample()
                except Exception:  # noqa: BLE001 (one bad reading must not end the sampling for good)
                    log.exception("metrics sample failed")
                if self.storage is not None and self.storage.due() and (walk is None or walk.done()):
                    walk = asyncio.ensure_future(asyncio.to_thread(self.storage.refresh))
                await asyncio.sleep(self.history.every_s)
        finally:
            if walk is not None:
                walk.cancel()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _gpu_utilisation() -> Callable[[], float] | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no nvidia-ml-py, no driver, or no GPU: the metric is simply absent
        return None
    return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


SAMPLE_EVERY_S = 10.0
OUTPUTS_WALK_S = 60.0  # a walk stats every file (~1 s per 100k on a local disk): once a minute is plenty for a size
HISTORY_S = 3600.0
GIB = 2**30


class StorageUsage:
    """The outputs folder's bytes and files, from a walk (`refresh`, in a thread) when one is due: every `every_s`,
    and at the next sample after a prune (`stale`); the database's bytes from three stats at each read. Hard-linked
    names (a cached job's copies) are counted once, as they take the space once. Between walks the values lag the
    images saved since: a walk per scrape would stat every file each time."""

    def __init__(self, outputs_dir: Path, db_path: Path, every_s: float = OUTPUTS_WALK_S,
                 clock: Callable[[], float] = time.monotonic):
        self.outputs_dir, self.db_path, self.every_s, self._clock = Path(outputs_dir), Path(db_path), every_s, clock
        self.outputs_bytes = math.nan  # unknown until the first walk, not zero
        self.outputs_files = math.nan
        self._walked_at: float | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        with self._lock:
            return self._walked_at is None or self._clock() - self._walked_at >= self.every_s

    def stale(self) -> None:
        """Files went (a prune): walk again at the next sample rather than at the next interval."""
        with self._lock:
            self._walked_at = None

    def refresh(self) -> None:
        """Walk the outputs folder (blocking: call it in a thread)."""
        started = self._clock()
        seen: set[tuple[int, int]] = set()
        size = 0
        pending = [self.outputs_dir]
        while pending:
            try:
                with os.scandir(pending.pop()) as entries:
                    for entry in entries:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                pending.append(Path(entry.path))
                            elif entry.is_file(follow_symlinks=False):
                                stat = entry.stat(follow_symlinks=False)
                                if (stat.st_dev, stat.st_ino) not in seen:
                                    seen.add((stat.st_dev, stat.st_ino))
                                    size += stat.st_size
                        except OSError:  # removed while we walked (a prune, a probe file): not there any more
                            continue
            except OSError:  # the folder not made yet, or a folder removed while we walked
                continue
        with self._lock:
            self.outputs_bytes, self.outputs_files, self._walked_at = size, len(seen), started

    def db_bytes(self) -> float:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(f"{self.db_path}{suffix}").st_size
            except FileNotFoundError:
                continue
        return total


@dataclass
class Sample:
    """One interval of the history: the jobs that ended in it (recorded as they end, so exact) and the gauges read
    in it (None where no reading fell in the interval: a gap, not a made-up value)."""

    at: float  # the interval's start, unix seconds
    ended: dict[str, int] = field(default_factory=dict)  # status -> jobs
    it_per_s: list[float] = field(default_factory=list)  # of the jobs done in it
    waits_s: list[float] = field(default_factory=list)  # queue wait of the jobs that ended in it
    peak_memory_bytes: int | None = None  # the largest peak of the jobs done in it
    queue_length: int | None = None  # the most seen in it
    running: int | None = None
    rss_bytes: int | None = None  # the last reading
    gpu_memory_bytes: int | None = None
    gpu_percent: float | None = None


class MetricsHistory:
    """A ring buffer of one `Sample` per `every_s` over the last `window_s`. Written on the event loop (job ends,
    the sampler) and read from Gradio's worker threads, hence the lock."""

    def __init__(self, every_s: float = SAMPLE_EVERY_S, window_s: float = HISTORY_S,
                 clock: Callable[[], float] = time.time):
        self.every_s, self.window_s, self._clock = every_s, window_s, clock
        self._samples: deque[Sample] = deque(maxlen=math.ceil(window_s / every_s) + 1)
        self._lock = threading.Lock()
        self.started_at = clock()

    def _current(self) -> Sample:
        at = math.floor(self._clock() / self.every_s) * self.every_s
        if not self._samples or self._samples[-1].at < at:
            self._samples.append(Sample(at))
        return self._samples[-1]

    def record_job(self, status: str, queue_wait_s: float | None, it_per_s: float | None,
                   peak_memory_bytes: int | None) -> None:
        with self._lock:
            sample = self._current()
            sample.ended[status] = sample.ended.get(status, 0) + 1
            if queue_wait_s is not None:
                sample.waits_s.append(queue_wait_s)
            if it_per_s:
                sample.it_per_s.append(it_per_s)
            if peak_memory_bytes:
                sample.peak_memory_bytes = max(sample.peak_memory_bytes or 0, peak_memory_bytes)

    def record_gauges(self, *, queue_length: int, running: int, rss_bytes: int, gpu_memory_bytes: int | None,
                      gpu_percent: float | None) -> None:
        with self._lock:
            sample = self._current()
            sample.queue_length = max(sample.queue_length or 0, queue_length)
            sample.running = max(sample.running or 0, running)
            sample.rss_bytes, sample.gpu_memory_bytes = rss_bytes, gpu_memory_bytes
            if gpu_percent is not None:
                sample.gpu_percent = gpu_percent

    def samples(self) -> list[Sample]:
        """The intervals of the last window that have anything in them, oldest first."""
        with self._lock:
            since = self._clock() - self.window_s
            return [Sample(s.at, dict(s.ended), list(s.it_per_s), list(s.waits_s), s.peak_memory_bytes,
                           s.queue_length, s.running, s.rss_bytes, s.gpu_memory_bytes, s.gpu_percent)
                    for s in self._samples if s.at + self.every_s > since]

    def frames(self) -> dict[str, "pd.DataFrame"]:
        """One long-format DataFrame per chart, `time` (UTC datetimes) first: jobs (jobs_per_minute by outcome, the
        jobs that ended in the minute up to each interval), speed (it_per_s), queue (jobs waiting / running), wait
        (queue_wait_s), memory (gib by series) and gpu (gpu_percent: empty without a GPU)."""
        samples = self.samples()
        now = self._clock()
        start, end = (math.floor(t / self.every_s) * self.every_s for t in (max(self.started_at, now - self.window_s),
                                                                              now))
        slots = [start + i * self.every_s for i in range(round((end - start) / self.every_s) + 1)]
        by_slot = {s.at: s for s in samples}
        per_minute = max(1, round(60 / self.every_s))
        jobs = []
        for index, at in enumerate(slots):  # every interval since the start: no job ended in an empty one
            window = [by_slot[slot] for slot in slots[max(0, index - per_minute + 1):index + 1] if slot in by_slot]
            for outcome in ("done", "failed"):
                jobs.append((at, outcome, sum(s.ended.get(outcome, 0) for s in window)))
        speed = [(s.at, sum(s.it_per_s) / len(s.it_per_s)) for s in samples if s.it_per_s]
        wait = [(s.at, sum(s.waits_s) / len(s.waits_s)) for s in samples if s.waits_s]
        queue = [(s.at, series, value) for s in samples if s.queue_length is not None
                 for series, value in (("waiting", s.queue_length), ("running", s.running))]
        memory = [(s.at, series, value / GIB) for s in samples
                  for series, value in (("process RSS", s.rss_bytes), ("GPU reserved", s.gpu_memory_bytes),
                                        ("job peak", s.peak_memory_bytes)) if value is not None]
        gpu = [(s.at, s.gpu_percent) for s in samples if s.gpu_percent is not None]
        return {"jobs": _frame(jobs, ["outcome", "jobs_per_minute"]), "speed": _frame(speed, ["it_per_s"]),
                "queue": _frame(queue, ["series", "jobs"]), "wait": _frame(wait, ["queue_wait_s"]),
                "memory": _frame(memory, ["series", "gib"]), "gpu": _frame(gpu, ["gpu_percent"])}


def _frame(rows: list[tuple], columns: list[str]) -> "pd.DataFrame":
    import pandas as pd  # here, not at the top: the CLI's generate imports the service but draws no chart

    frame = pd.DataFrame(rows, columns=["time", *columns])
    frame["time"] = pd.to_datetime(frame["time"], unit="s")  # naive UTC: the browser shows it in local time
    for column in columns:
        if column in ("outcome", "series"):
            frame[column] = frame[column].astype(str)
        else:
            frame[column] = frame[column].astype(float)
    return frame
