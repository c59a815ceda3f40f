"""The job service with a stand-in engine (the real engine has its own tests): fairness, priorities, states,
cancel, pause/resume, the queue bound, per-job events and restart recovery."""

import asyncio
import threading
import time

import pytest
from PIL import Image

from diffusion_studio.requests import GenerationRequest, GenerationResult, StepEvent, Timings
from diffusion_studio.service.jobs import FairQueue, Job, JobNotFound, JobService, QueueFull
from diffusion_studio.service.outcomes import ErrorKind
from diffusion_studio.service.store import JobRecord, JobStatus, JobStore


class FakeEngine:
    """Runs `steps` steps of `step_s` each, honouring cancel; records the order prompts ran in."""

    def __init__(self, step_s: float = 0.01):
        self.step_s = step_s
        self.ran: list[str] = []
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def run_batch(self, items):
        requests, on_steps, cancels = ([getattr(item, name) for item in items] for name in
                                       ("request", "on_step", "cancel"))
        self.batches.append([request.prompt for request in requests])
        if len(requests) > 1 and any(request.prompt == "explode" for request in requests):
            raise RuntimeError("one bad request spoils the batch")
        results = [self.run(*args) for args in zip(requests, on_steps, cancels)]
        for result in results:
            result.batched_with = len(requests)
        return results

    def run(self, request, on_step=None, cancel=None):
        self.gate.wait(10)
        self.ran.append(request.prompt)
        done = 0
        for done in range(1, request.steps + 1):
            time.sleep(self.step_s)
            if on_step:
                on_step(StepEvent(done, request.steps, 0.0, 0.0))
            if cancel is not None and cancel.is_set():
                break
        if request.prompt == "explode":
            raise RuntimeError("out of memory")
        if request.prompt == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return GenerationResult(request=request, images=[Image.new("RGB", (8, 8))], seeds=[request.seed or 1],
                                model_id="fake", timings=Timings(total_s=0.1), peak_memory_bytes=1, device="cpu",
                                cancelled=cancel is not None and cancel.is_set())


def make_service(tmp_path, engine, **options):
    def save(result):
        path = tmp_path / f"{time.time_ns()}.png"
        result.images[0].save(path)
        return [path]

    options.setdefault("batch_images", 1)  # these tests watch the queue order; batching has its own test
    return JobService(JobStore(tmp_path / "jobs.db"), engine.run_batch, save, **options)


def job_request(prompt, steps=2):
    return GenerationRequest(prompt=prompt, steps=steps, seed=1)


async def wait_for(predicate, timeout=10):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_fair_queue_round_robin_and_priority():
    queue = FairQueue()
    for user, name, priority in [("a", "a1", 0), ("a", "a2", 0), ("a", "a3", 0), ("b", "b1", 0), ("c", "c1", 0),
                                 ("b", "b2", 5)]:
        queue.push(Job(JobRecord(id=name, user=user, request={}, priority=priority), GenerationRequest(), None, None))
    assert [job.id for job in queue.order()] == ["a1", "b1", "b2", "c1", "a2", "a3"]  # b2 heads its lane after b1 and outranks all
    assert queue.remove("c1").id == "c1" and len(queue) == 5


def test_jobs_run_fairly_and_record_results(tmp_path):
    engine = FakeEngine()

    async def scenario():
        service = make_service(tmp_path, engine)
        engine.gate.clear()  # hold the first job so the rest queue up
        await service.start()
        jobs = [await service.submit(job_request(p), user) for user, p in
                [("alice", "a1"), ("alice", "a2"), ("alice", "a3"), ("bob", "b1"), ("bob", "b2")]]
        await wait_for(lambda: engine.ran == ["a1"] or service.store.get(jobs[0].id).status == JobStatus.running)
        assert service.position(jobs[3].id) == 1  # bob's first job is next, ahead of alice's backlog
        engine.gate.set()
        await wait_for(lambda: all(service.store.get(j.id).status == JobStatus.done for j in jobs))
        await service.stop()
        return service, jobs

    service, jobs = asyncio.run(scenario())
    assert engine.ran == ["a1", "b1", "a2", "b2", "a3"]
    record = service.store.get(jobs[0].id)
    assert record.started_at >= record.created_at and record.finished_at >= record.started_at
    assert record.result["seeds"] == [1] and len(record.result["image_ids"]) == 1
    assert service.store.image(record.result["image_ids"][0])["job_id"] == record.id


