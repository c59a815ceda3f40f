"""The server's composition root: one FastAPI app with the API routers, the access gate, the origin policy (CORS
for the studio's own origin and allowed_origins only), the owners of Gradio's files, /metrics and /health, /docs
and /redoc (offline), the metrics sampler behind the System charts, and the Gradio page (ui/) mounted at the root
path. The only module that knows both api/ and ui/.

Nothing here needs diffusers or transformers: the engine imports them on first use, and the server in the
background a moment after it starts answering (see IMPORT_LIBRARIES_AFTER_S), so a cold start waits only for
Gradio, FastAPI, torch and the page's build."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path

import gradio as gr
import gradio.utils as gradio_utils
from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from .api.a1111 import build_router as build_a1111_router
from .api.access import AccessControl, build_login_router
from .api.bodies import BodyLimit, add_body_schemas
from .api.docs import install_docs
from .api.gradio_files import FileOwners, RemoteInputs
from .api.openai_images import build_router as build_openai_router
from .api.origins import OriginPolicy
from .api.routes import build_router, build_share_router, install_error_handlers
from .config import StudioConfig, is_loopback
from .engine import import_libraries
from .requests import RequestError
from .studio import Studio
from .ui.app import CSS, PAGE_JS, THEME, build_blocks


log = logging.getLogger(__name__)

# The engine's libraries are imported this long after start-up, in the background: by then the first page has been
# served (the start does not wait for them), and a first job seldom comes sooner (it would import what it needs).
IMPORT_LIBRARIES_AFTER_S = 2.0


def import_engine_libraries() -> None:
    try:
        import_libraries()
    except Exception:  # noqa: BLE001 (the first model load will import them again and report what fails)
        log.warning("could not import the engine's libraries ahead of the first job", exc_info=True)


class Health(BaseModel):
    status: str  # "ok" | "degraded"
    reasons: list[str] = []
    device: str | None = None
    loaded: list[dict] | None = None


def build_app(config: StudioConfig, studio: Studio | None = None) -> FastAPI:
    studio = studio or Studio(config)
    users = studio.users
    if users is not None and not users.names():
        raise RequestError("auth", f"auth is required (host {config.host}, auth={config.auth}) but "
                                   f"{config.users_path()} has no users: add one with `diffusion-studio users add "
                                   "NAME`")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await studio.jobs.start()  # on the server's own event loop
        sampler = asyncio.create_task(studio.jobs.metrics.keep_sampling(), name="metrics-sampler")  # System charts
        retention = asyncio.create_task(studio.retention.run(), name="history-retention")  # warns; prunes if on
        # A daemon thread: a stop never waits for an import under way.
        libraries = threading.Timer(IMPORT_LIBRARIES_AFTER_S, import_engine_libraries)
        libraries.daemon = True
        libraries.start()
        try:
            yield
        finally:
            libraries.cancel()
            sampler.cancel()
            retention.cancel()
            await asyncio.gather(sampler, retention, return_exceptions=True)
            await studio.jobs.stop()

    app = FastAPI(title="Diffusion Studio", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.studio = studio
    # Folders Gradio may serve files from, so that the UI can return them (it hands the page copies in its cache).
    private_dirs = [studio.outputs_dir, Path(config.data_dir) / "training"]
    # Middleware runs outermost-last-added: OriginPolicy > AccessControl > BodyLimit > FileOwners > RemoteInputs >
    # the routes.
    # Innermost, so it knows the caller: Gradio's file routes serve each user only their own history images.
    app.add_middleware(RemoteInputs)  # nor may an event's file input be a URL for the studio to fetch
    app.add_middleware(FileOwners, private_dirs=private_dirs, owner_of=studio.store.image_owner,
                       gradio_cache_dir=gradio_utils.get_upload_folder())
    # Before any route reads a body (the gate reads none, and refuses strangers before theirs is read). Gradio's
    # upload route carries the Models panel's imports (GBs): the model-upload limit there is for admins only
    # (importing is theirs); anyone else's uploads (images, datasets) have max_body_bytes.
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_body_bytes,
                       route_limits={("POST", "/gradio_api/upload"): config.limits.max_model_upload_bytes},
                       trusted=lambda scope: scope.get("state", {}).get("admin", False))
    app.add_middleware(AccessControl, users=users, login_max_failures=config.login_max_failures,
                       login_address_max_failures=config.login_address_max_failures,
                       login_window_s=config.login_window_s, login_lockout_s=config.login_lockout_s)
    # Outermost: answers preflights before the access gate (they carry no credentials) and takes every other
    # CORS header off the answers, Gradio's echo of any Origin included.
    # Outermost also because a studio on loopback without auth must refuse other Host names (DNS rebinding).
    app.add_middleware(OriginPolicy, allowed_origins=config.allowed_origins,
                       loopback_only=users is None and is_loopback(config.host))
    app.include_router(build_login_router(users))
    app.include_router(build_router(studio))
    app.include_router(build_share_router(studio))
    app.include_router(build_a1111_router(studio))
    app.include_router(build_openai_router(studio))
    install_error_handlers(app)
    install_docs(app)  # /docs and /redoc with local assets: no CDN

    @app.get("/metrics", tags=["system"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    def metrics() -> Response:
        """Prometheus: jobs by outcome, errors by kind, queue wait / load / step / job time, it/s, memory,
        queue length, running jobs, worker restarts, storage faults (and GPU utilisation where nvidia-ml-py finds
        a GPU)."""
        return Response(studio.jobs.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", tags=["system"], response_model=Health,
             responses={503: {"model": Health, "description": "degraded: the reasons say why"}})
    async def health(request: Request) -> JSONResponse:
        """Public for probes: 200 ok, or 503 degraded while the data dir can't be written or a worker is down
        (the reasons say which). Device and loaded models only for a signed-in caller."""
        state = await studio.jobs.health()
        if request.state.user is not None:
            state |= {"device": studio.device, "loaded": await asyncio.to_thread(studio.loaded_models,
                                                                              request.state.user)}
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = add_body_schemas(get_openapi(title=app.title, version=app.version,
                                                              routes=app.routes), config.limits)
        return app.openapi_schema

    app.openapi = openapi

    studio.outputs_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(studio, studio.is_admin)
    # Gradio's mount sets the page's css and js itself (the Blocks' own would be overwritten): they go here.
    app = gr.mount_gradio_app(app, blocks, path="/", theme=THEME, css=CSS, js=PAGE_JS,
                              allowed_paths=[str(folder) for folder in private_dirs], footer_links=["api", "settings"],
                              max_file_size=config.limits.max_model_upload_bytes,
                              auth_dependency=lambda request: request.state.user)
    # Gradio checks the files named in an event's inputs (they must be uploads, in its cache) only once its Blocks
    # has launched, which a mounted one never does: without this, any caller could name any file on the server as
    # an image or file input (PNG info would read alice's prompt from her image's path, training would copy it).
    blocks.has_launched = True
    return app
