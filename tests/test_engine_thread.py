"""A local worker runs every batch on one long-lived thread of its own (service/engine_thread.py): not the event
loop's, not the loop's shared pool (which runs saves and checks), the same thread from job to job, with the
process's torch thread count; the service's stop ends it, and a later start gets a new one."""

from __future__ import annotations

import asyncio
import threading

import torch
from test_faults import outcome_of, service_on
from test_jobs import FakeEngine

from diffusion_studio.requests import GenerationRequest


class ThreadRecordingEngine(FakeEngine):
    """The fake engine, noting which thread ran each batch and the torch thread count it saw there."""

    def __init__(self):
        super().__init__(step_s=0.0)
        self.threads: list[threading.Thread] = []
        self.torch_threads: list[int] = []

    def run_batch(self, items):
        self.threads.append(threading.current_thread())
        self.torch_threads.append(torch.get_num_threads())
        return super().run_batch(items)


def test_a_worker_runs_every_batch_on_one_thread_of_its_own(tmp_path):
    engine = ThreadRecordingEngine()
    service = service_on(tmp_path, engine)

    async def scenario():
        await service.start()
        loop_thread = threading.current_thread()
        shared_pool = await asyncio.to_thread(threading.current_thread)  # the pool saves and checks run in
        for index in range(3):
            assert (await outcome_of(service, GenerationRequest(prompt=f"job {index}", steps=2))).ok
        first_run = list(engine.threads)
        await service.stop()
        await service.start()  # a stopped executor's thread is gone: the next job gets a new one
        assert (await outcome_of(service, GenerationRequest(prompt="after a restart", steps=2))).ok
        await service.stop()
        return loop_thread, shared_pool, first_run

    loop_thread, shared_pool, first_run = asyncio.run(scenario())
    assert len(set(first_run)) == 1, "the worker's batches hopped between threads"
    assert first_run[0] not in (loop_thread, shared_pool)
    assert first_run[0].name.startswith("engine-local-0")
    assert engine.threads[-1] is not first_run[0]
    assert set(engine.torch_threads) == {torch.get_num_threads()}
