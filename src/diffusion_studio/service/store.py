"""JobStore: job records and their images in SQLite (WAL), so the queue and the history outlive a restart.

One connection, guarded by a lock: SQLite serialises writers anyway, and the studio's write rate (a few rows per
job) is far below what one connection sustains. Retention's search of the whole history reads on a second
connection of its own (WAL lets it read while the first writes), so it never holds the lock the event loop takes.
"""

from __future__ import annotations

import enum
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from .outcomes import ErrorKind, JobError, Outcome


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.queued, JobStatus.running)


FINISHED = tuple(status.value for status in JobStatus if status.finished)
_FINISHED_SQL = ", ".join(f"'{status}'" for status in FINISHED)  # our own enum's values: no input reaches this


@dataclass
class JobRecord:
    id: str
    user: str
    request: dict[str, Any]  # GenerationRequest.model_dump(mode="json"): images included, so a re-queue can run
    status: JobStatus = JobStatus.queued
    priority: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: JobError | None = None
    result: dict[str, Any] = field(default_factory=dict)  # seeds, timings, image ids, cached flag

    def outcome(self) -> Outcome | None:
        """How the job ended, as every front end renders it; None while it is queued or running."""
        return Outcome(self.status.value, self.result, self.error) if self.status.finished else None


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, status TEXT NOT NULL, priority INTEGER NOT NULL,
    request TEXT NOT NULL, prompt TEXT NOT NULL, mode TEXT NOT NULL, model TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, error TEXT, result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_user_created ON jobs (user, created_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE, user TEXT NOT NULL,
    path TEXT NOT NULL, seed INTEGER NOT NULL, position INTEGER NOT NULL, share_token TEXT
);
CREATE INDEX IF NOT EXISTS images_job ON images (job_id);
CREATE INDEX IF NOT EXISTS images_path ON images (path);
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);
"""


class JobStore:
    def __init__(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL's recommended setting: a commit survives a crash of the studio without an fsync each time (an
            # OS crash or power cut may lose the last commits, never the database's consistency).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        self._reader = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._reader.row_factory = sqlite3.Row
        self._reader.execute("PRAGMA query_only=ON")
        self._reader_lock = threading.Lock()

    # -- jobs -----------------------------------------------------------------------------------------------
    def add(self, job: JobRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.user, job.status.value, job.priority, json.dumps(job.request),
                 job.request.get("prompt", ""), job.request.get("mode", ""), job.request.get("model", ""),
                 job.created_at, job.started_at, job.finished_at, _error_text(job.error), json.dumps(job.result)),
            )

    def update(self, job: JobRecord) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, started_at=?, finished_at=?, error=?, result=? WHERE id=?",
                (job.status.value, job.started_at, job.finished_at, _error_text(job.error), json.dumps(job.result),
                 job.id),
            )

    def probe(self) -> None:
        """One small real write: raises while the database can't be written (disk full, read-only)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO probe VALUES (1, ?)", (time.time(),))

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _record(row) if row else None

    def status_counts(self, since: float) -> dict[str, int]:
        """How many jobs created since `since` (unix seconds) are in each state: one query, no records."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs WHERE created_at >= ? GROUP BY status",
                                    (since,)).fetchall()
        return {status: count for status, count in rows}

    def find(self, user: str | None = None, status: JobStatus | None = None, prompt: str | None = None,
             mode: str | None = None, model: str | None = None, since: float | None = None,
             until: float | None = None, limit: int = 100, offset: int = 0) -> list[JobRecord]:
        """Newest first. `prompt` matches anywhere in the prompt, case-insensitively."""
        clauses, values = [], []
        for column, value in (("user", user), ("status", status.value if status else None), ("mode", mode),
                              ("model", model)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        if prompt:
            clauses.append("prompt LIKE ? ESCAPE '\\'")
            values.append("%" + prompt.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        if since is not None:
            clauses.append("created_at >= ?")
            values.append(since)
        if until is not None:
            clauses.append("created_at < ?")
            values.append(until)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY created_at DESC LIMIT ? OFFSET ?",
                                    (*values, limit, offset)).fetchall()
        return [_record(row) for row in rows]

    def recover(self) -> list[JobRecord]:
        """After a restart: jobs that were running are marked interrupted; queued ones are returned, oldest
        first, to be queued again."""
        now = time.time()
        with self._lock:
            self._db.execute("UPDATE jobs SET status=?, finished_at=?, error=? WHERE status=?",
                             (JobStatus.interrupted.value, now, _error_text(INTERRUPTED), JobStatus.running.value))
            rows = self._db.execute("SELECT * FROM jobs WHERE status=? ORDER BY created_at",
                                    (JobStatus.queued.value,)).fetchall()
        return [_record(row) for row in rows]

    def delete(self, job_id: str) -> list[Path]:
        """Remove a job and its image rows; returns the image files for the caller to delete."""
        with self._lock:
            paths = [Path(r["path"]) for r in
                     self._db.execute("SELECT path FROM images WHERE job_id=?", (job_id,)).fetchall()]
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        return paths

    def prunable(self, *, created_before: float | None = None, keep_newest: int | None = None,
                 keep_newest_per_user: int | None = None, limit: int = 10_000,
                 skip: Collection[str] = ()) -> list[tuple[str, list[Path]]]:
        """Finished jobs (never queued or running) that a retention rule lets go, oldest first, at most `limit`, with
        their image files: created before `created_before` (unix seconds), beyond the newest `keep_newest` finished
        jobs, or beyond each user's newest `keep_newest_per_user`. None turns a rule off; `skip`: ids left out.
        One query for all the rules, on the reader connection."""
        rules = []  # each a SELECT of (id, created_at) from `finished`
        values: list[Any] = []
        if created_before is not None:
            rules.append("SELECT id, created_at FROM finished WHERE created_at < ?")
            values.append(created_before)
        if keep_newest is not None:
            rules.append("SELECT id, created_at FROM (SELECT id, created_at FROM finished "
                         "ORDER BY created_at DESC, id DESC LIMIT -1 OFFSET ?)")
            values.append(keep_newest)
        if keep_newest_per_user is not None:
            rules.append("SELECT id, created_at FROM (SELECT id, created_at, ROW_NUMBER() OVER (PARTITION BY user "
                         "ORDER BY created_at DESC, id DESC) AS newest FROM finished) WHERE newest > ?")
            values.append(keep_newest_per_user)
        if not rules:
            return []
        query = (f"WITH finished AS (SELECT id, user, created_at FROM jobs WHERE status IN ({_FINISHED_SQL})), "
                 f"doomed AS ({' UNION '.join(rules)}), "
                 "batch AS (SELECT id, created_at FROM doomed WHERE id NOT IN (SELECT value FROM json_each(?)) "
                 "ORDER BY created_at, id LIMIT ?) "
                 "SELECT batch.id AS id, images.path AS path FROM batch LEFT JOIN images ON images.job_id = batch.id "
                 "ORDER BY batch.created_at, batch.id, images.position")
        with self._reader_lock:
            rows = self._reader.execute(query, (*values, json.dumps(list(skip)), limit)).fetchall()
        return _grouped(rows)

    def images_of(self, job_ids: Collection[str]) -> list[tuple[str, list[Path]]]:
        """These jobs (those that exist), each with its image files: what `prunable` gives, for jobs chosen by id."""
        with self._lock:
            rows = self._db.execute("SELECT jobs.id AS id, images.path AS path FROM jobs LEFT JOIN images ON "
                                    "images.job_id = jobs.id WHERE jobs.id IN (SELECT value FROM json_each(?)) "
                                    "ORDER BY jobs.created_at, jobs.id, images.position",
                                    (json.dumps(list(job_ids)),)).fetchall()
        return _grouped(rows)

    def delete_many(self, job_ids: Collection[str]) -> int:
        """Remove these jobs and their image rows (share tokens with them: the rows cascade) in one transaction;
        returns how many jobs were removed. The caller deals with the files."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?))",
                                      (json.dumps(list(job_ids)),))
        return cursor.rowcount

    # -- images ---------------------------------------------------------------------------------------------
    def add_images(self, job: JobRecord, paths: list[Path], seeds: list[int]) -> list[str]:
        ids = [secrets.token_hex(8) for _ in paths]
        with self._lock:
            self._db.executemany(
                "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, NULL)",
                [(image_id, job.id, job.user, str(path), seed, position)
                 for position, (image_id, path, seed) in enumerate(zip(ids, paths, seeds))],
            )
        return ids

    def image(self, image_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE id=?", (image_id,)).fetchone()
        return dict(row) if row else None

    def image_owner(self, path: Path | str) -> str | None:
        """The user whose job made the image at `path` (as saved); None: no image of the history is there."""
        with self._lock:
            row = self._db.execute("SELECT user FROM images WHERE path=? LIMIT 1", (str(path),)).fetchone()
        return row["user"] if row else None

    def share(self, image_id: str) -> str:
        """An unguessable token that opens this one image without an account."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._db.execute("UPDATE images SET share_token=? WHERE id=?", (token, image_id))
        return token

    def shared_image(self, token: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE share_token=?", (token,)).fetchone()
        return dict(row) if row else None


def _grouped(rows: list[sqlite3.Row]) -> list[tuple[str, list[Path]]]:
    """(id, path) rows of jobs LEFT JOIN images -> each job once, in order, with its image files."""
    jobs: dict[str, list[Path]] = {}
    for row in rows:
        paths = jobs.setdefault(row["id"], [])
        if row["path"] is not None:  # a job without images (failed, cancelled early) has one NULL row
            paths.append(Path(row["path"]))
    return list(jobs.items())


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"], user=row["user"], request=json.loads(row["request"]), status=JobStatus(row["status"]),
        priority=row["priority"], created_at=row["created_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], error=_error_from(row["error"]), result=json.loads(row["result"]),
    )


INTERRUPTED = JobError(ErrorKind.interrupted, "the studio stopped while this job ran")
_LEGACY_KINDS = {"time_limit": ErrorKind.time_limit, "out_of_memory": ErrorKind.out_of_memory}


def _error_text(error: JobError | None) -> str | None:
    return json.dumps(error.as_dict()) if error else None


def _error_from(text: str | None) -> JobError | None:
    """The stored error; rows written before errors had kinds hold plain text (`kind: message` or a message)."""
    if not text:
        return None
    try:
        return JobError.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError):
        prefix, _, rest = text.partition(": ")
        if prefix in _LEGACY_KINDS:
            return JobError(_LEGACY_KINDS[prefix], rest)
        if "stopped while this job ran" in text:
            return INTERRUPTED
        if "cancelled" in text:
            return JobError(ErrorKind.cancelled, text)
        return JobError(ErrorKind.internal, text)
