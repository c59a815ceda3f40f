"""The job service survives its own faults: a full disk (a real one where the test can mount a tmpfs), a read-only
outputs folder, a failing SQLite database and a dying worker each fail the job they hit, cleanly and at once, and
the next job runs. Recovered jobs batch and use the cache like new ones; a cancelled queued job leaves nothing."""

import asyncio
import errno
import os
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from diffusion_studio.requests import GenerationRequest
from diffusion_studio.service.jobs import JobService
from diffusion_studio.service.outcomes import ErrorKind, StudioError
from diffusion_studio.service.store import JobRecord, JobStatus, JobStore
from test_jobs import FakeEngine, job_request, wait_for


def saver(folder: Path):
    def save(result):
        path = folder / f"{uuid.uuid4().hex}.png"
        result.images[0].save(path)
        return [path]
    return save


def service_on(folder: Path, engine, **options) -> JobService:
    store = JobStore(folder / "jobs.db")
    options.setdefault("batch_images", 1)

    def check_storage():  # as Studio.check_storage: an image's worth of bytes, then a database write
        probe = folder / ".probe"
        try:
            probe.write_bytes(b"\0" * 64 * 1024)
        finally:
            probe.unlink(missing_ok=True)
        store.probe()

    return JobService(store, engine.run_batch, saver(folder), check_storage=check_storage, **options)


async def outcome_of(service: JobService, request: GenerationRequest, user: str = "u"):
    async for event in service.follow(request, user):
        if event.final:
            return event.outcome


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs where the test may mount one (root), else None: the test then injects ENOSPC."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the file system `folder` is on; returns the filler file (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_full_disk_mid_job_fails_that_job_and_the_queue_goes_on_when_space_returns(small_disk, tmp_path,
                                                                                   monkeypatch):
    folder = small_disk or tmp_path
    engine = FakeEngine(step_s=0.02)
    real = small_disk is not None

    async def scenario():
        service = service_on(folder, engine)
        await service.start()
        events = asyncio.Queue()
        slow = await service.submit(job_request("slow", steps=30), "u", listener=events)
        await wait_for(lambda: service.get(slow.id).status == JobStatus.running)
        if real:  # a real full disk while the job runs
            filler = fill(folder)
        else:  # no tmpfs here: the writes fail as they would on a full disk
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr("PIL.Image.Image.save", full)
            monkeypatch.setattr(service, "_check_storage", full)
        while (event := await asyncio.wait_for(events.get(), 10)).outcome is None:
            pass
        failed = event.outcome
        health_full = await service.health()
        with pytest.raises(StudioError) as refused:  # a new job while the disk is full: a 503, not a bare 500
            await service.submit(job_request("after"), "u")
        if real:
            filler.unlink()
        else:
            monkeypatch.undo()
        await wait_for(lambda: service.storage_fault is None, timeout=10)
        after = await asyncio.wait_for(outcome_of(service, job_request("after")), 10)
        health_again = await service.health()
        stored = service.store.get(slow.id)
        await service.stop()
        return failed, health_full, refused.value, after, health_again, stored

    failed, health_full, refused, after, health_again, stored = asyncio.run(scenario())
    assert failed.status == "failed" and failed.error.kind == ErrorKind.storage
    assert "ENOSPC" in failed.error.message
    assert health_full["status"] == "degraded" and "storage" in health_full["reasons"][0]
    assert refused.error.kind == ErrorKind.storage and refused.error.http_status == 503
    assert after.ok and health_again == {"status": "ok", "reasons": []}
    assert stored.status == JobStatus.failed and stored.error.kind == ErrorKind.storage  # reached the store


def test_jobs_queued_while_the_disk_is_full_wait_and_then_run(tmp_path, monkeypatch):
    engine = FakeEngine()

    async def scenario():
        service = service_on(tmp_path, engine)
        await service.start()
        queued = [await service.submit(job_request(f"q{i}"), "u") for i in range(3)]
        await wait_for(lambda: all(service.get(j.id).status.finished for j in queued))
        service._storage_failed(OSError(errno.ENOSPC, "No space left on device"))  # as a failed write would
        broken = [True]

        def check():
            if broken[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(service, "_check_storage", check)
        before = len(engine.ran)
        # Jobs already in the queue (here: recovered ones pushed directly) are held, not burnt into failures.
        record = JobRecord(id="held", user="u", request=job_request("held").model_dump(mode="json"))
        service.store.add(record)
        await service._requeue(record)
        await asyncio.sleep(0.3)
        assert len(engine.ran) == before and service.get("held").status == JobStatus.queued
        broken[0] = False
        await wait_for(lambda: service.get("held").status == JobStatus.done)
        await service.stop()

    asyncio.run(scenario())


def test_read_only_outputs_fail_the_job_as_storage_and_the_next_job_runs(tmp_path, monkeypatch):
    engine = FakeEngine()

    async def scenario():
        service = service_on(tmp_path, engine)
        await service.start()
        real_save = service._save

        def read_only(result):
            raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path / "outputs" / "x.png"))
        service._save = read_only
        failed = await asyncio.wait_for(outcome_of(service, job_request("ro")), 10)
        service._save = real_save
        await wait_for(lambda: service.storage_fault is None)
        after = await asyncio.wait_for(outcome_of(service, job_request("after")), 10)
        await service.stop()
        return failed, after

    failed, after = asyncio.run(scenario())
    assert failed.error.kind == ErrorKind.storage and "EROFS" in failed.error.message
    assert str(tmp_path) not in failed.error.message  # no server path in a message
    assert after.ok