def test_cancel_queued_and_running_and_failures_as_data(tmp_path):
    engine = FakeEngine(step_s=0.02)

    async def scenario():
        service = make_service(tmp_path, engine)
        await service.start()
        running = await service.submit(job_request("long", steps=150), "u")
        queued = await service.submit(job_request("waiting"), "u")
        await wait_for(lambda: service.store.get(running.id).status == JobStatus.running)
        await service.cancel(queued.id, "u")
        await service.cancel(running.id, "u")
        broken = await service.submit(job_request("explode"), "u")
        oom = await service.submit(job_request("oom"), "u")
        after = await service.submit(job_request("after"), "u")
        await wait_for(lambda: service.store.get(after.id).status == JobStatus.done)
        with pytest.raises(JobNotFound):
            service.get(running.id, user="someone else")
        await service.stop()
        return [service.store.get(j.id) for j in (running, queued, broken, oom)]

    running, queued, broken, oom = asyncio.run(scenario())
    assert oom.status == JobStatus.failed and oom.error.kind == ErrorKind.out_of_memory
    assert "vae_tiling" in oom.error.message
    assert queued.status == JobStatus.cancelled and queued.started_at is None
    assert queued.error.kind == ErrorKind.cancelled and "before it started" in queued.error.message
    assert running.status == JobStatus.cancelled and "while running" in running.error.message
    # A fault of ours: kind internal, a message with no exception text or repr (the log has the details).
    assert broken.status == JobStatus.failed and broken.error.kind == ErrorKind.internal
    assert "RuntimeError" in broken.error.message and "out of memory" not in broken.error.message
    assert "waiting" not in engine.ran


def test_queue_bound_pause_resume_and_events(tmp_path):
    engine = FakeEngine()

    async def scenario():
        service = make_service(tmp_path, engine, max_queue=2)
        await service.start()
        await service.pause()
        first = await service.submit(job_request("one", steps=3), "u")
        events = service.subscribe(first.id)
        await service.submit(job_request("two"), "u")
        with pytest.raises(QueueFull, match=r"queue is full \(2 jobs waiting\)"):
            await service.submit(job_request("three"), "u")
        await asyncio.sleep(0.1)
        assert engine.ran == [] and service.queue_length() == 2  # paused: nothing starts
        await service.resume()
        kinds = []
        while not kinds or kinds[-1] != "done":
            kinds.append((await asyncio.wait_for(events.get(), 10)).kind)
        await service.stop()
        return kinds

    kinds = asyncio.run(scenario())
    assert kinds == ["running", "step", "step", "step", "done"]


