"""/api/v1: thin routes over the Studio's services. Each turns HTTP into one service call; domain errors map to
HTTP codes in one place (`install_error_handlers`)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import zipfile
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, ValidationError

from ..engine.metadata import read_png_text, request_from_png
from .access import current_user, require_admin
from ..requests import RequestError, describe_validation_error, image_to_base64
from ..service.jobs import FINISHED_KINDS, JobEvent, JobNotFound, QueueFull
from ..service.limits import LimitExceeded
from ..service.store import JobRecord
from ..studio import Studio



class JobCreated(BaseModel):
    id: str
    status: str
    position: int | None


class PngInfoBody(BaseModel):
    image: str = Field(description="base64 PNG (or a data URL)")


def job_json(studio: Studio, job: JobRecord) -> dict[str, Any]:
    parameters = {k: v for k, v in job.request.items() if not k.endswith("_image")}
    return {"id": job.id, "status": job.status.value, "position": studio.jobs.position(job.id),
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "error": job.error, "request": parameters, "result": job.result,
            "images": [f"/api/v1/images/{image_id}" for image_id in job.result.get("image_ids", [])]}


def event_json(event: JobEvent) -> dict[str, Any]:
    data = dict(event.data)
    if data.get("preview") is not None:
        data["preview"] = image_to_base64(data["preview"])
    return {"kind": event.kind, "job_id": event.job_id, **data}


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["jobs"])

    @router.post("/jobs", status_code=202, response_model=JobCreated, operation_id="create_job")
    async def create_job(request: Request, priority: int = Query(0, ge=-10, le=10),
                         user: str = Depends(current_user)) -> JobCreated:
        """Queue a generation (any mode; images as base64). Returns at once with the job id."""
        body = await request.json()
        job = await studio.jobs.submit(studio.validate(body), user, priority)
        return JobCreated(id=job.id, status=job.status.value, position=studio.jobs.position(job.id))

    @router.get("/jobs/{job_id}", operation_id="get_job")
    def get_job(job_id: str, user: str = Depends(current_user)) -> dict:
        """State, queue position, timings, seeds and image links of one job."""
        return job_json(studio, studio.jobs.get(job_id, user))

    @router.post("/jobs/{job_id}/cancel", operation_id="cancel_job")
    async def cancel_job(job_id: str, user: str = Depends(current_user)) -> dict:
        """Cancel a queued job, or stop a running one within one step."""
        return job_json(studio, await studio.jobs.cancel(job_id, user))

    @router.get("/jobs/{job_id}/events", operation_id="job_events")
    async def job_events(job_id: str, user: str = Depends(current_user)) -> StreamingResponse:
        """Server-sent events: queue position, running, each step (with a base64 preview), then the outcome."""
        job = studio.jobs.get(job_id, user)
        events: asyncio.Queue = studio.jobs.subscribe(job_id)

        async def stream():
            try:
                current = studio.jobs.get(job_id, user)
                if current.status.finished:  # already over: say so and end
                    yield f"event: {current.status.value}\ndata: {json.dumps(job_json(studio, current))}\n\n"
                    return
                position = studio.jobs.position(job.id)
                if position:
                    yield f"event: position\ndata: {json.dumps({'position': position})}\n\n"
                while True:
                    event = await events.get()
                    yield f"event: {event.kind}\ndata: {json.dumps(event_json(event), default=str)}\n\n"
                    if event.kind in FINISHED_KINDS:
                        return
            finally:
                studio.jobs.unsubscribe(job_id, events)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @router.websocket("/ws")
    async def websocket(socket: WebSocket) -> None:
        """One socket, many jobs. Send {"action": "submit", "request": {...}, "priority": 0},
        {"action": "subscribe", "job_id": ...} or {"action": "cancel", "job_id": ...}; receive {"kind":
        "accepted"|"position"|"running"|"step"|"done"|"failed"|"cancelled"|"error", "job_id", ...}."""
        user = socket.state.user
        await socket.accept()
        send_lock = asyncio.Lock()
        forwarders: set[asyncio.Task] = set()

        async def send(message: dict) -> None:
            async with send_lock:
                await socket.send_text(json.dumps(message, default=str))

        async def forward(job_id: str, events: asyncio.Queue) -> None:
            try:
                while True:
                    event = await events.get()
                    await send(event_json(event))
                    if event.kind in FINISHED_KINDS:
                        return
            finally:
                studio.jobs.unsubscribe(job_id, events)

        def follow(job_id: str, events: asyncio.Queue) -> None:
            task = asyncio.create_task(forward(job_id, events))
            forwarders.add(task)
            task.add_done_callback(forwarders.discard)

        try:
            while True:
                message = json.loads(await socket.receive_text())
                try:
                    action = message.get("action")
                    if action == "submit":
                        events: asyncio.Queue = asyncio.Queue()
                        job = await studio.jobs.submit(studio.validate(message.get("request") or {}), user,
                                                       int(message.get("priority", 0)), listener=events)
                        await send({"kind": "accepted", "job_id": job.id, "position": studio.jobs.position(job.id)})
                        follow(job.id, events)
                    elif action == "subscribe":
                        job = studio.jobs.get(str(message.get("job_id")), user)
                        if job.status.finished:
                            await send({**job_json(studio, job), "kind": job.status.value, "job_id": job.id})
                        else:
                            follow(job.id, studio.jobs.subscribe(job.id))
                    elif action == "cancel":
                        await studio.jobs.cancel(str(message.get("job_id")), user)
                    else:
                        raise RequestError("action", "must be 'submit', 'subscribe' or 'cancel'")
                except ValidationError as exc:
                    await send({"kind": "error", "detail": describe_validation_error(exc)})
                except (RequestError, QueueFull, LimitExceeded) as exc:
                    await send({"kind": "error", "detail": str(exc)})
                except JobNotFound as exc:
                    await send({"kind": "error", "detail": f"no such job: {exc.args[0]}"})
        except (WebSocketDisconnect, json.JSONDecodeError):
            pass  # jobs go on; the client can subscribe again from a new socket
        finally:
            for task in list(forwarders):
                task.cancel()

    @router.get("/history", tags=["history"], operation_id="history")
    def history(prompt: str | None = None, mode: str | None = None, model: str | None = None,
                since: float | None = None, until: float | None = None, limit: int = Query(50, ge=1, le=500),
                offset: int = Query(0, ge=0), user: str = Depends(current_user)) -> list[dict]:
        """This user's jobs, newest first; search by prompt, filter by mode, model and time (unix seconds)."""
        jobs = studio.store.find(user=user, prompt=prompt, mode=mode, model=model, since=since,
                                 until=until, limit=limit, offset=offset)
        return [job_json(studio, job) for job in jobs]

    @router.delete("/jobs/{job_id}", tags=["history"], operation_id="delete_job")
    def delete_job(job_id: str, user: str = Depends(current_user)) -> dict:
        """Remove a finished job from the history, with its image files."""
        return {"deleted": job_id, "files": studio.delete_job(job_id, user)}

    @router.get("/history/export", tags=["history"], operation_id="export_history")
    def export_history(prompt: str | None = None, mode: str | None = None, model: str | None = None,
                       user: str = Depends(current_user)) -> StreamingResponse:
        """This user's (filtered) history as a zip: the PNGs (parameters inside) and history.json."""
        jobs = studio.store.find(user=user, prompt=prompt, mode=mode, model=model, limit=100_000)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            archive.writestr("history.json", json.dumps([job_json(studio, job) for job in jobs], indent=2))
            for job in jobs:
                for path in studio.image_paths(job.result.get("image_ids", [])):
                    if path.exists():
                        archive.write(path, f"{job.id}/{path.name}")
        buffer.seek(0)
        return StreamingResponse(buffer, media_type="application/zip",
                                 headers={"Content-Disposition": 'attachment; filename="history.zip"'})

    @router.get("/images/{image_id}", tags=["history"], operation_id="get_image")
    def get_image(image_id: str, user: str = Depends(current_user)) -> FileResponse:
        """A generated PNG, with its parameters in its metadata."""
        image = studio.store.image(image_id)
        if image is None or image["user"] != user:
            raise JobNotFound(image_id)
        return FileResponse(image["path"], media_type="image/png")

    @router.post("/images/{image_id}/share", tags=["history"], operation_id="share_image")
    def share_image(image_id: str, user: str = Depends(current_user)) -> dict:
        """An unguessable link that opens this one image without an account."""
        return {"url": studio.share_link(image_id, user)}

    @router.get("/models", tags=["models"], operation_id="list_models")
    def models() -> dict:
        """Every model the studio can use, and which are loaded now."""
        return {"available": studio.models(), "loaded": studio.engine.manager.loaded()}

    @router.post("/models/{name:path}/unload", tags=["models"], operation_id="unload_model")
    def unload(name: str, admin: str = Depends(require_admin)) -> dict:
        """Free a loaded model's memory (refused while a job uses it). Admin only."""
        return {"name": name, "unloaded": studio.engine.manager.unload(name)}

    @router.get("/queue", tags=["system"], operation_id="queue_status")
    def queue_status(user: str = Depends(current_user)) -> dict:
        """The shared queue: waiting and running jobs, whether it is paused, how it batches."""
        return studio.jobs.status()

    @router.post("/queue/pause", tags=["system"], operation_id="pause_queue")
    async def pause_queue(admin: str = Depends(require_admin)) -> dict:
        """Running jobs finish; queued ones wait until resume. Admin only."""
        await studio.jobs.pause()
        return studio.jobs.status()

    @router.post("/queue/resume", tags=["system"], operation_id="resume_queue")
    async def resume_queue(admin: str = Depends(require_admin)) -> dict:
        await studio.jobs.resume()
        return studio.jobs.status()

    @router.post("/png-info", tags=["history"], operation_id="png_info")
    async def png_info(request: Request, file: UploadFile | None = File(None)) -> dict:
        """Parameters of a PNG (ours or A1111's): upload it, or send {"image": base64}."""
        if file is not None:
            data = await file.read()
        else:
            data = base64.b64decode(PngInfoBody.model_validate(await request.json()).image.split(",")[-1])
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError):
            raise RequestError("image", "is not a readable image") from None
        text = read_png_text(image)
        try:
            parameters = request_from_png(image).parameters()
        except ValueError as exc:
            raise RequestError("image", str(exc)) from None
        return {"parameters": parameters, "text": text}

    return router


