"""Retention (issue 16, item 7): finished jobs pruned by age and by count (overall, per user) with their image files,
never a queued or running job; the order of files and rows across a crash; the result cache forgetting pruned jobs;
the start-up warning for a nearly full disk; the outputs and database sizes in /metrics."""

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from diffusion_studio.requests import GenerationRequest
from diffusion_studio.service import retention as retention_module
from diffusion_studio.service.cache import ResultCache
from diffusion_studio.service.metrics import StorageUsage, StudioMetrics
from diffusion_studio.service.retention import GIB, Retention
from diffusion_studio.service.store import JobRecord, JobStatus, JobStore

from servers import serving
from test_jobs import FakeEngine, make_service, wait_for

NOW = 1_800_000_000.0
DAY = 86400.0
IMAGE_BYTES = 1000
FINISHED = [JobStatus.done, JobStatus.failed, JobStatus.cancelled, JobStatus.interrupted]
USERS = ("alice", "bob")


class History:
    """A store with `per_user` finished jobs of alice and bob, job `<user>-<n>` made n days ago (bob's an hour
    earlier than alice's), every status in turn, done jobs with two image files and the others with one or none;
    plus a queued and a running job 100 days old."""

    def __init__(self, tmp_path: Path, per_user: int = 10):
        self.store = JobStore(tmp_path / "studio.db")
        self.outputs = tmp_path / "outputs"
        (self.outputs / "day").mkdir(parents=True)
        self.files: dict[str, list[Path]] = {}
        self.image_ids: dict[str, list[str]] = {}
        for user_index, user in enumerate(USERS):
            for age in range(per_user):
                status = FINISHED[age % len(FINISHED)]
                images = {JobStatus.done: 2, JobStatus.failed: 0}.get(status, 1)
                self.add(f"{user}-{age}", user, status, NOW - age * DAY - user_index * 3600, images)
        self.add("alice-queued", "alice", JobStatus.queued, NOW - 100 * DAY, 0)
        self.add("bob-running", "bob", JobStatus.running, NOW - 100 * DAY, 0)

    def add(self, job_id: str, user: str, status: JobStatus, created_at: float, images: int) -> JobRecord:
        record = JobRecord(id=job_id, user=user, request={"prompt": job_id, "mode": "txt2img", "model": "m"},
                           status=status, created_at=created_at,
                           finished_at=created_at + 5 if status.finished else None)
        self.store.add(record)
        paths = [self.outputs / "day" / f"{job_id}-{index}.png" for index in range(images)]
        for path in paths:
            path.write_bytes(b"x" * IMAGE_BYTES)
        self.image_ids[job_id] = self.store.add_images(record, paths, [1] * len(paths))
        self.files[job_id] = paths
        return record

    def retention(self, **rules) -> Retention:
        return Retention(self.store, self.outputs, clock=lambda: NOW, **rules)

    def job_ids(self) -> set[str]:
        return {job.id for job in self.store.find(limit=10_000)}

    def files_on_disk(self) -> set[Path]:
        return set((self.outputs / "day").iterdir())

    def assert_consistent(self) -> None:
        """Every remaining job has all its files and every file on disk belongs to a remaining job."""
        remaining = self.job_ids()
        assert self.files_on_disk() == {path for job_id in remaining for path in self.files[job_id]}


def finished(user: str, ages) -> set[str]:
    return {f"{user}-{age}" for age in ages}


UNFINISHED = {"alice-queued", "bob-running"}


@pytest.mark.parametrize("rules, kept", [
    ({"days": 5.5}, finished("alice", range(6)) | finished("bob", range(6))),  # bob-5 is 5 d 1 h old: kept
    ({"max_jobs": 5}, finished("alice", range(3)) | finished("bob", range(2))),  # newest five of either user
    ({"max_jobs_per_user": 3}, finished("alice", range(3)) | finished("bob", range(3))),
    ({"days": 5.5, "max_jobs_per_user": 4, "max_jobs": 5}, finished("alice", range(3)) | finished("bob", range(2))),
    ({"days": 1.5, "max_jobs_per_user": 4}, finished("alice", range(2)) | finished("bob", range(2))),
])
def test_each_rule_alone_and_combined_prunes_finished_jobs_with_their_files(tmp_path, rules, kept):
    history = History(tmp_path)
    before = history.job_ids()
    counts = history.retention(**rules).prune_once()
    assert history.job_ids() == kept | UNFINISHED  # queued and running jobs stay, however old
    gone = before - kept - UNFINISHED
    assert counts.jobs == len(gone) and counts.kept == 0
    assert counts.images == sum(len(history.files[job_id]) for job_id in gone) > 0
    assert counts.bytes_freed == counts.images * IMAGE_BYTES
    history.assert_consistent()
    for job_id in gone:
        assert history.store.get(job_id) is None
        assert all(history.store.image_owner(path) is None for path in history.files[job_id])


