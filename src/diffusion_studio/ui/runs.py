"""Run studio work from a Gradio generator handler: in a worker thread, with live events and a cancel path.

Gradio cancels a generator by closing it (GeneratorExit); the `finally` below turns that into the engine's
cooperative cancel flag and waits for the worker, so no run is left going in the background.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Iterator

import gradio as gr
from pydantic import ValidationError

from ..requests import RequestError, describe_validation_error

log = logging.getLogger(__name__)
_DONE = object()


def user_error(exc: BaseException) -> gr.Error:
    """A message for people: field-named for bad input, a short reason otherwise (details go to the log)."""
    if isinstance(exc, ValidationError):
        return gr.Error(describe_validation_error(exc), title="Invalid input")
    if isinstance(exc, RequestError):
        return gr.Error(str(exc), title="Invalid input")
    log.exception("run failed", exc_info=exc)
    return gr.Error(f"{type(exc).__name__}: {exc}", title="Generation failed")


def stream(work: Callable[[Callable[[Any], None], threading.Event], Any]) -> Iterator[tuple[str, Any]]:
    """Yields ("event", e) for each event `work` reports, then ("result", r). Raises gr.Error on failure."""
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["result"] = work(events.put, cancel)
        except BaseException as exc:  # reported to the handler as data, never lost in the thread
            outcome["error"] = exc
        finally:
            events.put(_DONE)

    worker = threading.Thread(target=target, name="studio-run", daemon=True)
    worker.start()
    try:
        while (event := events.get()) is not _DONE:
            yield "event", event
    finally:
        if worker.is_alive():
            cancel.set()
        worker.join()
    if "error" in outcome:
        raise user_error(outcome["error"])
    yield "result", outcome["result"]
