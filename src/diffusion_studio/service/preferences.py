"""Per-user settings that outlive a restart: the defaults an A1111 client sets through `POST /sdapi/v1/options`
(model, VAE, CLIP skip), which apply to that user's later requests only. One small JSON file in the data dir,
written whole and atomically (a crash leaves the old file or the new one, never half of one).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_KEYS_PER_USER = 64  # what one user may keep; the callers store a handful of known keys


class Preferences:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] | None = None  # read on first use

    def get(self, user: str) -> dict[str, Any]:
        """`user`'s settings (a copy; empty when they never set any)."""
        with self._lock:
            return dict(self._load().get(user, {}))

    def update(self, user: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` into `user`'s settings (a value of None removes the key) and write them; returns the
        merged settings. Values must be JSON (the callers validate them first)."""
        with self._lock:
            data = self._load()
            merged = {**data.get(user, {}), **changes}
            merged = {key: value for key, value in merged.items() if value is not None}
            if len(merged) > MAX_KEYS_PER_USER:
                raise ValueError(f"at most {MAX_KEYS_PER_USER} settings per user")
            updated = {**data, user: merged}
            self._write(updated)
            self._data = updated
            return dict(merged)

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._data is None:
            try:
                loaded = json.loads(self.path.read_text())
                self._data = loaded if isinstance(loaded, dict) else {}
            except FileNotFoundError:
                self._data = {}
            except (OSError, ValueError) as exc:  # unreadable: start empty rather than refuse every request
                log.warning("ignoring unreadable preferences file %s (%s)", self.path.name, exc)
                self._data = {}
        return self._data

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_suffix(".tmp")
        with open(scratch, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, self.path)
