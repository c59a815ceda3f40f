"""Prometheus metrics for jobs and the service, in the studio's own registry (served at /metrics)."""

from __future__ import annotations

from typing import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.worker_restarts = Counter("studio_worker_restarts_total", "Job worker tasks that died and were "
                                       "restarted", registry=r)
        self.storage_faults = Counter("studio_storage_faults_total", "Writes to the data dir or the history "
                                      "database that failed", registry=r)
        Gauge("studio_queue_length", "Jobs waiting", registry=r).set_function(queue_length)
        Gauge("studio_jobs_running", "Jobs running now", registry=r).set_function(running)
        if torch.cuda.is_available():  # what the caching allocator holds, beside each job's allocated peak
            Gauge("studio_cuda_reserved_bytes", "CUDA memory reserved by torch", registry=r).set_function(
                torch.cuda.memory_reserved)
        self._gpu = _gpu_utilisation()
        if self._gpu is not None:
            Gauge("studio_gpu_utilisation_percent", "GPU utilisation (nvidia-ml-py)", registry=r).set_function(
                self._gpu)

    def observe(self, status: str, queue_wait_s: float | None, result: dict, error_kind: str | None) -> None:
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