def test_nothing_is_pruned_while_retention_is_off_or_within_its_bounds(tmp_path):
    history = History(tmp_path)
    before, files = history.job_ids(), history.files_on_disk()
    assert not history.retention().enabled and history.retention().prune_once().jobs == 0
    assert history.retention(days=30, max_jobs=20, max_jobs_per_user=10).prune_once().jobs == 0
    assert history.job_ids() == before and history.files_on_disk() == files


def test_a_pass_logs_one_line_when_it_pruned_and_none_when_not(tmp_path, caplog):
    history = History(tmp_path)
    retention = history.retention(max_jobs_per_user=2)
    with caplog.at_level(logging.INFO, logger="diffusion_studio.service.retention"):
        counts = retention.prune_once()
        again = retention.prune_once()
    lines = [record.getMessage() for record in caplog.records]
    assert counts.jobs == 16 and again.jobs == 0 and len(lines) == 1
    assert "pruned 16 finished jobs" in lines[0] and "retention_max_jobs_per_user=2" in lines[0]


def test_share_tokens_go_with_their_images(tmp_path):
    history = History(tmp_path)
    tokens = {job_id: history.store.share(history.image_ids[job_id][0]) for job_id in ("alice-8", "alice-0")}
    history.retention(days=3).prune_once()
    assert history.store.shared_image(tokens["alice-8"]) is None  # its row went with the job (ON DELETE CASCADE)
    assert history.store.shared_image(tokens["alice-0"])["path"] == str(history.files["alice-0"][0])


def refuse_to_delete(monkeypatch, stuck: Path):
    """Deleting `stuck` fails as on a file we may not delete (the tests run as root, so chmod would not do);
    returns the real Path.unlink."""
    real_unlink = Path.unlink

    def unlink(path, *args, **kwargs):
        if path == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    return real_unlink


