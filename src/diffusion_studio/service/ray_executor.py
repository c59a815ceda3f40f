"""RayExecutor: the job service's batches run on engine actors of a Ray cluster, one per GPU (`num_gpus=1`) on any
number of nodes, or `ray_workers` CPU actors when the cluster has no GPU.

Why actors and not Ray Serve: the job service already is the queue, the batcher and the router (fairness, the
cross-user batch, "the worker that holds the model"); Serve would add a second queue and its own router in front
of the same engine, and its replicas can't be asked which model they hold. An actor is exactly "an engine with its
own loaded models on one device" and nothing more.

Each batch is one streaming actor call: the actor runs `Engine.run_batch` in a thread and yields every step event
(with its preview) as it happens, then the results; the service sees them as a local run's callbacks. Cancel and
the time limit are the job's flag as before: a watcher forwards a set flag to the actor (a second, concurrent
actor call), which sets the engine's own flag, so it stops within one step. A dead actor (process killed, node
lost) raises `WorkerLost`; a keeper task pings the actors each second, drops the dead ones and asks Ray for
replacements, which Ray places when a node has room (a new node, or the autoscaler's), so workers join and leave
while the studio runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, WorkerCrashedError

from ..config import StudioConfig
from ..engine.runner import Engine, WorkItem
from ..requests import GenerationRequest, GenerationResult
from .executor import Executor, Worker, WorkerLost, choose_worker
from .outcomes import ErrorKind, JobError, StudioError

log = logging.getLogger(__name__)

KEEP_S = 1.0  # how often the keeper pings the actors and places missing ones
PING_TIMEOUT_S = 10.0  # an actor that doesn't answer its ping (no lock taken) this long is gone
BROKEN_RETRY_S = 30.0  # an actor whose engine can't be built: the next try waits this long
FAILED_ROUNDS = 5  # keeper rounds failing in a row (the head gone): leave the cluster and join it again
CANCEL_POLL_S = 0.05  # how often a running batch's cancel flags are looked at (well under one step)
WORKER_GONE = (RayActorError, ActorUnavailableError, WorkerCrashedError, ObjectLostError)


class EngineActor:
    """One engine on one device of a Ray node, with its own loaded models (wrapped by `ray.remote` below)."""

    def __init__(self, config: dict[str, Any], device: str, torch_threads: int | None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._cancels: dict[str, list[threading.Event]] = {}
        self._early: dict[str, set[int]] = {}  # cancels that arrived before their batch started here
        self._lock = threading.Lock()
        self.broken: str | None = None
        try:  # a failure here would kill the actor and hide why: kept, and raised by info() as a plain error
            self.config = StudioConfig.model_validate({**config, "device": device, "executor": "local",
                                                       "devices": []})
            self.engine = Engine(self.config)
        except Exception as exc:  # noqa: BLE001
            self.broken = f"{type(exc).__name__}: {exc}"[:300]

    def alive(self) -> int:
        """The keeper's ping: answers even while a batch runs or a model loads (it takes no lock)."""
        return os.getpid()

    def info(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError(f"the engine could not be built on {ray.util.get_node_ip_address()}: {self.broken}")
        return {"device": str(self.engine.device), "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "models": self._models()}

    def _models(self) -> list[str]:
        return [row["name"] for row in self.engine.manager.loaded()]

    def run(self, batch: str, requests: list[GenerationRequest]):
        """Yields ("step", index, StepEvent)... then ("done", results, models) or ("error", exception, models)."""
        events: queue.Queue = queue.Queue()
        flags = [threading.Event() for _ in requests]
        with self._lock:
            self._cancels[batch] = flags
            for index in self._early.pop(batch, ()):
                flags[index].set()
        items = [WorkItem(request, lambda event, index=index: events.put(("step", index, event)), flag)
                 for index, (request, flag) in enumerate(zip(requests, flags))]

        def work() -> None:
            try:
                events.put(("done", self.engine.run_batch(items), self._models()))
            except Exception as exc:  # noqa: BLE001 (the batch's own failure, classified by the service)
                events.put(("error", _picklable(exc), self._models()))

        threading.Thread(target=work, name=f"engine-{batch}", daemon=True).start()
        try:
            while True:
                event = events.get()
                yield event
                if event[0] != "step":
                    return
        finally:
            self._cancels.pop(batch, None)

    def cancel(self, batch: str, index: int) -> None:
        with self._lock:  # this call may run before its batch's run() has started (the actor runs calls at once)
            flags = self._cancels.get(batch)
            if flags is None:
                self._early.setdefault(batch, set()).add(index)
            elif index < len(flags):
                flags[index].set()

    def preload(self, name: str) -> list[str]:
        with self.engine.manager.use(name):
            pass
        return self._models()

    def unload(self, name: str) -> bool:
        return self.engine.manager.unload(name)

    def loaded(self) -> list[dict]:
        return self.engine.manager.loaded()


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 (already dead, or the cluster is gone)
        pass


def _answers(address: str, timeout_s: float = 3.0) -> bool:
    """Whether something accepts TCP connections at "host:port" (other address forms are left to Ray)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return True
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _picklable(exc: Exception) -> Exception:
    """The engine's exception as is (its type decides the job's error kind), or its text if it won't pickle."""
    try:
        pickle.loads(pickle.dumps(exc))  # both ways: an error that pickles but won't load would be lost
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


RemoteEngine = ray.remote(max_restarts=0, max_concurrency=8)(EngineActor)


class RayExecutor(Executor):
    kind = "ray"

    def __init__(self, config: StudioConfig, before_run: Callable[[GenerationRequest], None] | None = None):
        self.config = config
        self._before_run = before_run  # in the studio process: e.g. queue the run's files for hashing
        self._workers: dict[str, Worker] = {}
        self._actors: dict[str, Any] = {}  # worker id -> actor handle (placed and answering)
        self._pending: dict[str, tuple[Any, Any]] = {}  # actor id -> (actor, its first info() call) not placed yet
        self._keeper: asyncio.Task | None = None
        self._started_ray = False
        self.unreachable: str | None = None  # why the cluster can't be joined, while it can't
        self.broken: str | None = None  # why the last actor's engine could not be built
        self._retry_at = 0.0  # no new actor before this (monotonic), after a broken one
        self._gpu: dict[str, bool] = {}  # worker id or pending key -> a GPU actor
        self.lost = 0  # actors found dead, since start

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self, changed: Callable[[], None]) -> None:
        """Returns at once: the keeper joins the cluster (retrying while it can't) and places the actors, so the
        studio serves (degraded, jobs waiting) even while the cluster is away."""
        await super().start(changed)
        self._keeper = asyncio.create_task(self._keep(), name="ray-executor-keeper")

    def _connect(self) -> None:
        address = self.config.ray_address
        if address and not _answers(address):  # ray.init would wait minutes on an address nobody listens at
            raise ConnectionError(f"nothing answers at ray_address {address}")
        options: dict[str, Any] = {"log_to_driver": False, "namespace": "diffusion-studio"}
        if address is None:  # "local": a Ray of our own, not whichever one `ray start` or RAY_ADDRESS last named
            options["include_dashboard"] = False
        ray.init(address=address or "local", **options)
        self._started_ray = address is None

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        self._forget_all()
        if self._started_ray:
            await asyncio.to_thread(ray.shutdown)

    def _forget_all(self) -> None:
        for actor in [*self._actors.values(), *(actor for actor, _ in self._pending.values())]:
            _kill(actor)
        self._workers, self._actors, self._pending, self._gpu = {}, {}, {}, {}

    # -- the pool -------------------------------------------------------------------------------------------
    def wanted(self) -> tuple[int, bool]:
        """How many actors to keep, and whether they are GPU actors."""
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if self.config.ray_workers:
            return self.config.ray_workers, gpus > 0
        return (gpus, True) if gpus else (1, False)

    def _place(self, gpu: bool) -> None:
        device = "cuda" if gpu else "cpu"
        actor = RemoteEngine.options(num_gpus=1 if gpu else 0, num_cpus=1).remote(
            self.config.model_dump(mode="json"), device, self.config.torch_threads)
        key = secrets.token_hex(4)
        self._pending[key], self._gpu[key] = (actor, actor.info.remote()), gpu

    async def _keep(self) -> None:
        failed = 0
        while True:
            try:
                await self._keep_once()
                failed = 0
            except Exception as exc:  # noqa: BLE001 (the keeper must outlive a hiccup of the cluster)
                failed += 1
                log.warning("the Ray executor's keeper failed a round", exc_info=True)
                if failed >= FAILED_ROUNDS:  # the head is gone, most likely: leave, and join again next round
                    self.unreachable = f"lost the Ray cluster ({type(exc).__name__})"
                    self._forget_all()
                    self._changed()
                    await asyncio.to_thread(ray.shutdown)
                    failed = 0
            await asyncio.sleep(KEEP_S)

    async def _keep_once(self) -> None:
        if not ray.is_initialized():
            try:
                await asyncio.to_thread(self._connect)
            except Exception as exc:  # noqa: BLE001 (said by health(); tried again next round)
                if self.unreachable is None:
                    log.error("can't join the Ray cluster: %s", exc)
                self.unreachable = str(exc) or type(exc).__name__
                return
            self.unreachable = None
        changed = False
        pinged = list(self._actors.items())  # all at once: one hung actor must not stall the others' checks
        answers = await asyncio.gather(*(asyncio.wait_for(actor.alive.remote(), PING_TIMEOUT_S)
                                         for _, actor in pinged), return_exceptions=True)
        for (worker_id, _), answer in zip(pinged, answers):  # dead ones (killed, node lost) leave the pool
            if isinstance(answer, WORKER_GONE + (asyncio.TimeoutError,)):
                self._drop(worker_id, type(answer).__name__)
                changed = True
        for key, (actor, first) in list(self._pending.items()):  # placed ones join it
            ready, _ = ray.wait([first], timeout=0)
            if not ready:
                continue
            try:
                info = await first
            except WORKER_GONE as exc:
                log.warning("a new engine actor died before it started: %s", exc)
                self._forget_pending(key)
                continue
            except Exception as exc:  # its engine could not be built there: said by health(), tried again later
                self.broken = str(exc).splitlines()[-1][:300] if str(exc) else type(exc).__name__
                log.error("an engine actor could not start: %s", exc)
                self._retry_at = time.monotonic() + BROKEN_RETRY_S
                self._forget_pending(key)
                continue
            self._pending.pop(key)
            self.broken = None
            worker = Worker(id=f"ray-{info['pid']}@{info['node']}", device=info["device"], node=info["node"],
                            models=tuple(info["models"]))
            self._workers[worker.id], self._actors[worker.id] = worker, actor
            self._gpu[worker.id] = self._gpu.pop(key)
            log.info("engine actor %s joined (%s on %s)", worker.id, worker.device, worker.node)
            changed = True
        count, gpu = await asyncio.to_thread(self.wanted)
        changed |= self._retire_cpu_actors(gpu)
        if time.monotonic() >= self._retry_at:
            for _ in range(count - len(self._actors) - len(self._pending)):
                self._place(gpu)
        if changed:
            self._changed()

    def _retire_cpu_actors(self, gpu: bool) -> bool:
        """Once the cluster has GPUs, idle CPU actors (placed while it had none) leave, for GPU ones."""
        if not gpu:
            return False
        retired = False
        for key in [key for key, is_gpu in self._gpu.items() if not is_gpu and key in self._pending]:
            self._forget_pending(key)
        for worker_id in [w for w, is_gpu in self._gpu.items() if not is_gpu and w in self._workers]:
            if not self._workers[worker_id].busy:
                self._workers.pop(worker_id)
                _kill(self._actors.pop(worker_id))
                self._gpu.pop(worker_id, None)
                retired = True
        return retired

    def _forget_pending(self, key: str) -> None:
        actor, _ = self._pending.pop(key)
        self._gpu.pop(key, None)
        _kill(actor)

    def _drop(self, worker_id: str, reason: str) -> None:
        if self._workers.pop(worker_id, None) is None:
            return
        actor = self._actors.pop(worker_id)
        self._gpu.pop(worker_id, None)
        self.lost += 1
        log.error("engine actor %s is gone (%s)", worker_id, reason)
        _kill(actor)

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def health(self) -> list[str]:
        if self.unreachable:
            return [f"workers: can't join the Ray cluster ({self.unreachable}); queued jobs wait"]
        if self._workers:
            return []
        if self.broken:
            return [f"workers: no engine actor could start ({self.broken}); queued jobs wait"]
        waiting = len(self._pending)
        return [f"workers: no engine actor is running on the Ray cluster ({waiting} waiting for a node with room); "
                "queued jobs wait"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pending": len(self._pending), "lost": self.lost}

    # -- work -----------------------------------------------------------------------------------------------
    async def run(self, worker: Worker, items: list[WorkItem]) -> list[GenerationResult]:
        actor = self._actors.get(worker.id)
        if actor is None:
            raise WorkerLost(f"{worker.id} left the cluster", started=False)
        if self._before_run is not None:  # it resolves the run's files: off the event loop
            await asyncio.to_thread(lambda: [self._before_run(item.request) for item in items])
        batch = secrets.token_hex(6)
        watcher = asyncio.create_task(self._forward_cancels(actor, batch, items))
        try:
            async for ref in actor.run.options(num_returns="streaming").remote(batch, [i.request for i in items]):
                kind, *rest = await ref
                if kind == "step":
                    index, event = rest
                    if items[index].on_step is not None:
                        items[index].on_step(event)
                    continue
                outcome, models = rest
                worker.models = tuple(models)
                if kind == "error":
                    raise outcome
                return outcome
            raise WorkerLost(f"{worker.id} ended the batch without a result")
        except WORKER_GONE as exc:
            self._drop(worker.id, type(exc).__name__)
            self._changed()
            raise WorkerLost(f"{worker.id} on {worker.node}: {type(exc).__name__}") from None
        finally:
            watcher.cancel()

    @staticmethod
    async def _forward_cancels(actor, batch: str, items: list[WorkItem]) -> None:
        sent: set[int] = set()
        while len(sent) < len(items):
            for index, item in enumerate(items):
                if index not in sent and item.cancel.is_set():
                    sent.add(index)
                    actor.cancel.remote(batch, index)
            await asyncio.sleep(CANCEL_POLL_S)

    # -- models ---------------------------------------------------------------------------------------------
    def loaded(self) -> list[dict]:
        """Every actor's loaded models, asked of all at once; one that is gone or busy loading (its manager's
        lock held) is left out after a few seconds rather than holding the caller."""
        asked = [(worker_id, actor.loaded.remote()) for worker_id, actor in list(self._actors.items())]
        rows, deadline = [], time.monotonic() + 5
        for worker_id, ref in asked:
            try:
                found = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except WORKER_GONE + (ray.exceptions.GetTimeoutError,):
                continue
            worker = self._workers.get(worker_id)
            rows.extend({**row, "worker": worker_id, "device": worker.device if worker else "?"} for row in found)
        return rows

    def preload(self, name: str) -> None:
        workers = [worker for worker in self.workers() if not worker.busy] or self.workers()
        if not workers:
            raise StudioError(JobError(ErrorKind.worker_lost, "no engine actor is running to load it on; try again "
                                                              "when one has joined"))
        worker = choose_worker(workers, name)
        actor = self._actors.get(worker.id)
        try:
            worker.models = tuple(ray.get(actor.preload.remote(name), timeout=600))
        except WORKER_GONE + (ray.exceptions.GetTimeoutError, AttributeError):
            raise StudioError(JobError(ErrorKind.worker_lost, f"{worker.id} did not load it; try again")) from None

    def unload(self, name: str) -> bool:
        """On every actor holding `name` idle; an actor that is gone or busy loading is passed over."""
        refs = [actor.unload.remote(name) for actor in list(self._actors.values())]
        done = []
        for ref in refs:
            try:
                done.append(ray.get(ref, timeout=10))
            except WORKER_GONE + (ray.exceptions.GetTimeoutError,):
                done.append(False)
        return any(done)

