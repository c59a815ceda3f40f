"""Follow studio work from a Gradio generator handler, with live events and a cancel path.

UI work goes through the job service like every other client: it queues, is recorded, and lands in the history.
Gradio cancels a generator by closing it; the `finally` below turns that into a cancel of the job, so no run is
left going unseen.
"""

from __future__ import annotations

import logging

import gradio as gr
from pydantic import ValidationError

from ..requests import GenerationRequest, RequestError, describe_validation_error
from ..service.jobs import QueueFull
from ..service.limits import LimitExceeded

log = logging.getLogger(__name__)


def user_error(exc: BaseException) -> gr.Error:
    """A message for people: field-named for bad input, a short reason otherwise (details go to the log)."""
    if isinstance(exc, ValidationError):
        return gr.Error(describe_validation_error(exc), title="Invalid input")
    if isinstance(exc, RequestError):
        return gr.Error(str(exc), title="Invalid input")
    if isinstance(exc, (QueueFull, LimitExceeded)):
        return gr.Error(str(exc), title="Busy")
    log.exception("run failed", exc_info=exc)
    return gr.Error(f"{type(exc).__name__}: {exc}", title="Generation failed")


async def follow_job(studio, request: GenerationRequest, user: str = "local"):
    """Through the job service: yields ("waiting", position), ("step", data), then ("result", job record).
    A failed job raises gr.Error with its reason."""
    try:
        async for event in studio.jobs.follow(request, user):
            if event.kind in ("queued", "position") and event.data.get("position"):
                yield "waiting", event.data["position"]
            elif event.kind == "step":
                yield "step", event.data
            job_id = event.job_id
    except (QueueFull, LimitExceeded) as exc:
        raise user_error(exc) from None
    record = studio.jobs.get(job_id)
    if record.status.value in ("failed", "interrupted"):
        raise gr.Error(record.error or record.status.value, title="Generation failed")
    yield "result", record