def test_sqlite_failure_fails_the_job_at_once_and_its_record_is_written_later(tmp_path, monkeypatch):
    engine = FakeEngine()

    async def scenario():
        service = service_on(tmp_path, engine)
        await service.start()
        store = service.store
        real_add_images, real_update, real_probe = store.add_images, store.update, store.probe

        def disk_full(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(store, "add_images", disk_full)
        monkeypatch.setattr(store, "update", disk_full)
        monkeypatch.setattr(store, "probe", disk_full)
        failed_job = await service.submit(job_request("sqlite"), "u", listener=(events := asyncio.Queue()))
        while (event := await asyncio.wait_for(events.get(), 10)).outcome is None:
            pass  # the outcome arrives while the store still can't write: it does not wait for the store
        unsaved = dict(service._unsaved)
        health = await service.health()
        monkeypatch.setattr(store, "add_images", real_add_images)
        monkeypatch.setattr(store, "update", real_update)
        monkeypatch.setattr(store, "probe", real_probe)
        await wait_for(lambda: service.storage_fault is None and not service._unsaved)
        after = await asyncio.wait_for(outcome_of(service, job_request("after")), 10)
        await service.stop()
        return event.outcome, unsaved, health, store.get(failed_job.id), after

    outcome, unsaved, health, stored, after = asyncio.run(scenario())
    assert outcome.error.kind == ErrorKind.storage
    assert list(unsaved) == [stored.id] and health["status"] == "degraded"
    assert stored.status == JobStatus.failed and stored.error.kind == ErrorKind.storage  # written once it could
    assert after.ok


def test_a_worker_that_dies_is_restarted_and_counted(tmp_path, monkeypatch):
    engine = FakeEngine()

    async def scenario():
        service = service_on(tmp_path, engine)
        await service.start()
        real_begin = service._begin
        calls = []

        def begin_then_die(job):
            calls.append(job.id)
            if len(calls) == 1:
                raise RuntimeError("a bug in the worker itself")
            real_begin(job)
        monkeypatch.setattr(service, "_begin", begin_then_die)
        lost = await asyncio.wait_for(outcome_of(service, job_request("first")), 10)
        after = await asyncio.wait_for(outcome_of(service, job_request("second")), 10)
        health = await service.health()
        await service.stop()
        return lost, after, health, service.metrics.worker_restarts._value.get()

    lost, after, health, restarts = asyncio.run(scenario())
    assert lost.error.kind == ErrorKind.worker_lost
    assert after.ok and health["status"] == "ok" and restarts == 1


def test_recovered_jobs_batch_and_fill_the_cache(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    for name in ("r1", "r2"):
        store.add(JobRecord(id=name, user=name, request=job_request(name).model_dump(mode="json")))
    store.add(JobRecord(id="bad", user="u", request={"prompt": "x", "steps": 0}))  # stored, no longer valid
    engine = FakeEngine()

    async def scenario():
        service = service_on(tmp_path, engine, batch_images=4)
        service._identify = lambda request: "weights"
        await service.start()
        await wait_for(lambda: all(service.get(j).status.finished for j in ("r1", "r2", "bad")))
        repeat = await asyncio.wait_for(outcome_of(service, job_request("r1"), "r1"), 10)  # r1's own entry
        await service.stop()
        return repeat, service.get("bad")

    repeat, bad = asyncio.run(scenario())
    assert engine.batches == [["r1", "r2"]]  # recovered jobs shared one engine call
    assert repeat.ok and repeat.result["cached"] is True  # and filled the cache
    assert bad.status == JobStatus.failed and bad.error.kind == ErrorKind.invalid_request and bad.error.field


def test_cancelling_a_queued_job_leaves_nothing_behind(tmp_path):
    engine = FakeEngine()

    async def scenario():
        service = service_on(tmp_path, engine)
        service._identify = lambda request: "weights"
        await service.pause()
        await service.start()
        job = await service.submit(job_request("never"), "u")
        await service.cancel(job.id, "u")
        leftovers = (service.active_jobs("u"), service.queue_length(), len(service._jobs), len(service.cache))
        await service.stop()
        return leftovers, service.get(job.id)

    leftovers, record = asyncio.run(scenario())
    assert leftovers == (0, 0, 0, 0) and record.status == JobStatus.cancelled


def test_a_corrupt_model_is_a_model_load_outcome_without_server_paths(sd_folder, make_config, tmp_path):
    import shutil

    from diffusion_studio.engine.runner import Engine
    from diffusion_studio.requests import ModelLoadError
    from diffusion_studio.service.outcomes import classify

    broken = tmp_path / "broken-sd"
    shutil.copytree(sd_folder, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file" * 10)
    engine = Engine(make_config())
    with pytest.raises(ModelLoadError) as caught:
        engine.run(GenerationRequest(model=str(broken), prompt="x", steps=1))
    error = classify(caught.value)
    assert error.kind == ErrorKind.model_load and error.field == "model" and error.http_status == 500
    assert str(tmp_path) not in error.message and "broken-sd" in error.message


def test_a1111_routes_report_server_faults_as_5xx_and_recover(server, monkeypatch):
    import httpx

    base, studio = server
    real_save = studio.jobs._save

    def read_only(result):
        raise PermissionError(errno.EROFS, "Read-only file system", "/srv/outputs/x.png")
    monkeypatch.setattr(studio.jobs, "_save", read_only)
    body = {"prompt": "a red circle", "steps": 2, "seed": 3}
    refused = httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=60)
    assert refused.status_code == 503 and refused.json()["kind"] == "storage", refused.text
    assert int(refused.headers["Retry-After"]) > 0 and "/srv" not in refused.text
    monkeypatch.setattr(studio.jobs, "_save", real_save)
    deadline = time.time() + 10
    while httpx.get(f"{base}/health").status_code != 200:
        assert time.time() < deadline, "the studio did not recover"
        time.sleep(0.2)
    assert httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=60).status_code == 200