def build_share_router(studio: Studio) -> APIRouter:
    router = APIRouter(tags=["history"])

    @router.get("/share/{token}", operation_id="shared_image")
    def shared_image(token: str) -> FileResponse:
        """One shared image; public by design (the token is the permission)."""
        image = studio.store.shared_image(token)
        if image is None:
            raise JobNotFound(token)
        return FileResponse(image["path"], media_type="image/png")

    return router


def install_error_handlers(app: FastAPI) -> None:
    """Domain exceptions -> HTTP, in one place. Messages name the field; never a stack trace."""

    @app.exception_handler(ValidationError)
    async def invalid(_, exc: ValidationError):
        return JSONResponse({"detail": describe_validation_error(exc)}, status_code=422)

    @app.exception_handler(RequestError)
    async def bad_request(_, exc: RequestError):
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=422)

    @app.exception_handler(JobNotFound)
    async def not_found(_, exc: JobNotFound):
        return JSONResponse({"detail": f"no such job or image: {exc.args[0]}"}, status_code=404)

    @app.exception_handler(LimitExceeded)
    async def limited(_, exc: LimitExceeded):
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(QueueFull)
    async def busy(_, exc: QueueFull):
        return JSONResponse({"detail": str(exc), "queue_length": exc.length}, status_code=429,
                            headers={"Retry-After": str(exc.retry_after_s)})
