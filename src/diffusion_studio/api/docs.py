"""/docs (Swagger UI) and /redoc (ReDoc) served with the assets fastapi-offline bundles, so both load with no
network: FastAPI's own pages fetch their JavaScript, CSS, favicon (and ReDoc its fonts) from CDNs. Behind the same
access gate as every other route, as before."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, redoc...
ASSETS_URL = "/docs-assets"
# Swagger UI would send the document to validator.swagger.io for its "valid" badge.
SWAGGER_PARAMETERS = {"validatorUrl": None}
# Only this server: ReDoc's sidebar always shows Redocly's logo from cdn.redoc.ly (no option turns it off); the
# browser refuses it (the image hides itself on error), and anything a later asset version fetches from elsewhere.
# Both pages start from inline scripts, and ReDoc styles itself inline and runs its search in a blob: worker.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


def local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add the two pages and their assets to `app`, which must be built with docs_url=None, redoc_url=None."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def assets(request: Request) -> str:
        return request.scope.get("root_path", "") + ASSETS_URL

    @app.get(docs_url, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return local_only(get_swagger_ui_html(openapi_url=root + app.openapi_url, title=f"{app.title} · API",
                                   swagger_js_url=f"{assets(request)}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets(request)}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets(request)}/favicon.png",
                                   oauth2_redirect_url=None, swagger_ui_parameters=SWAGGER_PARAMETERS))

    @app.get(redoc_url, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return local_only(get_redoc_html(openapi_url=root + app.openapi_url, title=f"{app.title} · API",
                              redoc_js_url=f"{assets(request)}/redoc.standalone.js",
                              redoc_favicon_url=f"{assets(request)}/favicon.png", with_google_fonts=False))
