"""Retention: a history that cannot fill the disk. Finished jobs (done, failed, cancelled, interrupted; never queued
or running) go, with their image files, once they are older than `retention_days`, beyond the newest
`retention_max_jobs` overall, or beyond each user's newest `retention_max_jobs_per_user`. All off by default; a
studio whose disk is nearly full says so at start-up, with the settings to use.

The order of a deletion is chosen for a crash between its steps: the result cache forgets the jobs first (no cache
hit may start copying a file about to go), then the files, then the rows (one transaction per batch). A crash after
the files leaves rows whose files are gone (served as missing, 404) until the next pass, which runs at start-up and
finds the same jobs again; the other order would leave files no row names, which nothing would ever find. A file
that can't be deleted keeps its job's row (logged, retried on the next pass), so no file is left without a row.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import StudioConfig
from .cache import ResultCache
from .metrics import StorageUsage
from .store import JobStore

log = logging.getLogger(__name__)

GIB = 2**30
# Nearly full: less than 5% of the disk free (where the usual disk alerts warn, e.g. Prometheus' node-mixin) or less
# than 2 GiB, whichever comes first on a small disk: about a day of heavy use (1,400 SDXL PNGs of ~1.5 MB).
NEARLY_FULL_FRACTION = 0.05
NEARLY_FULL_BYTES = 2 * GIB
PASS_JOBS = 10_000  # jobs found per query (a bound on memory: a first pass over a long history takes several)
BATCH_JOBS = 500  # jobs per transaction: the store's lock (which the event loop also takes) is held briefly
DAY_S = 86400.0


@dataclass
class PruneCounts:
    jobs: int = 0  # jobs removed from the history
    images: int = 0  # image files removed (a cached job's hard-linked copy counts as one)
    bytes_freed: int = 0  # space returned: a file's bytes count when its last name goes
    files_freed: int = 0  # files whose last name went
    kept: int = 0  # jobs kept for now because a file of theirs could not be deleted (logged; retried next pass)

    def __iadd__(self, other: PruneCounts) -> PruneCounts:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


class Retention:
    def __init__(self, store: JobStore, outputs_dir: Path, *, days: float | None = None,
                 max_jobs: int | None = None, max_jobs_per_user: int | None = None, interval_s: float = 3600.0,
                 cache: ResultCache | None = None, usage: StorageUsage | None = None,
                 clock: Callable[[], float] = time.time):
        """`cache`: forgets pruned jobs; `usage`: walks the outputs again after a prune (the /metrics gauges)."""
        self.store, self.outputs_dir = store, Path(outputs_dir)
        self.days, self.max_jobs, self.max_jobs_per_user = days, max_jobs, max_jobs_per_user
        self.interval_s = interval_s
        self.cache, self.usage, self._clock = cache, usage, clock
        self._disk_was_full = False

    @classmethod
    def from_config(cls, config: StudioConfig, store: JobStore, outputs_dir: Path, *,
                    cache: ResultCache | None = None, usage: StorageUsage | None = None) -> Retention:
        return cls(store, outputs_dir, days=config.retention_days, max_jobs=config.retention_max_jobs,
                   max_jobs_per_user=config.retention_max_jobs_per_user, interval_s=config.retention_interval_s,
                   cache=cache, usage=usage)

    @property
    def enabled(self) -> bool:
        return any(rule is not None for rule in (self.days, self.max_jobs, self.max_jobs_per_user))

    def describe(self) -> str:
        """The rules as the config names them, e.g. `retention_days=30, retention_max_jobs=unset, ...`."""
        return ", ".join(f"retention_{name}={'unset' if value is None else f'{value:g}'}" for name, value in
                         (("days", self.days), ("max_jobs", self.max_jobs),
                          ("max_jobs_per_user", self.max_jobs_per_user)))

    # -- pruning --------------------------------------------------------------------------------------------
    def prune_once(self) -> PruneCounts:
        """One pass in the calling thread (blocking): every job the rules let go, found by one query (per
        PASS_JOBS) and deleted batch by batch."""
        counts, skip, created_before = PruneCounts(), set(), self._created_before()
        while True:
            found = self._find(created_before, skip)
            for batch in _batches(found):
                self._forget(batch)
                counts += self._delete(batch, skip)
            if len(found) < PASS_JOBS:
                return self._reported(counts)

    async def prune(self) -> PruneCounts:
        """One pass from the event loop: the store and the files in a worker thread, the cache on the loop. A cache
        hit runs on the loop without pausing, so once the loop has forgotten a batch no hit can be half-way
        through copying one of its files."""
        counts, skip, created_before = PruneCounts(), set(), self._created_before()
        while True:
            found = await asyncio.to_thread(self._find, created_before, skip)
            for batch in _batches(found):
                self._forget(batch)
                counts += await asyncio.to_thread(self._delete, batch, skip)
            if len(found) < PASS_JOBS:
                return self._reported(counts)

    def delete_jobs(self, job_ids: list[str]) -> PruneCounts:
        """Remove these jobs (finished ones: the caller checks) and their files as a pass does, in the same order
        (blocking; `kept` > 0: a file could not go, so its job is still there)."""
        batch = self.store.images_of(job_ids)
        self._forget(batch)
        counts = self._delete(batch, set())
        self._walk_again(counts)
        return counts

    async def run(self, interval_s: float | None = None) -> None:
        """For the server's lifetime (cancel to stop): warn if the disk is nearly full, then, while retention is on,
        prune at once (a pass a crash cut short is finished) and every `interval_s` (default: the config's)."""
        await asyncio.to_thread(self.check_disk)
        if not self.enabled:
            return
        while True:
            try:
                await self.prune()
                await asyncio.to_thread(self.check_disk)
            except Exception:  # noqa: BLE001 (a failed pass, e.g. a read-only disk, is retried; the studio runs on)
                log.exception("retention: the pass failed; trying again in %g s", interval_s or self.interval_s)
            await asyncio.sleep(interval_s or self.interval_s)

    def _created_before(self) -> float | None:
        return self._clock() - self.days * DAY_S if self.days is not None else None

    def _find(self, created_before: float | None, skip: set[str]) -> list[tuple[str, list[Path]]]:
        return self.store.prunable(created_before=created_before, keep_newest=self.max_jobs,
                                   keep_newest_per_user=self.max_jobs_per_user, limit=PASS_JOBS, skip=skip)

    def _forget(self, batch: list[tuple[str, list[Path]]]) -> None:
        if self.cache is not None:
            self.cache.forget_jobs([job_id for job_id, _ in batch])

    def _delete(self, batch: list[tuple[str, list[Path]]], skip: set[str]) -> PruneCounts:
        """The batch's files, then the rows of the jobs whose files all went (one transaction). A job with a file
        that could not go joins `skip` for the rest of this pass."""
        counts, gone, folders = PruneCounts(), [], {}
        for job_id, paths in batch:
            if all(self._delete_file(job_id, path, counts, folders) for path in paths):
                gone.append(job_id)
            else:
                skip.add(job_id)
                counts.kept += 1
        counts.jobs = self.store.delete_many(gone)
        return counts

    def _delete_file(self, job_id: str, path: Path, counts: PruneCounts, folders: dict[Path, bool]) -> bool:
        """Remove one image file; False (logged) if it is still there. `folders`: which folders were found inside
        the outputs folder (each resolved once per batch: resolving every file's path cost more than deleting it)."""
        if path.parent not in folders:
            folders[path.parent] = _inside(path.parent, self.outputs_dir)
        if not folders[path.parent]:  # a row naming a file elsewhere: not ours to delete
            log.warning("retention: job %s names %s, outside the outputs folder; its row goes, the file stays",
                        job_id, path)
            return True
        try:
            stat = path.stat()
            path.unlink()
        except FileNotFoundError:  # already gone (deleted by hand, or a pass cut short): the row may go now
            return True
        except OSError as exc:
            log.warning("retention: could not delete %s of job %s (%s); the job stays and is tried again next pass",
                        path, job_id, exc)
            return False
        counts.images += 1
        if stat.st_nlink == 1:  # the last name: its space comes back (a hard-linked cached copy keeps it)
            counts.bytes_freed += stat.st_size
            counts.files_freed += 1
        return True

    def _walk_again(self, counts: PruneCounts) -> None:
        if self.usage is not None and counts.images:
            self.usage.stale()

    def _reported(self, counts: PruneCounts) -> PruneCounts:
        self._walk_again(counts)
        if counts.jobs or counts.kept:
            log.info("retention pruned %d finished jobs (%d images, %.1f MiB freed; %d kept for files that could "
                     "not be deleted) under %s", counts.jobs, counts.images, counts.bytes_freed / 2**20, counts.kept,
                     self.describe())
        return counts

    # -- the disk -------------------------------------------------------------------------------------------
    def check_disk(self) -> str | None:
        """Warn (and return the warning) when the disk holding the outputs is nearly full: at the first check, and
        later only when it becomes nearly full again, not at every pass."""
        warning = self.disk_warning()
        if warning is not None and not self._disk_was_full:
            log.warning(warning)
        self._disk_was_full = warning is not None
        return warning

    def disk_warning(self) -> str | None:
        """What to tell an admin when the disk holding the outputs is nearly full; None while it isn't."""
        folder = next((p for p in (self.outputs_dir, *self.outputs_dir.parents) if p.exists()), Path("."))
        try:
            usage = shutil.disk_usage(folder)
        except OSError as exc:  # only a warning's worth of information: never a reason to stop
            log.debug("retention: could not read the free space of %s: %s", folder, exc)
            return None
        if usage.free >= NEARLY_FULL_BYTES and usage.free >= NEARLY_FULL_FRACTION * usage.total:
            return None
        free = f"{usage.free / GIB:.1f} GiB free of {usage.total / GIB:.1f} GiB ({usage.free / usage.total:.0%})"
        if not self.enabled:
            return (f"the disk holding {folder} is nearly full ({free}) and the history is kept forever: set "
                    "retention_days, retention_max_jobs or retention_max_jobs_per_user (DS_RETENTION_DAYS, ...) to "
                    "prune old jobs and their images")
        return (f"the disk holding {folder} is nearly full ({free}) although retention is on ({self.describe()}): "
                "lower those bounds, or free space elsewhere on that disk")


def _batches(found: list, size: int = BATCH_JOBS) -> list[list]:
    return [found[start:start + size] for start in range(0, len(found), size)]


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or below it, symlinks followed (a file's own name may be a link: unlinking it
    removes only the link)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:  # e.g. a symlink loop: not a path we can vouch for
        return False
