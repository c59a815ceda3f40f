"""The executor seam: the job service keeps the one queue (fairness, batching, cache, history, limits, metrics) and
hands each batch of work items to an executor's worker; an executor only knows how to run a batch somewhere.

- `LocalExecutor`: engines in this process, one worker per configured device (each device its own `Engine`, so its
  own model manager), `workers` threads per device as before.
- `RayExecutor` (service/ray_executor.py): engine actors on a Ray cluster, one per GPU or `ray_workers` CPU actors.

A worker is a `Worker` record the service reads to choose where a batch goes (a free worker already holding the
request's model, else the least recently used) and that the System tab and /api/v1/queue list. A worker that dies
mid-batch raises `WorkerLost` from `run`: the service runs its jobs again once on another worker.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine.runner import WorkItem
from ..requests import GenerationResult
from .engine_thread import EngineThread

BatchRunner = Callable[[list[WorkItem]], list[GenerationResult]]  # Engine.run_batch


class WorkerLost(RuntimeError):
    """The worker running a batch is gone (its process killed, its node lost): the batch never finished there.
    `started=False`: it was gone before the batch reached it, so that run doesn't count against the job."""

    def __init__(self, message: str, started: bool = True):
        super().__init__(message)
        self.started = started


@dataclass(eq=False)
class Worker:
    """One place a batch can run: a device of this process or a Ray actor. The service sets `jobs` and
    `last_used`; the executor keeps `models` (what it holds loaded) current after each batch."""

    id: str
    device: str
    node: str = "local"
    models: tuple[str, ...] = ()
    jobs: list = field(default_factory=list)  # the service's Job objects running there now
    last_used: float = 0.0
    joined_at: float = field(default_factory=time.time)
    batches: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    def describe(self) -> dict[str, Any]:
        """What the System tab and /api/v1/queue show of it."""
        return {"id": self.id, "device": self.device, "node": self.node, "models": list(self.models),
                "busy": self.busy, "jobs": [job.id for job in self.jobs], "batches": self.batches,
                "last_used": self.last_used or None, "joined_at": self.joined_at}


def choose_worker(free: list[Worker], model: str | None) -> Worker:
    """A free worker that already holds `model` (no load), else the one idle longest (spreads the models out)."""
    holding = [worker for worker in free if model is not None and model in worker.models]
    return min(holding or free, key=lambda worker: worker.last_used)


class Executor(ABC):
    """Where batches run. `start(changed)`: `changed()` is called (on the event loop) whenever workers join or
    leave, so the service can dispatch to a new one or report a lost one."""

    kind: str

    async def start(self, changed: Callable[[], None]) -> None:
        self._changed = changed

    async def stop(self) -> None:
        pass

    @abstractmethod
    def workers(self) -> list[Worker]:
        """The workers that can take work now (a lost one is gone from this list)."""

    @abstractmethod
    async def run(self, worker: Worker, items: list[WorkItem]) -> list[GenerationResult]:
        """Run one batch on `worker`: each item's steps reach its `on_step`, its `cancel` reaches the worker within
        a step. Raises WorkerLost if the worker dies; any other exception is the batch's own failure."""

    def health(self) -> list[str]:
        """Reasons the executor is degraded (none: fine)."""
        return [] if self.workers() else ["workers: none available; queued jobs wait until one joins"]

    def describe(self) -> dict[str, Any]:
        return {"executor": self.kind, "workers": [worker.describe() for worker in self.workers()]}

    # Model management across workers (blocking: call off the event loop).
    @abstractmethod
    def loaded(self) -> list[dict]:
        """Every worker's loaded models, each row with the worker's id and device."""

    @abstractmethod
    def preload(self, name: str) -> None:
        """Load a base model on the worker that would run it next."""

    @abstractmethod
    def unload(self, name: str) -> bool:
        """Free `name` on every worker that holds it idle (True if any did)."""


@dataclass
class LocalDevice:
    """One device of this process: its engine's batch runner and model manager calls."""

    device: str
    run_batch: BatchRunner
    loaded: Callable[[], list[dict]] = list
    preload: Callable[[str], None] = lambda name: None
    unload: Callable[[str], bool] = lambda name: False


class LocalExecutor(Executor):
    """Engines in this process: `threads` workers per device, each running its batches on a long-lived thread of
    its own (service/engine_thread.py; the engine is thread-safe; threads on one device share its loaded models)."""

    kind = "local"

    def __init__(self, devices: list[LocalDevice], threads: int = 1):
        self.devices = devices
        self._workers: list[Worker] = []
        self._device_of: dict[str, LocalDevice] = {}
        for device in devices:
            for _ in range(threads):
                worker = Worker(id=f"local-{len(self._workers)}", device=device.device)
                self._workers.append(worker)
                self._device_of[worker.id] = device
        self._threads = {worker.id: EngineThread(f"engine-{worker.id}") for worker in self._workers}

    @classmethod
    def threads(cls, run_batch: BatchRunner, workers: int = 1, device: str = "local") -> LocalExecutor:
        """Today's service on one runner: `workers` batches at once."""
        return cls([LocalDevice(device, run_batch)], threads=workers)

    def workers(self) -> list[Worker]:
        return list(self._workers)

    async def run(self, worker: Worker, items: list[WorkItem]) -> list[GenerationResult]:
        return await self._threads[worker.id].call(self._run_on, self._device_of[worker.id], items)

    async def stop(self) -> None:
        for thread in self._threads.values():
            thread.close()

    def _run_on(self, device: LocalDevice, items: list[WorkItem]) -> list[GenerationResult]:
        """In the worker's thread: the batch, then what the device holds now (the manager's lock may be held by
        another thread's load for a while: never on the event loop)."""
        try:
            return device.run_batch(items)
        finally:
            held = tuple(row["name"] for row in device.loaded())
            for other in self._workers:  # threads of one device share its models
                if self._device_of[other.id] is device:
                    other.models = held

    def loaded(self) -> list[dict]:
        first = {}  # threads of one device share its models: its rows name its first worker
        for worker in self._workers:
            first.setdefault(id(self._device_of[worker.id]), worker.id)
        return [{**row, "worker": first[id(device)], "device": device.device}
                for device in self.devices for row in device.loaded()]

    def preload(self, name: str) -> None:
        idle = [worker for worker in self._workers if not worker.busy] or self._workers
        self._device_of[choose_worker(idle, name).id].preload(name)

    def unload(self, name: str) -> bool:
        return any([device.unload(name) for device in self.devices])  # a list: every device, not the first
