"""The executor seam: the job service prefers a free worker holding the request's model, else the least recently
used one; a worker lost mid-batch has its jobs run again once elsewhere (a second loss fails them, counted); with
no worker, jobs wait and health says degraded until one joins. Then the local executor on two CPU "devices": two
workers, two engines with their own model managers, each job's bytes the same whichever ran it."""

from __future__ import annotations

import asyncio

from PIL import Image

from diffusion_studio.config import StudioConfig
from diffusion_studio.requests import GenerationRequest
from diffusion_studio.service.executor import Executor, LocalDevice, LocalExecutor, Worker, WorkerLost, choose_worker
from diffusion_studio.service.outcomes import ErrorKind
from diffusion_studio.studio import Studio
from test_faults import outcome_of, service_on
from test_jobs import FakeEngine


class ScriptedExecutor(Executor):
    """Workers run the fake engine in threads; `lose` names workers that die (WorkerLost) on their next batch."""

    kind = "scripted"

    def __init__(self, engine: FakeEngine, ids: list[str]):
        self.engine = engine
        self.pool = [Worker(id=name, device="cpu") for name in ids]
        self.lose: list[str] = []
        self.ran_on: list[str] = []

    def workers(self):
        return list(self.pool)

    async def run(self, worker, items):
        self.ran_on.append(worker.id)
        if worker.id in self.lose:
            self.lose.remove(worker.id)
            await asyncio.sleep(0.05)  # mid-batch
            raise WorkerLost(f"{worker.id} was killed")
        results = await asyncio.to_thread(self.engine.run_batch, items)
        worker.models = tuple({item.request.model for item in items})
        return results

    def join(self, name: str) -> None:
        self.pool.append(Worker(id=name, device="cpu"))
        self._changed()

    def loaded(self):
        return []

    def preload(self, name):
        pass

    def unload(self, name):
        return False


def request(prompt: str, model: str = "builtin:shapes") -> GenerationRequest:
    return GenerationRequest(prompt=prompt, steps=2, seed=1, model=model)


def test_choose_worker_prefers_the_model_then_the_longest_idle():
    a, b, c = (Worker(id=name, device="cpu", last_used=used) for name, used in (("a", 3), ("b", 1), ("c", 2)))
    c.models = ("m",)
    assert choose_worker([a, b, c], "m") is c  # holds it: no load
    assert choose_worker([a, b, c], "other") is b  # nobody holds it: the one idle longest
    assert choose_worker([a, b], "m") is b


def test_a_lost_worker_has_its_job_rerun_once_on_another(tmp_path):
    engine = FakeEngine()

    async def scenario():
        executor = ScriptedExecutor(engine, ["w1", "w2"])
        service = service_on(tmp_path, engine, executor=executor)
        await service.start()
        executor.pool[1].last_used = 1.0  # w1 is chosen first (idle longest)
        executor.lose = ["w1"]
        events = []
        async for event in service.follow(request("rerun me"), "u"):
            events.append(event)
        executor.lose = ["w1", "w2"]  # both die under the next job: it had its second chance
        executor.pool[0].last_used, executor.pool[1].last_used = 0.0, 1.0
        twice = await asyncio.wait_for(outcome_of(service, request("unlucky")), 10)
        after = await asyncio.wait_for(outcome_of(service, request("after")), 10)
        deaths = service.metrics.worker_deaths._value.get()
        await service.stop()
        return events, twice, after, deaths, executor.ran_on

    events, twice, after, deaths, ran_on = asyncio.run(scenario())
    assert events[-1].outcome.ok and events[-1].outcome.result["worker"] == "w2"
    requeued = [event for event in events if event.kind == "queued" and event.data.get("rerun")]
    assert len(requeued) == 1 and "w1" in requeued[0].data["reason"]
    assert twice.error.kind == ErrorKind.worker_lost and "2 times" in twice.error.text()
    assert after.ok and deaths == 3 and ran_on[:2] == ["w1", "w2"]


def test_jobs_go_to_the_worker_that_holds_their_model(tmp_path):
    engine = FakeEngine()

    async def scenario():
        executor = ScriptedExecutor(engine, ["w1", "w2"])
        executor.pool[0].models, executor.pool[1].models = ("builtin:shapes",), ("other",)
        executor.pool[0].last_used, executor.pool[1].last_used = 5.0, 0.0  # w2 would win on idleness alone
        service = service_on(tmp_path, engine, executor=executor)
        await service.start()
        first = await asyncio.wait_for(outcome_of(service, request("mine")), 10)
        second = await asyncio.wait_for(outcome_of(service, request("theirs", "other")), 10)
        await service.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert first.result["worker"] == "w1" and second.result["worker"] == "w2"


