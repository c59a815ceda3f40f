"""ResultCache: a request with an explicit seed that already ran returns the stored result, without the model.

The key is small and explicit (as ComfyUI's cache keys are): the canonical request parameters (input images as
digests) plus the identity of the model's weights, so new weights under the same name never hit old results.
Requests without a seed are random by definition and never cached. Entries are each user's own unless the studio
shares them on purpose (`cache_scope = "global"`): a shared hit would tell one user that another ran that prompt.
An entry names the job that holds the result; when that job leaves the history (deleted by its user, or pruned by
retention) its entries must go with it (`forget_jobs`), from the event loop or a worker thread (hence the lock).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Collection

from ..requests import GenerationRequest


class ResultCache:
    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()  # key -> id of the job holding the result
        self._lock = threading.Lock()

    @staticmethod
    def key(request: GenerationRequest, model_identity: str, user: str | None = None) -> str | None:
        """`user`: whose entry (None: one entry for everyone)."""
        if request.seed is None:
            return None
        canonical = json.dumps({"request": request.parameters(), "model": model_identity, "user": user},
                               sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            return None

    def put(self, key: str, job_id: str) -> None:
        with self._lock:
            self._entries[key] = job_id
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, job_id: str) -> None:
        self.forget_jobs([job_id])

    def forget_jobs(self, job_ids: Collection[str]) -> int:
        """Drop every entry held by one of these jobs (one pass over the entries); returns how many went."""
        gone = set(job_ids)
        with self._lock:
            keys = [key for key, job_id in self._entries.items() if job_id in gone]
            for key in keys:
                del self._entries[key]
        return len(keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
