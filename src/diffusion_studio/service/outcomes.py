"""How work ends, as data: every job's final event carries an `Outcome` (status, result, and for failures a
`JobError` with a kind, the field at fault when there is one, and a message for a person). One table maps each
kind to its HTTP status and to the title a person sees; REST, WebSocket, the A1111 routes, the UI, the Python API
and the CLI all render an outcome from it, so nobody re-reads a record or compares status strings to learn how a
job ended. `classify` is the one place an exception becomes a `JobError`.
"""

from __future__ import annotations

import enum
import errno
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..engine.library import ModelConflict
from ..libraries import loaded
from ..requests import ModelLoadError, RequestError, describe_validation_error


class ErrorKind(str, enum.Enum):
    invalid_request = "invalid_request"  # the client's input: a field is wrong
    not_found = "not_found"  # no such job or image (or another user's)
    conflict = "conflict"  # an import would replace a model that exists (or one loaded / in use)
    too_large = "too_large"  # the request body is over limits.max_body_bytes
    rate_limited = "rate_limited"  # the user's rate or active-job limit
    queue_full = "queue_full"  # the shared queue is at max_queue
    cancelled = "cancelled"  # asked for by the client (or its closed stream)
    time_limit = "time_limit"  # ran past job_time_limit_s
    out_of_memory = "out_of_memory"  # the device ran out of memory during the run
    storage = "storage"  # the data dir or the history database could not be written
    model_load = "model_load"  # the model's files exist but would not load
    interrupted = "interrupted"  # the studio stopped while the job ran (it runs again after a restart)
    worker_lost = "worker_lost"  # the worker running the job died
    internal = "internal"  # a fault of ours with no better name (details in the log)


@dataclass(frozen=True)
class KindInfo:
    http_status: int
    title: str  # what a person sees above the message (UI, CLI)
    retry_after_s: int | None = None  # waiting helps: HTTP Retry-After, the UI says "try again"


# The one table: kind -> HTTP status, the UI/CLI title, and whether waiting helps.
KINDS: dict[ErrorKind, KindInfo] = {
    ErrorKind.invalid_request: KindInfo(422, "Invalid input"),
    ErrorKind.not_found: KindInfo(404, "Not found"),
    ErrorKind.conflict: KindInfo(409, "Already there"),
    ErrorKind.too_large: KindInfo(413, "Request too large"),
    ErrorKind.rate_limited: KindInfo(429, "Busy", 5),
    ErrorKind.queue_full: KindInfo(429, "Busy", 5),
    ErrorKind.cancelled: KindInfo(409, "Cancelled"),
    ErrorKind.time_limit: KindInfo(504, "Time limit"),
    ErrorKind.out_of_memory: KindInfo(503, "Out of memory", 10),
    ErrorKind.storage: KindInfo(503, "Storage unavailable", 30),
    ErrorKind.model_load: KindInfo(500, "Model failed to load"),
    ErrorKind.interrupted: KindInfo(503, "Interrupted", 5),
    ErrorKind.worker_lost: KindInfo(503, "Worker lost", 5),
    ErrorKind.internal: KindInfo(500, "Internal error"),
}


@dataclass(frozen=True)
class JobError:
    kind: ErrorKind
    message: str
    field: str | None = None
    retry_after_s: int | None = None

    @property
    def info(self) -> KindInfo:
        return KINDS[self.kind]

    @property
    def http_status(self) -> int:
        return self.info.http_status

    @property
    def retry_after(self) -> int | None:
        return self.retry_after_s if self.retry_after_s is not None else self.info.retry_after_s

    def text(self) -> str:
        """One line for a person: `field: message` for input errors, the message otherwise."""
        named = self.field and not self.message.startswith(f"{self.field}:")  # validation text names it already
        return f"{self.field}: {self.message}" if named else self.message

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "field": self.field, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobError":
        return cls(ErrorKind(data["kind"]), data["message"], data.get("field"))


class StudioError(Exception):
    """An error that already knows its kind (raised by the service, rendered by the front ends)."""

    def __init__(self, error: JobError):
        super().__init__(error.text())
        self.error = error

    def __reduce__(self):
        return type(self), (self.error,)


STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO, errno.EFBIG}