def test_a_file_that_cannot_be_deleted_keeps_its_job_and_is_logged(tmp_path, monkeypatch, caplog):
    history = History(tmp_path)
    stuck = history.files["alice-8"][0]
    real_unlink = refuse_to_delete(monkeypatch, stuck)
    with caplog.at_level(logging.WARNING, logger="diffusion_studio.service.retention"):
        counts = history.retention(days=5.5).prune_once()
    assert counts.kept == 1 and counts.jobs == 7  # the other seven old jobs went
    assert "alice-8" in history.job_ids() and stuck.exists()  # the row still names the file that is still there
    assert any("could not delete" in r.getMessage() and "alice-8" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(Path, "unlink", real_unlink)  # the next pass tries again
    assert history.retention(days=5.5).prune_once().jobs == 1
    assert "alice-8" not in history.job_ids()
    history.assert_consistent()


def test_a_crash_between_files_and_rows_is_finished_by_the_next_pass(tmp_path, monkeypatch):
    history = History(tmp_path)

    def crash(job_ids):
        raise KeyboardInterrupt("the studio was killed here")

    monkeypatch.setattr(history.store, "delete_many", crash)
    with pytest.raises(KeyboardInterrupt):
        history.retention(max_jobs_per_user=8).prune_once()
    assert len(history.job_ids()) == 22  # files first: the rows are all still there ...
    assert not history.files["alice-8"][0].exists()  # ... some naming files that are gone (served as missing)

    monkeypatch.undo()
    counts = history.retention(max_jobs_per_user=8).prune_once()
    assert counts.jobs == 4 and counts.images == 0  # the files had gone already
    history.assert_consistent()  # no row left pointing at a missing file, no file without a row


def test_a_cached_jobs_hard_linked_copy_survives_its_source(tmp_path):
    history = History(tmp_path)
    source = history.files["alice-8"][0]
    copy = source.with_name("alice-8-0-copy.png")
    os.link(source, copy)
    history.add("alice-new", "alice", JobStatus.done, NOW, 0)
    history.store.add_images(history.store.get("alice-new"), [copy], [1])
    history.files["alice-new"] = [copy]
    counts = history.retention(days=7.5).prune_once()  # alice-8, bob-8 (done: 2 images each), alice-9, bob-9
    assert counts.images == 4 and counts.bytes_freed == 3 * IMAGE_BYTES  # the linked file's bytes are still used
    assert copy.read_bytes() == b"x" * IMAGE_BYTES
    history.assert_consistent()


def test_a_row_naming_a_file_outside_the_outputs_folder_never_deletes_it(tmp_path, caplog):
    history = History(tmp_path)
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("not an output")
    record = history.add("alice-odd", "alice", JobStatus.done, NOW - 50 * DAY, 0)
    history.store.add_images(record, [elsewhere], [1])
    with caplog.at_level(logging.WARNING, logger="diffusion_studio.service.retention"):
        history.retention(days=40).prune_once()
    assert elsewhere.read_text() == "not an output" and "alice-odd" not in history.job_ids()
    assert any("outside the outputs folder" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("pass_jobs, queries", [(10_000, 1), (1000, 3)])
def test_pruning_finds_jobs_in_one_query_and_deletes_them_in_batches(tmp_path, monkeypatch, pass_jobs, queries):
    monkeypatch.setattr(retention_module, "PASS_JOBS", pass_jobs)
    history = History(tmp_path, per_user=0)
    for index in range(3000):
        history.store.add(JobRecord(id=f"j{index}", user="alice" if index % 2 else "bob", request={"prompt": "p"},
                                    status=JobStatus.done, created_at=NOW - index))
    reads, writes = [], []
    history.store._reader = Recording(history.store._reader, reads)
    history.store._db = Recording(history.store._db, writes)
    counts = history.retention(max_jobs=100, max_jobs_per_user=1000, days=1).prune_once()
    assert counts.jobs == 2900 and len(history.job_ids()) == 100 + len(UNFINISHED)
    assert [sql.split()[0] for sql in reads] == ["WITH"] * queries  # all three rules in each query
    assert [sql.split()[0] for sql in writes if not sql.startswith("SELECT")] == ["DELETE"] * 6  # 500 a batch


class Recording:
    """A connection that records each statement it is given (sqlite3's trace callback repeats a statement for each
    cascaded row, so it can't count them)."""

    def __init__(self, db, statements: list[str]):
        self._db, self._statements = db, statements

    def execute(self, sql, *args):
        self._statements.append(sql)
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def test_the_cache_forgets_pruned_jobs(tmp_path):
    history = History(tmp_path)
    cache = ResultCache()
    for job_id in ("alice-0", "alice-9", "bob-9"):
        cache.put(f"key-{job_id}", job_id)
    retention = Retention(history.store, history.outputs, max_jobs_per_user=5, cache=cache, clock=lambda: NOW)
    retention.prune_once()
    assert cache.get("key-alice-0") == "alice-0" and len(cache) == 1
    assert cache.get("key-alice-9") is None and cache.get("key-bob-9") is None


def test_a_job_deleted_by_hand_goes_in_the_same_order_with_its_cache_entry(tmp_path, monkeypatch):
    history = History(tmp_path)
    cache = ResultCache()
    cache.put("key", "alice-0")
    retention = Retention(history.store, history.outputs, cache=cache)  # retention off: deleting by hand still works
    counts = retention.delete_jobs(["alice-0", "no-such-job"])
    assert (counts.jobs, counts.images, counts.kept) == (1, 2, 0) and len(cache) == 0
    assert "alice-0" not in history.job_ids()
    history.assert_consistent()

    stuck = history.files["bob-0"][0]
    refuse_to_delete(monkeypatch, stuck)
    assert retention.delete_jobs(["bob-0"]).kept == 1 and "bob-0" in history.job_ids() and stuck.exists()


def test_through_the_job_service_a_pruned_result_is_never_served_from_the_cache(tmp_path):
    engine = FakeEngine()

    async def scenario():
        service = make_service(tmp_path, engine, cache_scope="global")
        service._identify = lambda request: "weights"
        outputs = tmp_path  # make_service saves its images into tmp_path
        retention = Retention(service.store, outputs, max_jobs=2, cache=service.cache)
        await service.start()
        ids = []
        for prompt in ("first", "second", "third"):
            job = await service.submit(GenerationRequest(prompt=prompt, steps=2, seed=1), "alice")
            await wait_for(lambda job_id=job.id: service.store.get(job_id).status == JobStatus.done)
            ids.append(job.id)
        first_image = Path(service.store.image(service.store.get(ids[0]).result["image_ids"][0])["path"])
        counts = await retention.prune()
        again = await service.submit(GenerationRequest(prompt="first", steps=2, seed=1), "alice")
        await wait_for(lambda: service.store.get(again.id).status == JobStatus.done)
        cached = await service.submit(GenerationRequest(prompt="third", steps=2, seed=1), "alice")
        await wait_for(lambda: service.store.get(cached.id).status == JobStatus.done)
        await service.stop()
        return first_image, counts, service.store.get(ids[0]), service.store.get(again.id), service.store.get(cached.id)

    first_image, counts, first, again, cached = asyncio.run(scenario())
    assert counts.jobs == 1 and counts.images == 1 and not first_image.exists() and first is None
    assert "cached" not in again.result and engine.ran == ["first", "second", "third", "first"]  # ran again
    assert cached.result["cached"] is True  # a kept job still answers from the cache


def test_the_loop_prunes_off_the_event_loop_and_stops_when_cancelled(tmp_path, monkeypatch):
    history = History(tmp_path)
    threads = []
    real_prunable = history.store.prunable

    def prunable(**kwargs):
        threads.append(threading.get_ident())
        return real_prunable(**kwargs)

    monkeypatch.setattr(history.store, "prunable", prunable)

    async def scenario():
        task = asyncio.create_task(history.retention(max_jobs_per_user=5).run(interval_s=0.05))
        await wait_for(lambda: len(history.job_ids()) == 12)  # at once: ten of each user, five kept
        history.add("alice-late", "alice", JobStatus.done, NOW + 1, 1)  # newer than all: alice-4 must go
        await wait_for(lambda: "alice-4" not in history.job_ids())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return threading.get_ident(), task

    loop_thread, task = asyncio.run(scenario())
    assert task.cancelled() and threads and loop_thread not in threads
    history.assert_consistent()


def test_the_loop_returns_at_once_when_retention_is_off(tmp_path, monkeypatch):
    history = History(tmp_path)
    monkeypatch.setattr(history.store, "prunable", lambda **kwargs: pytest.fail("no pass while retention is off"))
    asyncio.run(asyncio.wait_for(history.retention().run(interval_s=0.01), 10))


class Disk:
    def __init__(self, total: int, free: int):
        self.total, self.used, self.free = total, total - free, free


@pytest.mark.parametrize("total, free, nearly_full", [
    (100 * GIB, 4 * GIB, True),  # 4% free
    (10 * GIB, GIB, True),  # 10% free, but under 2 GiB
    (100 * GIB, 6 * GIB, False),
    (1000 * GIB, 30 * GIB, True),  # 3% free although 30 GiB
])
def test_a_nearly_full_disk_is_told_at_start_with_the_settings_to_use(tmp_path, monkeypatch, caplog, total, free,
                                                                      nearly_full):
    history = History(tmp_path, per_user=0)
    seen = []
    monkeypatch.setattr(retention_module.shutil, "disk_usage", lambda path: seen.append(path) or Disk(total, free))
    with caplog.at_level(logging.WARNING, logger="diffusion_studio.service.retention"):
        asyncio.run(history.retention().run())
    warnings = [record.getMessage() for record in caplog.records]
    assert seen == [history.outputs]
    if not nearly_full:
        assert warnings == []
        return
    [warning] = warnings
    assert "nearly full" in warning and f"{free / GIB:.1f} GiB free" in warning
    assert "retention_days" in warning and "retention_max_jobs_per_user" in warning and "kept forever" in warning


def test_a_nearly_full_disk_with_retention_on_is_told_once_not_every_pass(tmp_path, monkeypatch, caplog):
    history = History(tmp_path, per_user=0)
    disk = Disk(100 * GIB, GIB)
    monkeypatch.setattr(retention_module.shutil, "disk_usage", lambda path: disk)
    retention = history.retention(days=30)
    with caplog.at_level(logging.WARNING, logger="diffusion_studio.service.retention"):
        first, second = retention.check_disk(), retention.check_disk()
        disk.free = 50 * GIB
        assert retention.check_disk() is None
        disk.free = GIB
        retention.check_disk()
    warnings = [record.getMessage() for record in caplog.records]
    assert first == second and len(warnings) == 2  # at start, and when it filled up again
    assert "although retention is on (retention_days=30" in warnings[0]


def test_storage_usage_counts_hard_linked_names_once_and_walks_again_after_a_prune(tmp_path):
    history = History(tmp_path)
    os.link(history.files["alice-0"][0], history.outputs / "day" / "linked.png")
    (history.outputs / "nested" / "deeper").mkdir(parents=True)
    (history.outputs / "nested" / "deeper" / "other.png").write_bytes(b"y" * 10)
    usage = StorageUsage(history.outputs, tmp_path / "studio.db", every_s=60, clock=lambda: 0.0)
    assert math.isnan(usage.outputs_bytes) and usage.due()
    usage.refresh()
    images = sum(len(paths) for paths in history.files.values())
    assert (usage.outputs_files, usage.outputs_bytes) == (images + 1, images * IMAGE_BYTES + 10)
    assert not usage.due()  # the clock stood still: no second walk yet
    assert usage.db_bytes() >= (tmp_path / "studio.db").stat().st_size > 0

    retention = Retention(history.store, history.outputs, max_jobs_per_user=5, usage=usage, clock=lambda: NOW)
    counts = retention.prune_once()
    assert usage.due()  # a prune asks for a walk at the next sample
    usage.refresh()
    assert usage.outputs_bytes == (images * IMAGE_BYTES + 10) - counts.bytes_freed
    assert usage.outputs_files == images + 1 - counts.files_freed


def test_the_sampler_walks_the_outputs_in_a_thread(tmp_path):
    metrics = StudioMetrics(queue_length=lambda: 0, running=lambda: 0)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "a.png").write_bytes(b"z" * 123)
    usage = metrics.watch_storage(tmp_path / "outputs", tmp_path / "studio.db")
    walkers = []
    real_refresh = usage.refresh
    usage.refresh = lambda: walkers.append(threading.get_ident()) or real_refresh()

    async def scenario():
        sampler = asyncio.create_task(metrics.keep_sampling())
        await wait_for(lambda: usage.outputs_bytes == 123)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert walkers and loop_thread not in walkers
    text = metrics.exposition().decode()
    assert "studio_outputs_bytes 123.0" in text and "studio_outputs_files 1.0" in text


def test_a_served_studio_keeps_at_most_retention_max_jobs_and_shows_its_outputs_in_metrics(tmp_path, data_dir):
    from diffusion_studio.config import StudioConfig
    from diffusion_studio.server import build_app
    from diffusion_studio.studio import Studio

    standins = data_dir / "builtin-standins"  # the session's: built once for every test
    standins.mkdir(exist_ok=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "builtin-standins").symlink_to(standins)
    config = StudioConfig(data_dir=tmp_path / "data", models_dir=tmp_path / "models", retention_max_jobs=2,
                          retention_interval_s=0.2)
    studio = Studio(config)
    usage = studio.jobs.metrics.storage
    app = build_app(config, studio)

    def submit(base, prompt):
        created = httpx.post(f"{base}/api/v1/jobs", json={"prompt": prompt, "steps": 2, "seed": 3, "width": 64,
                                                         "height": 64}, timeout=60)
        assert created.status_code == 202, created.text
        deadline = time.time() + 120
        while (job := httpx.get(f"{base}/api/v1/jobs/{created.json()['id']}").json())["status"] in ("queued",
                                                                                                    "running"):
            assert time.time() < deadline, "the job never finished"
            time.sleep(0.05)
        assert job["status"] == "done", job
        return job

    def gauges(base):
        text = httpx.get(f"{base}/metrics", timeout=30).text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith(("studio_outputs_", "studio_db_bytes"))}

    def eventually(check, what):
        deadline = time.time() + 30
        while not check():
            assert time.time() < deadline, what
            time.sleep(0.1)

    with serving(app) as base:
        jobs = [submit(base, prompt) for prompt in ("first", "second", "third")]
        eventually(lambda: [job["id"] for job in httpx.get(f"{base}/api/v1/history").json()] ==
                   [jobs[2]["id"], jobs[1]["id"]], "the history was never pruned to two jobs")
        first_image = httpx.get(base + jobs[0]["images"][0])
        again = submit(base, "first")  # its earlier result was pruned: it runs again
        repeat = submit(base, "third")  # a kept job still answers from the cache
        eventually(lambda: len(httpx.get(f"{base}/api/v1/history").json()) == 2, "not pruned to two again")
        usage.refresh()  # the sampler's next walk (its own test is above), now rather than in up to 10 s
        metrics = gauges(base)
    assert first_image.status_code == 404
    assert "cached" not in again["result"] and repeat["result"]["cached"] is True
    assert len(list(studio.outputs_dir.rglob("*.png"))) == 2  # the two kept jobs' images, nothing else
    assert metrics["studio_outputs_bytes"] == sum(p.stat().st_size for p in studio.outputs_dir.rglob("*.png"))
    assert metrics["studio_db_bytes"] >= (Path(config.data_dir) / "studio.db").stat().st_size