def test_restart_recovers_queued_and_marks_running_interrupted(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    running = JobRecord(id="r", user="u", request=job_request("was running").model_dump(mode="json"),
                        status=JobStatus.running)
    queued = JobRecord(id="q", user="u", request=job_request("was queued").model_dump(mode="json"))
    store.add(running)
    store.add(queued)
    engine = FakeEngine()

    async def scenario():
        service = make_service(tmp_path, engine)  # a new process: same database file
        await service.start()
        await wait_for(lambda: service.store.get("q").status == JobStatus.done)
        await service.stop()
        return service.store.get("r")

    interrupted = asyncio.run(scenario())
    assert interrupted.status == JobStatus.interrupted and interrupted.error.kind == ErrorKind.interrupted
    assert engine.ran == ["was queued"]


def test_history_search_and_delete(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    for index, (user, prompt, mode) in enumerate([("a", "a red circle", "txt2img"), ("a", "a blue star", "img2img"),
                                                  ("b", "a red star", "txt2img")]):
        store.add(JobRecord(id=str(index), user=user, request={"prompt": prompt, "mode": mode, "model": "m"},
                            created_at=100.0 + index))
    assert [j.id for j in store.find(user="a")] == ["1", "0"]
    assert [j.id for j in store.find(prompt="RED")] == ["2", "0"]
    assert [j.id for j in store.find(user="a", mode="img2img")] == ["1"]
    assert [j.id for j in store.find(since=101.0, until=102.0)] == ["1"]
    assert [j.id for j in store.find(prompt="100%_")] == []  # LIKE wildcards are literal
    image = tmp_path / "x.png"
    image.write_bytes(b"png")
    [image_id] = store.add_images(store.get("0"), [image], [5])
    token = store.share(image_id)
    assert len(token) >= 32 and store.shared_image(token)["id"] == image_id
    assert store.delete("0") == [image] and store.get("0") is None and store.image(image_id) is None


def test_the_cache_is_each_users_own_by_default(tmp_path):
    engine = FakeEngine()

    async def scenario():
        service = make_service(tmp_path, engine)
        service._identify = lambda request: "weights"
        await service.start()
        outcomes = []
        for user in ("alice", "bob", "alice"):
            job = await service.submit(job_request("private"), user)
            await wait_for(lambda: service.store.get(job.id).status == JobStatus.done)
            outcomes.append(service.store.get(job.id).result)
        await service.stop()
        return outcomes

    alice, bob, alice_again = asyncio.run(scenario())
    assert "cached" not in bob and engine.ran == ["private", "private"]  # bob learns nothing of alice's run
    assert alice_again["cached"] is True


def test_explicit_seed_repeats_come_from_the_cache(tmp_path):
    engine = FakeEngine()

    async def scenario():
        service = make_service(tmp_path, engine, cache_scope="global")  # shared on purpose: any user's repeat
        service._identify = lambda request: "weights-v1"
        await service.start()
        first = await service.submit(job_request("same"), "u")
        await wait_for(lambda: service.store.get(first.id).status == JobStatus.done)
        repeat = await service.submit(job_request("same"), "other user")
        random_seed = await service.submit(GenerationRequest(prompt="same", steps=2), "u")
        await wait_for(lambda: service.store.get(random_seed.id).status == JobStatus.done)
        service._identify = lambda request: "weights-v2"  # new weights under the same name: no stale hit
        fresh = await service.submit(job_request("same"), "u")
        await wait_for(lambda: service.store.get(fresh.id).status == JobStatus.done)
        await service.stop()
        return [service.store.get(j.id) for j in (first, repeat, random_seed, fresh)], service

    (first, repeat, random_seed, fresh), service = asyncio.run(scenario())
    assert engine.ran == ["same", "same", "same"]  # the repeat never reached the engine
    assert repeat.status == JobStatus.done and repeat.result["cached"] is True
    assert repeat.result["seeds"] == first.result["seeds"] and "cached" not in first.result
    first_path = service.store.image(first.result["image_ids"][0])["path"]
    repeat_path = service.store.image(repeat.result["image_ids"][0])["path"]
    assert repeat_path != first_path and open(repeat_path, "rb").read() == open(first_path, "rb").read()
    assert "cached" not in random_seed.result and "cached" not in fresh.result
    assert service.metrics.cache_hits._value.get() == 1


def test_rate_and_active_job_limits_say_when_to_retry(tmp_path):
    from diffusion_studio.service.limits import LimitExceeded, UserLimits

    limits = UserLimits(rate_per_minute=60, burst=2, max_active_jobs=10)
    limits.admit("u", 0)
    limits.admit("u", 0)
    with pytest.raises(LimitExceeded, match="rate limit: 60 requests per minute; retry in 1 s") as caught:
        limits.admit("u", 0)
    assert caught.value.retry_after_s == 1
    limits.admit("someone else", 0)  # buckets are per user
    with pytest.raises(LimitExceeded, match="you have 3 unfinished jobs \\(the limit is 3\\)"):
        UserLimits(60, 5, max_active_jobs=3).admit("u", 3)

    engine = FakeEngine()

    async def scenario():
        service = make_service(tmp_path, engine, limits=UserLimits(6000, 100, max_active_jobs=2))
        await service.pause()
        await service.start()
        await service.submit(job_request("a"), "u")
        await service.submit(job_request("b"), "u")
        with pytest.raises(LimitExceeded, match="2 unfinished jobs"):
            await service.submit(job_request("c"), "u")
        await service.submit(job_request("d"), "v")
        await service.stop()

    asyncio.run(scenario())


def test_wall_time_limit_fails_the_job_and_the_next_runs(tmp_path):
    engine = FakeEngine(step_s=0.05)

    async def scenario():
        service = make_service(tmp_path, engine, time_limit_s=0.3)
        await service.start()
        slow = await service.submit(job_request("slow", steps=150), "u")
        quick = await service.submit(job_request("quick", steps=2), "u")
        await wait_for(lambda: service.store.get(quick.id).status == JobStatus.done)
        await service.stop()
        return service.store.get(slow.id)

    slow = asyncio.run(scenario())
    assert slow.status == JobStatus.failed and slow.error.kind == ErrorKind.time_limit
    assert slow.error.message.startswith("stopped after the 0.3 s limit")
    assert slow.finished_at - slow.started_at < 2


def test_compatible_jobs_from_different_users_share_one_engine_call(tmp_path):
    engine = FakeEngine()

    async def scenario():
        service = make_service(tmp_path, engine, batch_images=3, cache_entries=0)
        await service.pause()  # everything queues first, so the worker sees the whole queue at once
        await service.start()
        submitted = [("alice", "a1", 2), ("bob", "b1", 2), ("carol", "c1", 3), ("bob", "b2", 2),
                     ("dave", "explode", 2), ("erin", "e1", 2)]
        jobs = [await service.submit(job_request(p, steps), user) for user, p, steps in submitted]
        await service.resume()
        await wait_for(lambda: all(service.store.get(j.id).status.finished for j in jobs))
        await service.stop()
        return service, jobs

    service, jobs = asyncio.run(scenario())
    # Fair order: a1 b1 c1 explode e1 b2. a1 takes the next compatible jobs along (3 images at most), skipping c1
    # (other steps); that batch fails in the engine, so its jobs run again alone and only explode fails.
    assert engine.batches == [["a1", "b1", "explode"], ["a1"], ["b1"], ["explode"], ["c1"], ["e1", "b2"]]
    records = [service.store.get(job.id) for job in jobs]
    assert [r.status for r in records] == [JobStatus.done] * 4 + [JobStatus.failed, JobStatus.done]
    # Recorded as the engine reported each call: a1 and b1 re-ran alone, e1 and b2 shared theirs.
    assert [r.result.get("batched_with") for r in records] == [1, 1, 1, 2, None, 2]
