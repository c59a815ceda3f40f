"""/api/v1: thin routes over the Studio's services. Each turns HTTP into one service call; domain errors map to
HTTP codes in one place (`install_error_handlers`)."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import zipfile
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ..engine.metadata import HashLookup, hash_report, png_parameters, read_png_text
from ..engine.library import KINDS, Kind
from ..requests import GenerationRequest, RequestError, decode_image, describe_validation_error, image_to_base64
from ..service.jobs import JobEvent, JobNotFound, QueueFull
from ..service.limits import LimitExceeded
from ..service.outcomes import StudioError, classify
from ..service.store import JobRecord
from ..studio import Studio
from .access import current_user, require_admin
from .bodies import ERROR_RESPONSES, ErrorBody, error_response, json_body, json_object
from .uploads import receive_model_upload


class JobCreated(BaseModel):
    id: str
    status: str
    position: int | None


class PngInfoBody(BaseModel):
    image: str = Field(description="base64 PNG (or a data URL)")


class ImportBody(BaseModel):
    """Import a model file that is already on the server (admin only): it is copied, the original stays."""

    model_config = {"extra": "forbid"}

    path: str = Field(description="the model file on the server (.safetensors, or a weights-only .ckpt/.pt/.bin)")
    name: str | None = Field(None, description="its name in the studio (default: the file name without suffix); "
                                               "'/' makes a sub-folder")
    kind: Kind | None = Field(None, description="what it must be; refused if the file is something else")
    replace: bool = Field(False, description="replace a model of that name (never one that is loaded or in use)")


IMPORT_BODY = json_body(ImportBody, ("multipart/form-data", {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "name": {"type": "string"},
        "kind": {"type": "string", "enum": list(KINDS)}, "replace": {"type": "boolean"}}}}))
IMPORT_RESPONSES = {409: {"model": ErrorBody, "description": "The name exists (send replace), or that model is "
                                                             "loaded or in use"},
                    403: {"model": ErrorBody, "description": "Only an admin may import models"}}
TRUE = ("1", "true", "yes", "on")


async def import_from(request: Request, studio: Studio) -> dict[str, Any]:
    """A multipart upload (streamed to the data dir, its first bytes checked as they arrive) or JSON {"path"}; the
    header is read and the kind detected before anything lands in the models folder."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        upload = await receive_model_upload(request, studio.config.data_dir / "imports",
                                            studio.config.limits.max_model_upload_bytes)
        try:
            kind = upload.fields.get("kind") or None
            if kind is not None and kind not in KINDS:
                raise RequestError("kind", f"'{kind}' is not a kind; kinds: {', '.join(KINDS)}")
            return await asyncio.to_thread(
                studio.import_model, upload.path, file_name=upload.file_name, name=upload.fields.get("name") or None,
                kind=kind, replace=upload.fields.get("replace", "").lower() in TRUE, move=True)
        finally:
            upload.path.unlink(missing_ok=True)
    try:
        body = ImportBody.model_validate(await json_object(request))
    except ValidationError as exc:
        raise RequestError("body", describe_validation_error(exc)) from None
    try:
        path = Path(body.path).expanduser()
        found = path.is_file()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, an unknown ~user
        found = False
    if not found:
        raise RequestError("path", f"'{Path(body.path).name}' is not a file on the server")
    return await asyncio.to_thread(studio.import_model, path, name=body.name, kind=body.kind, replace=body.replace,
                                   field="path")


