"""Model file hashes as AUTOMATIC1111 writes them, each computed once per file, in one background thread.

A1111's hashes, all sha256 digests shortened:
- a checkpoint's `Model hash` (and `/sdapi/v1/sd-models`' `hash`) is "AUTOV2": the first 10 hex of the file's
  sha256; `VAE hash` the same of the VAE file; `TI hashes` the first 12 hex of the embedding file's sha256;
- `Lora hashes` uses kohya's "addnet" hash for `.safetensors` LoRAs: the sha256 of the tensor data after the
  header (so editing the metadata keeps the hash), first 12 hex; other LoRA files get the file's sha256;
- A1111's legacy 8-hex `model_hash` (sha256 of the 64 KiB at offset 1 MiB) is what PNGs written before 1.x carry
  as `Model hash`; it costs nothing extra, so it is kept beside the sha256 for finding models, never written.

Hashing a 2 GB file reads 2 GB, so it never runs on a request: `Hasher.request` queues the file and returns a
`Future`; `Hasher.known` answers from the cache with one `stat`. Results are cached by (absolute path, size,
mtime_ns) in a JSON file written atomically; a file that can't be read as the cache is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

log = logging.getLogger(__name__)

Scheme = Literal["sha256", "addnet"]
SHA256: Scheme = "sha256"  # the whole file
ADDNET: Scheme = "addnet"  # a .safetensors file's tensor data, after its header
BLOCK_BYTES = 8 * 1024 * 1024
LEGACY_START, LEGACY_BYTES = 0x100000, 0x10000
CACHE_VERSION = 1


def autov2(sha256: str) -> str:
    """A1111's checkpoint and VAE short hash."""
    return sha256[:10]


def short12(digest: str) -> str:
    """A1111's LoRA and embedding short hash."""
    return digest[:12]


def lora_scheme(path: Path | str) -> Scheme:
    """The hash A1111 gives a LoRA file: addnet for .safetensors, else the file's sha256."""
    return ADDNET if str(path).lower().endswith(".safetensors") else SHA256


@dataclass(frozen=True)
class Stamp:
    """What the cache keys on: a file is re-hashed when its size or mtime changes."""

    path: str  # absolute
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path | str) -> Stamp:
        absolute = os.path.abspath(path)
        info = os.stat(absolute)
        return cls(absolute, info.st_size, info.st_mtime_ns)


class HashCache:
    """`{"version": 1, "files": {path: {"size", "mtime_ns", "sha256"?, "legacy"?, "addnet"?}}}` in one JSON file."""

    def __init__(self, file: Path):
        self.file = Path(file)
        self._lock = threading.Lock()
        # Files deleted since are dropped, so the cache doesn't grow with every model ever seen.
        self._files: dict[str, dict] = {path: entry for path, entry in self._load().items() if os.path.isfile(path)}

    def _load(self, quiet: bool = False) -> dict[str, dict]:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # truncated, not JSON, unreadable: hashes are recomputable
            if not quiet:
                log.warning("hash cache %s is unreadable (%s); starting a new one", self.file.name, exc)
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None
        if not isinstance(files, dict):
            if not quiet:
                log.warning("hash cache %s has an unknown layout; starting a new one", self.file.name)
            return {}
        return {path: entry for path, entry in files.items() if _valid_entry(entry)}

    def get(self, stamp: Stamp, scheme: Scheme) -> str | None:
        with self._lock:
            entry = self._files.get(stamp.path)
            if entry is None or (entry["size"], entry["mtime_ns"]) != (stamp.size, stamp.mtime_ns):
                return None
            return entry.get(scheme)

    def legacy(self, stamp: Stamp) -> str | None:
        return self.get(stamp, "legacy")  # type: ignore[arg-type]

    def put(self, stamp: Stamp, values: dict[str, str]) -> None:
        """Record and write. Another process (a CLI run beside `serve`) may share the file: what it wrote since
        is merged in first, ours winning, so neither loses the other's work."""
        on_disk = self._load(quiet=True)
        with self._lock:
            theirs = {path: entry for path, entry in on_disk.items() if path not in self._files}
            self._files.update({path: entry for path, entry in theirs.items() if os.path.isfile(path)})
            entry = self._files.get(stamp.path)
            if entry is None or (entry["size"], entry["mtime_ns"]) != (stamp.size, stamp.mtime_ns):
                entry = {"size": stamp.size, "mtime_ns": stamp.mtime_ns}
            self._files[stamp.path] = {**entry, **values}
            snapshot = json.dumps({"version": CACHE_VERSION, "files": self._files}, indent=1)
        self._write(snapshot)

    def entries(self) -> list[tuple[str, dict]]:
        with self._lock:
            return [(path, dict(entry)) for path, entry in self._files.items()]

    def _write(self, text: str) -> None:
        """Atomically (a reader sees the old file or the new one, never half); a failure only costs a re-hash."""
        temporary = self.file.with_name(f".{self.file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text)
            os.replace(temporary, self.file)
        except OSError as exc:
            log.warning("could not write the hash cache %s (%s); hashes stay in memory", self.file.name, exc)
            temporary.unlink(missing_ok=True)


def _valid_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("mtime_ns"), int)
            and all(isinstance(entry[k], str) for k in ("sha256", "addnet", "legacy") if k in entry))


@dataclass(eq=False)
class _Task:
    stamp_path: str
    scheme: Scheme
    background: bool
    future: Future = field(default_factory=Future)
    # Progress of a background task paused for urgent work: where it stopped and the digests so far.
    stamp: Stamp | None = None
    position: int = 0
    digest: object = None
    legacy: bytearray = field(default_factory=bytearray)
    restarts: int = 0


class FileChanged(OSError):
    """The file changed while it was being hashed (still being copied?)."""