def classify(exc: BaseException) -> JobError:
    """Any exception -> a JobError. Client mistakes name their field; our faults get a kind and a message that
    holds no server path outside the data dir and no object repr."""
    from .jobs import JobNotFound, QueueFull  # noqa: PLC0415 (jobs imports this module)
    from .limits import LimitExceeded

    if isinstance(exc, StudioError):
        return exc.error
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False)
        where = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
        if not where and errors and isinstance(errors[0].get("ctx", {}).get("error"), RequestError):
            where = errors[0]["ctx"]["error"].field
        return JobError(ErrorKind.invalid_request, scrub(describe_validation_error(exc)), where or None)
    if isinstance(exc, ModelConflict):  # a RequestError too: test it first
        return JobError(ErrorKind.conflict, scrub(exc.message), exc.field)
    if isinstance(exc, RequestError):
        return JobError(ErrorKind.invalid_request, scrub(exc.message), exc.field)
    if isinstance(exc, JobNotFound):
        return JobError(ErrorKind.not_found, f"no such job or image: {scrub(str(exc.args[0]))}")
    if isinstance(exc, LimitExceeded):
        return JobError(ErrorKind.rate_limited, str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, QueueFull):
        return JobError(ErrorKind.queue_full, str(exc), retry_after_s=exc.retry_after_s)
    torch = loaded("torch")  # not imported for it: an error before torch is loaded is no torch error
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return JobError(ErrorKind.out_of_memory, "the device ran out of memory; try a smaller size or batch, or "
                                                 "enable memory.vae_tiling / attention_slicing")
    if isinstance(exc, ModelLoadError):
        return JobError(ErrorKind.model_load, scrub(str(exc)), "model")
    if is_storage_fault(exc):
        return JobError(ErrorKind.storage, f"the studio could not write its data ({storage_reason(exc)}); the job "
                                           "failed and nothing stored was lost")
    return JobError(ErrorKind.internal, f"an internal error ({type(exc).__name__}); the details are in the "
                                        "studio's log")


def is_storage_fault(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return True
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def storage_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno)) + ": " + (exc.strerror or "")
    return scrub(f"{type(exc).__name__}: {exc}")


_OBJECT_REPR = re.compile(r"<[^<>]*? object at 0x[0-9a-fA-F]+>")
# Where a path on the server starts: `/`, `~/` or `~user/`, `file://`, a Windows drive.
_PATH_START = r"(?:file://)?(?:/|~[\w.-]*/|[A-Za-z]:[\\/])"
_QUOTED_PATH = re.compile(rf"(['\"])({_PATH_START}[^'\"\n]*)\1")  # quoted: spaces and all
_BARE_PATH = re.compile(rf"(?<![\w.:/\\~])({_PATH_START}[^\s'\",:;()<>]*)")
# The studio's own routes, which messages name for the client to call: kept as they are.
# Whole segments, so a server folder like /healthcheck/ or /api/../etc is still a path.
_ROUTE = re.compile(r"/(?:api|sdapi|v1|share|gradio_api)/(?!\S*\.\.)\S*|/(?:login|logout|metrics|health)(?:\?\S*)?")


def last_part(path: str) -> str:
    """A path shown by its last part ('/etc/passwd' -> 'passwd'; a root alone stays '/')."""
    if _ROUTE.fullmatch(path):
        return path
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1] or "/"


def scrub(message: str) -> str:
    """A message fit for users: object reprs dropped, and every path on the server (absolute, `~user/...`,
    `file://`, a Windows drive; in the data dir, a models folder or anywhere else) shown by its last part only, so
    an error never tells where the studio keeps its files or what else the disk holds. The studio's own routes
    (`/api/v1/...`) stay whole."""
    message = _OBJECT_REPR.sub("<object>", message)
    message = _QUOTED_PATH.sub(lambda match: match.group(1) + last_part(match.group(2)) + match.group(1), message)
    return _BARE_PATH.sub(lambda match: last_part(match.group(1)), message)


@dataclass(frozen=True)
class Outcome:
    """How one job ended: its final status, its result (seeds, image ids, timings, cached, batched_with), and the
    error when it did not end `done`."""

    status: str  # a finished JobStatus value
    result: dict[str, Any] = field(default_factory=dict)
    error: JobError | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "result": self.result,
                "error": self.error.as_dict() if self.error else None}
