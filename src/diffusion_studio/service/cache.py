"""ResultCache: a request with an explicit seed that already ran returns the stored result, without the model.

The key is small and explicit (as ComfyUI's cache keys are): the canonical request parameters (input images as
digests) plus the identity of the model's weights, so new weights under the same name never hit old results.
Requests without a seed are random by definition and never cached. Entries are each user's own unless the studio
shares them on purpose (`cache_scope = "global"`): a shared hit would tell one user that another ran that prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from ..requests import GenerationRequest


class ResultCache:
    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()  # key -> id of the job holding the result

    @staticmethod
    def key(request: GenerationRequest, model_identity: str, user: str | None = None) -> str | None:
        """`user`: whose entry (None: one entry for everyone)."""
        if request.seed is None:
            return None
        canonical = json.dumps({"request": request.parameters(), "model": model_identity, "user": user},
                               sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, key: str, job_id: str) -> None:
        self._entries[key] = job_id
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget(self, job_id: str) -> None:
        for key in [k for k, v in self._entries.items() if v == job_id]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