class Hasher:
    """One background thread hashing files in the order asked; `background=True` requests (the models listing)
    wait behind every other and give way to them between blocks. Requests for a file already queued share its
    future."""

    def __init__(self, cache_file: Path, block_bytes: int = BLOCK_BYTES):
        self.cache = HashCache(cache_file)
        self.block_bytes = block_bytes
        self._condition = threading.Condition()
        self._urgent: deque[_Task] = deque()
        self._background: deque[_Task] = deque()
        self._pending: dict[tuple[str, Scheme], _Task] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def known(self, path: Path | str, scheme: Scheme = SHA256) -> str | None:
        """The cached hash of the file as it is now (one stat), or None."""
        try:
            return self.cache.get(Stamp.of(path), scheme)
        except OSError:
            return None

    def request(self, path: Path | str, scheme: Scheme = SHA256, background: bool = False) -> Future:
        """A future of the file's hex digest (`scheme`); done at once when cached. Never reads the file here."""
        absolute = os.path.abspath(path)
        cached = self.known(absolute, scheme)
        if cached is not None:
            done: Future = Future()
            done.set_result(cached)
            return done
        with self._condition:
            if self._closed:
                raise RuntimeError("the hasher is closed")
            task = self._pending.get((absolute, scheme))
            if task is None:
                task = _Task(absolute, scheme, background)
                self._pending[(absolute, scheme)] = task
                (self._background if background else self._urgent).append(task)
            elif task.background and not background:  # wanted now: ahead of the listing's backlog
                task.background = False
                self._urgent.append(task)
            self._start()
            self._condition.notify()
            return task.future

    def matches(self, prefix: str, scheme: Scheme = SHA256) -> list[Path]:
        """Cached files whose hash starts with `prefix` (case-insensitive) and that are unchanged since hashed.
        For SHA256 an 8-hex prefix also matches A1111's legacy hash."""
        prefix = prefix.strip().lower()
        if not prefix:
            return []
        found = []
        for path, entry in self.cache.entries():
            digest = entry.get(scheme, "")
            hit = digest.startswith(prefix) or (scheme == SHA256 and len(prefix) == 8 and entry.get("legacy") == prefix)
            if hit:
                try:
                    if self.cache.get(Stamp.of(path), scheme) is not None:
                        found.append(Path(path))
                except OSError:
                    continue
        return found

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(10)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="model-hasher", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._closed or self._urgent or self._background)
                if self._closed:
                    return
                task = (self._urgent or self._background).popleft()
            if task.future.done():  # an upgraded task seen again in the other queue
                continue
            try:
                finished = self._advance(task)
            except Exception as exc:  # noqa: BLE001 (the file vanished, a permission, a bad header: the asker's)
                log.warning("hashing %s failed: %s", os.path.basename(task.stamp_path), exc)
                self._finish(task, exception=exc)
                continue
            if not finished:
                with self._condition:
                    self._background.appendleft(task)  # resumes where it stopped once urgent work is done

    def _finish(self, task: _Task, result: str | None = None, exception: BaseException | None = None) -> None:
        with self._condition:
            self._pending.pop((task.stamp_path, task.scheme), None)
        if exception is not None:
            task.future.set_exception(exception)
        else:
            task.future.set_result(result)

    def _advance(self, task: _Task) -> bool:
        """Hash on from where the task stopped; False when paused for urgent work (background tasks only)."""
        if task.stamp is None:
            task.stamp = Stamp.of(task.stamp_path)
            cached = self.cache.get(task.stamp, task.scheme)
            if cached is not None:
                self._finish(task, cached)
                return True
            task.digest, task.legacy = hashlib.sha256(), bytearray()
            task.position = _tensor_data_offset(task.stamp_path) if task.scheme == ADDNET else 0
        buffer = bytearray(self.block_bytes)
        view = memoryview(buffer)
        with open(task.stamp_path, "rb") as handle:
            handle.seek(task.position)
            while True:
                size = self._read_into(handle, buffer)
                if not size:
                    break
                task.digest.update(view[:size])  # hashlib releases the GIL on large buffers
                if task.scheme == SHA256:
                    _collect_legacy(task.legacy, view[:size], task.position)
                task.position += size
                if task.background and self._urgent:
                    return False
        if Stamp.of(task.stamp_path) != task.stamp:
            if task.restarts >= 1:
                raise FileChanged(f"'{os.path.basename(task.stamp_path)}' kept changing while it was hashed")
            task.stamp, task.restarts = None, task.restarts + 1
            return self._advance(task)
        digest = task.digest.hexdigest()
        values = {task.scheme: digest}
        if task.scheme == SHA256:
            values["legacy"] = hashlib.sha256(bytes(task.legacy)).hexdigest()[:8]
        self.cache.put(task.stamp, values)
        self._finish(task, digest)
        return True

    @staticmethod
    def _read_into(handle: BinaryIO, buffer: bytearray) -> int:
        """One block (tests replace this to make a hash slow)."""
        return handle.readinto(buffer)


def _tensor_data_offset(path: str) -> int:
    """Where a .safetensors file's tensors start: 8 bytes of little-endian header length, then the header."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8:
        raise ValueError(f"'{os.path.basename(path)}' is too short to be a .safetensors file")
    return 8 + int.from_bytes(head, "little")


def _collect_legacy(legacy: bytearray, block: memoryview, position: int) -> None:
    """Keep the bytes of [1 MiB, 1 MiB + 64 KiB) that fall in this block (A1111's legacy model hash)."""
    start = max(LEGACY_START, position)
    stop = min(LEGACY_START + LEGACY_BYTES, position + len(block))
    if start < stop:
        legacy += block[start - position:stop - position]
