"""One long-lived thread per local worker, on which all of that worker's engine calls run.

Why not `asyncio.to_thread`: it hands each call to whichever thread of the event loop's default pool is free, and
the same pool runs the service's other blocking calls (saving PNGs, name checks, weight identities), so an engine
call could land on a thread that had never run torch. Every thread that runs torch ops on the CPU gets its own
OpenMP team, whose idle threads spin for a while after each parallel region: on a 2-core machine, teams left behind
by other threads compete with the running one. A worker's own thread, created once and set up with the process's
torch thread count, keeps one team from job to job. (Measured on this project's 2-core VM: a worker thread as such
is not slower than the main thread, 0.85-1.04x; the served path's main loss was elsewhere, see README
"Performance".)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar


T = TypeVar("T")


def _match_torch_settings(threads: int) -> None:
    """In the new thread: the thread count the process chose (config `torch_threads`, or torch's default)."""
    import torch
    torch.set_num_threads(threads)


class EngineThread:
    """A single thread, started on the first call, that runs one worker's calls in order; `close()` ends it once
    its current call returns (a later call starts a new one)."""

    def __init__(self, name: str):
        self.name = name
        self._pool: ThreadPoolExecutor | None = None

    async def call(self, fn: Callable[..., T], *args) -> T:
        import torch
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name,
                                            initializer=_match_torch_settings, initargs=(torch.get_num_threads(),))
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