PNG_INFO_BODY = json_body(PngInfoBody, ("multipart/form-data", {"schema": {
    "type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}}}))


def job_json(studio: Studio, job: JobRecord) -> dict[str, Any]:
    parameters = {k: v for k, v in job.request.items() if not k.endswith("_image")}
    return {"id": job.id, "status": job.status.value, "position": studio.jobs.position(job.id),
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "error": job.error.as_dict() if job.error else None, "request": parameters, "result": job.result,
            "images": [f"/api/v1/images/{image_id}" for image_id in job.result.get("image_ids", [])]}


def event_json(event: JobEvent) -> dict[str, Any]:
    data = dict(event.data)
    if data.get("preview") is not None:
        data["preview"] = image_to_base64(data["preview"])
    if event.outcome is not None:
        data["outcome"] = event.outcome.as_dict()
    return {"kind": event.kind, "job_id": event.job_id, **data}


def error_json(exc: BaseException) -> dict[str, Any]:
    """An error as a WebSocket message: the same kind, field and text as the HTTP error body."""
    error = classify(exc)
    return {"kind": "error", "error": error.kind.value, "field": error.field, "detail": error.text()}


async def png_info_of(request: Request, max_pixels: int,
                      lookup: Callable[[], HashLookup] | None = None) -> dict[str, Any]:
    """Parameters and text chunks of a PNG sent as multipart `file` or JSON {"image": base64}, decoded by the same
    safe decoder as generation inputs. An A1111 PNG's hashes name the local models found by `lookup` (which reads
    the models folders, so the parsing runs off the event loop); `model_found` says whether its checkpoint is
    here (None: the PNG names no hash)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form()
        except (MultiPartException, StarletteHTTPException) as exc:  # Starlette reports some as HTTP 400
            reason = getattr(exc, "message", None) or getattr(exc, "detail", "")
            raise RequestError("body", f"is not a readable multipart form ({reason})") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestError("file", "is missing: send the PNG as the multipart field 'file', or JSON "
                                       "{\"image\": base64}")
        data: Any = await upload.read()
    else:
        data = PngInfoBody.model_validate(await json_object(request)).image
    try:
        image = decode_image(data, max_pixels)
    except ValueError as exc:
        raise RequestError("image", str(exc)) from None
    text = read_png_text(image)
    try:
        parsed, matches = await asyncio.to_thread(png_parameters, image, lookup() if lookup else None)
        parameters = parsed.parameters()
    except ValidationError as exc:
        raise RequestError("image", f"carries parameters that are not valid: {describe_validation_error(exc)}") \
            from None
    except ValueError as exc:
        raise RequestError("image", str(exc)) from None
    return {"parameters": parameters, "text": text, **hash_report(matches)}


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["jobs"], responses=ERROR_RESPONSES)

    @router.post("/jobs", status_code=202, response_model=JobCreated, operation_id="create_job",
                 openapi_extra=json_body(GenerationRequest))
    async def create_job(request: Request, priority: int = Query(0, ge=-10, le=10),
                         user: str = Depends(current_user)) -> JobCreated:
        """Queue a generation (any mode; images as base64). Returns at once with the job id."""
        body = await json_object(request)
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

    @router.get("/jobs/{job_id}/events", operation_id="job_events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}, "description": "The job's events"}})
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
                    if event.final:
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
                    if event.final:
                        return
            finally:
                studio.jobs.unsubscribe(job_id, events)

        def follow(job_id: str, events: asyncio.Queue) -> None:
            task = asyncio.create_task(forward(job_id, events))
            forwarders.add(task)
            task.add_done_callback(forwarders.discard)

        try:
            while True:
                text = await socket.receive_text()
                try:
                    message = json.loads(text)
                    if not isinstance(message, dict):
                        raise RequestError("message", "must be a JSON object with an 'action'")
                    action = message.get("action")
                    if action == "submit":
                        events: asyncio.Queue = asyncio.Queue()
                        priority = message.get("priority", 0)
                        if not isinstance(priority, int) or not -10 <= priority <= 10:
                            raise RequestError("priority", "must be an integer between -10 and 10")
                        job = await studio.jobs.submit(studio.validate(message.get("request") or {}), user,
                                                       priority, listener=events)
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
                except json.JSONDecodeError:
                    await send(error_json(RequestError("message", "is not JSON")))
                except Exception as exc:  # every failure is a message on the socket, which stays open
                    await send(error_json(exc))
        except WebSocketDisconnect:
            pass  # jobs go on; the client can subscribe again from a new socket
        finally:
            for task in list(forwarders):
                task.cancel()

    @router.get("/history", tags=["history"], operation_id="history")
    def history(prompt: str | None = None, mode: str | None = None, model: str | None = None,
                since: float | None = None, until: float | None = None, limit: int = Query(50, ge=1, le=500),
                offset: int = Query(0, ge=0), user: str = Depends(current_user)) -> list[dict]:
        """This user's jobs, newest first; search by prompt, filter by mode, model and time (unix seconds)."""
        jobs = studio.history(user, prompt=prompt, mode=mode, model=model, since=since, until=until,
                              limit=limit, offset=offset)
        return [job_json(studio, job) for job in jobs]

    @router.delete("/jobs/{job_id}", tags=["history"], operation_id="delete_job")
    def delete_job(job_id: str, user: str = Depends(current_user)) -> dict:
        """Remove a finished job from the history, with its image files."""
        return {"deleted": job_id, "files": studio.delete_job(job_id, user)}

    @router.get("/history/export", tags=["history"], operation_id="export_history",
                response_class=StreamingResponse,
                responses={200: {"content": {"application/zip": {}}, "description": "PNGs and history.json"}})
    def export_history(prompt: str | None = None, mode: str | None = None, model: str | None = None,
                       user: str = Depends(current_user)) -> StreamingResponse:
        """This user's (filtered) history as a zip: the PNGs (parameters inside) and history.json."""
        jobs = studio.history(user, prompt=prompt, mode=mode, model=model, limit=100_000)
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

    @router.get("/images/{image_id}", tags=["history"], operation_id="get_image", response_class=FileResponse,
                responses=PNG_RESPONSE)
    def get_image(image_id: str, user: str = Depends(current_user)) -> FileResponse:
        """A generated PNG, with its parameters in its metadata."""
        return FileResponse(studio.image_path(image_id, user), media_type="image/png")

    @router.post("/images/{image_id}/share", tags=["history"], operation_id="share_image")
    def share_image(image_id: str, user: str = Depends(current_user)) -> dict:
        """An unguessable link that opens this one image without an account."""
        return {"url": studio.share_link(image_id, user)}

    @router.get("/models", tags=["models"], operation_id="list_models")
    def models(kind: Kind | None = Query(None, description="only this kind"),
               user: str = Depends(current_user)) -> dict:
        """Every model the studio knows, of every kind (or one): built-ins, configured ones and the models folders'
        (usable or not, with the reason), and which are loaded now. Paths are relative to their models folder.
        LoRAs trained here by other users are not listed (nor usable) unless the caller is an admin."""
        return {"available": studio.models(kind, user), "loaded": studio.loaded_models(user)}

    @router.post("/models", tags=["models"], operation_id="import_model", status_code=201,
                 openapi_extra=IMPORT_BODY, responses=IMPORT_RESPONSES)
    async def import_model(request: Request, admin: str = Depends(require_admin)):
        """Import a model (admin only): a multipart upload (`file`, optional `name`, `kind`, `replace`) or JSON
        {"path": a file on the server, ...}. Its header says what it is before anything is written; it lands in
        the studio's own models folder, in its kind's folder, and is listed at once (the new row is returned)."""
        return JSONResponse(await import_from(request, studio), status_code=201)

    @router.post("/models/refresh", tags=["models"], operation_id="refresh_models")
    def refresh_models(kind: Kind | None = Query(None, description="only this kind in the answer"),
                       user: str = Depends(current_user)) -> dict:
        """Read the models folders again (files added, removed or changed in place), then list them."""
        studio.refresh_models()
        return {"available": studio.models(kind, user), "loaded": studio.loaded_models(user)}

    @router.post("/models/{name:path}/unload", tags=["models"], operation_id="unload_model")
    def unload(name: str, admin: str = Depends(require_admin)) -> dict:
        """Free a loaded model's memory (refused while a job uses it). Admin only."""
        return {"name": name, "unloaded": studio.unload_model(name)}

    @router.get("/queue", tags=["system"], operation_id="queue_status")
    def queue_status(user: str = Depends(current_user)) -> dict:
        """The shared queue: waiting and running jobs, whether it is paused, how it batches."""
        return studio.queue_status(user)

    @router.post("/queue/pause", tags=["system"], operation_id="pause_queue")
    async def pause_queue(admin: str = Depends(require_admin)) -> dict:
        """Running jobs finish; queued ones wait until resume. Admin only."""
        await studio.jobs.pause()
        return studio.jobs.status()

    @router.post("/queue/resume", tags=["system"], operation_id="resume_queue")
    async def resume_queue(admin: str = Depends(require_admin)) -> dict:
        await studio.jobs.resume()
        return studio.jobs.status()

    @router.post("/png-info", tags=["history"], operation_id="png_info", openapi_extra=PNG_INFO_BODY)
    async def png_info(request: Request) -> dict:
        """Parameters of a PNG (ours or A1111's): upload it as multipart `file`, or send {"image": base64}."""
        return await png_info_of(request, studio.config.limits.max_input_pixels, studio.hash_lookup)

    return router


PNG_RESPONSE = {200: {"content": {"image/png": {}}, "description": "The PNG, parameters in its metadata"}}


def build_share_router(studio: Studio) -> APIRouter:
    router = APIRouter(tags=["history"], responses={404: ERROR_RESPONSES[404]})

    @router.get("/share/{token}", operation_id="shared_image", response_class=FileResponse, responses=PNG_RESPONSE)
    def shared_image(token: str) -> FileResponse:
        """One shared image; public by design (the token is the permission)."""
        return FileResponse(studio.shared_image_path(token), media_type="image/png")

    return router


# Errors that reach a route: rendered from the outcome table (service/outcomes.py), never a stack trace.
HANDLED = (StudioError, RequestError, ValidationError, JobNotFound, LimitExceeded, QueueFull, OSError,
           sqlite3.Error, MemoryError)


def install_error_handlers(app: FastAPI) -> None:
    """Domain exceptions -> HTTP, in one place. Messages name the field; never a stack trace."""

    async def render(_, exc: Exception):
        return error_response(exc)

    for kind in HANDLED:
        app.add_exception_handler(kind, render)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(_, exc: RequestValidationError):  # FastAPI's own checks of query/path values
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return error_response(RequestError(where, first.get("msg", "is invalid")))

    app.add_exception_handler(Exception, render)  # anything else: internal, logged by the server
