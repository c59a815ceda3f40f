"""Per-user admission: a token bucket for the request rate and a cap on unfinished jobs. Refusals say when to
retry, so clients (and HTTP 429's Retry-After) can back off precisely."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field


class LimitExceeded(RuntimeError):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


@dataclass
class _Bucket:
    tokens: float
    updated: float = field(default_factory=time.monotonic)


class UserLimits:
    def __init__(self, rate_per_minute: float, burst: int, max_active_jobs: int):
        self.rate_per_s = rate_per_minute / 60.0
        self.burst = burst
        self.max_active_jobs = max_active_jobs
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def admit(self, user: str, active_jobs: int) -> None:
        """Take one token for `user` or raise LimitExceeded saying how long to wait."""
        if active_jobs >= self.max_active_jobs:
            raise LimitExceeded(f"you have {active_jobs} unfinished jobs (the limit is {self.max_active_jobs}); "
                                "retry when one finishes", retry_after_s=5)
        with self._lock:
            now = time.monotonic()
            bucket = self._buckets.setdefault(user, _Bucket(tokens=float(self.burst), updated=now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
            bucket.updated = now
            if bucket.tokens < 1:
                wait = (1 - bucket.tokens) / self.rate_per_s
                raise LimitExceeded(f"rate limit: {self.rate_per_s * 60:g} requests per minute; retry in "
                                    f"{math.ceil(wait)} s", retry_after_s=wait)
            bucket.tokens -= 1