def test_with_no_worker_jobs_wait_degraded_until_one_joins(tmp_path):
    engine = FakeEngine()

    async def scenario():
        executor = ScriptedExecutor(engine, [])
        service = service_on(tmp_path, engine, executor=executor)
        await service.start()
        job = await service.submit(request("patient"), "u", listener=(events := asyncio.Queue()))
        await asyncio.sleep(0.3)
        waiting, health = service.get(job.id).status.value, await service.health()
        executor.join("late")
        while (event := await asyncio.wait_for(events.get(), 10)).outcome is None:
            pass
        healthy = await service.health()
        await service.stop()
        return waiting, health, event.outcome, healthy

    waiting, health, outcome, healthy = asyncio.run(scenario())
    assert waiting == "queued" and health["status"] == "degraded" and "none available" in health["reasons"][0]
    assert outcome.ok and outcome.result["worker"] == "late" and healthy["status"] == "ok"


def test_local_executor_on_two_cpu_devices(data_dir, tmp_path):
    config = StudioConfig(data_dir=data_dir, models_dir=tmp_path / "models", devices=["cpu", "cpu"], batch_images=1,
                          cache_entries=0)
    studio = Studio(config)
    executor = studio.jobs.executor
    assert isinstance(executor, LocalExecutor) and [d.device for d in executor.devices] == ["cpu", "cpu"]
    assert len(studio.engines) == 2 and len(executor.workers()) == 2

    async def scenario():
        await studio.jobs.start()
        requests = [studio.validate({"prompt": "two devices", "steps": 2, "seed": seed}) for seed in (1, 2, 1, 2)]
        outcomes = await studio.jobs.outcomes(requests, "u")
        status = studio.jobs.status()
        await studio.jobs.stop()
        return outcomes, status

    outcomes, status = asyncio.run(scenario())
    assert all(outcome.ok for outcome in outcomes)
    assert {outcome.result["worker"] for outcome in outcomes} == {"local-0", "local-1"}
    managers = [engine.manager for engine in studio.engines]  # each device loaded the model into its own
    assert managers[0] is not managers[1] and all(manager.load_count == 1 for manager in managers)
    assert [worker["models"] for worker in status["worker_list"]] == [["builtin:shapes"]] * 2
    loaded = studio.loaded_models()
    assert [(row["worker"], row["device"]) for row in loaded] == [("local-0", "cpu"), ("local-1", "cpu")]
    pixels = [Image.open(studio.image_paths(outcome.result["image_ids"])[0]).tobytes() for outcome in outcomes]
    assert pixels[0] == pixels[2] and pixels[1] == pixels[3] and pixels[0] != pixels[1]  # the seed decides


def test_local_device_rows_name_their_device():
    device = LocalDevice("cuda:1", lambda items: [], loaded=lambda: [{"name": "m", "in_use": False}])
    executor = LocalExecutor([LocalDevice("cuda:0", lambda items: []), device])
    assert executor.loaded() == [{"name": "m", "in_use": False, "worker": "local-1", "device": "cuda:1"}]
    assert [worker.device for worker in executor.workers()] == ["cuda:0", "cuda:1"]


def test_engine_errors_cross_a_process_boundary_as_themselves():
    import pickle

    from diffusion_studio.requests import RequestError
    from diffusion_studio.service.outcomes import JobError, StudioError
    from diffusion_studio.service.ray_executor import _picklable

    for error in (RequestError("lora", "no LoRA named 'x'"), StudioError(JobError(ErrorKind.storage, "disk full"))):
        back = pickle.loads(pickle.dumps(_picklable(error)))
        assert type(back) is type(error) and str(back) == str(error)
    assert _picklable(TypeErrorThatWontLoad("a", 1)).args == ("TypeErrorThatWontLoad: a",)


class TypeErrorThatWontLoad(Exception):
    def __init__(self, text, extra):  # pickles as (text,): can't be built back
        super().__init__(text)


def test_the_engine_actor_keeps_a_cancel_that_arrives_before_its_batch(data_dir, tmp_path):
    from diffusion_studio.service.ray_executor import EngineActor

    config = StudioConfig(data_dir=data_dir, models_dir=tmp_path / "models").model_dump(mode="json")
    actor = EngineActor(config, "cpu", None)
    actor.cancel("early", 0)  # the actor runs calls at once: this one may come first
    events = list(actor.run("early", [GenerationRequest(prompt="never mind", steps=30, seed=1)]))
    kind, [result], models = events[-1]
    assert kind == "done" and result.cancelled and len(events) <= 2  # stopped at its first step
    broken = EngineActor({**config, "no_such_setting": 1}, "cpu", None)
    try:
        broken.info()
    except RuntimeError as exc:  # a plain error the keeper reports, not a dead actor it would respawn each second
        assert "no_such_setting" in str(exc)
    else:
        raise AssertionError("a broken engine must say so")
