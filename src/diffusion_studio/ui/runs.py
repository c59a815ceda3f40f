"""Follow studio work from a Gradio generator handler, with live events and a cancel path.

UI work goes through the job service like every other client: it queues, is recorded, and lands in the history.
Gradio cancels a generator by closing it; the job service's `follow` turns that into a cancel of the job, so no run
is left going unseen. Errors and outcomes are rendered from the service's outcome table, as on every front end.
"""

from __future__ import annotations

import logging

import gradio as gr

from ..requests import GenerationRequest
from ..service.outcomes import ErrorKind, JobError, Outcome, classify

log = logging.getLogger(__name__)


def error_box(error: JobError) -> gr.Error:
    return gr.Error(error.text(), title=error.info.title)


def user_error(exc: BaseException) -> gr.Error:
    """A message for people: field-named for bad input, a short reason otherwise (details go to the log)."""
    error = classify(exc)
    if error.kind == ErrorKind.internal:
        log.exception("run failed", exc_info=exc)
    return error_box(error)


def failure(outcome: Outcome) -> gr.Error | None:
    """The error to show for an outcome that is neither done nor cancelled by the user."""
    if outcome.ok or outcome.error is None or outcome.error.kind == ErrorKind.cancelled:
        return None
    return error_box(outcome.error)


async def follow_job(studio, request: GenerationRequest, user: str = "local"):
    """Through the job service: yields ("waiting", position), ("step", data), then ("result", outcome).
    A failed job raises gr.Error with its reason."""
    try:
        async for event in studio.jobs.follow(request, user):
            if event.kind in ("queued", "position") and event.data.get("position"):
                yield "waiting", event.data["position"]
            elif event.kind == "step":
                yield "step", event.data
            elif event.final:
                if (error := failure(event.outcome)) is not None:
                    raise error
                yield "result", event.outcome
    except gr.Error:
        raise
    except Exception as exc:  # refused at submit (limits, a full queue, storage): said, not raised as a trace
        raise user_error(exc) from None
