"""Model-file hashing: the studio's Hasher (one background thread, 8 MiB blocks) against hashlib.file_digest on the
same file, warm page cache, interleaved; then a cached request and `known()` after a restart (one stat).

    python bench/hashes.py [--mib 2048] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from diffusion_studio.engine.hashes import Hasher


def file_digest(handle):
    """hashlib.file_digest (Python 3.11+), or the same loop before it."""
    if hasattr(hashlib, "file_digest"):
        return hashlib.file_digest(handle, "sha256")
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(2**18), b""):
        digest.update(block)
    return digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=2048, help="file size (an SD 1.5 fp16 checkpoint is ~2 GiB)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        with open(path, "wb") as handle:
            chunk = os.urandom(64 * 2**20)
            for _ in range(max(1, args.mib // 64)):
                handle.write(chunk)
        size_mib = path.stat().st_size / 2**20
        with open(path, "rb") as handle:  # warm the page cache: both read from memory
            expected = file_digest(handle).hexdigest()
        ours, reference = [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            with open(path, "rb") as handle:
                file_digest(handle)
            reference.append(time.perf_counter() - started)
            hasher = Hasher(Path(folder) / f"hashes-{repeat}.json")
            started = time.perf_counter()
            assert hasher.request(path).result(600) == expected
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            hasher.request(path).result(0)
            cached_ms = (time.perf_counter() - started) * 1e3
            hasher.close()
        restarted = Hasher(Path(folder) / "hashes-0.json")
        started = time.perf_counter()
        assert restarted.known(path) == expected
        known_ms = (time.perf_counter() - started) * 1e3
        for name, times in (("hashlib.file_digest", reference), ("Hasher", ours)):
            median = statistics.median(times)
            print(f"{name:20s} {size_mib / 1024:.1f} GiB in {median:.2f} s ({size_mib / median:.0f} MiB/s)")
        print(f"cached request {cached_ms:.2f} ms, known() after a restart {known_ms:.2f} ms")


if __name__ == "__main__":
    main()
