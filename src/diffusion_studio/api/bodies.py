"""Request bodies and errors at the HTTP edge, the same for every route: a size limit before anything is read,
one JSON-object parser whose refusals name the body, one renderer from outcome kinds to HTTP responses, and the
OpenAPI declarations (request bodies by their models, error responses) that let clients and fuzzers know them."""

from __future__ import annotations

import json
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ..config import Limits
from ..requests import RequestError
from ..service.outcomes import ErrorKind, JobError, StudioError, classify


class ErrorBody(BaseModel):
    """Every error response: `detail` for a person, `kind` from the outcome table, `field` when input is at fault."""

    detail: str
    kind: str
    field: str | None = None


def error_response(exc: BaseException) -> JSONResponse:
    error = classify(exc)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    body = ErrorBody(detail=error.text(), kind=error.kind.value, field=error.field)
    return JSONResponse(body.model_dump(), status_code=error.http_status, headers=headers)


# What each error status means on the API routes; the kinds behind each are in service/outcomes.KINDS.
ERROR_DESCRIPTIONS: dict[int, str] = {
    404: "No such job or image (another user's reads as missing)",
    413: "The body is larger than limits.max_body_bytes",
    422: "Invalid input; `field` names it",
    429: "Rate limit, active-job limit or a full queue; see Retry-After",
    500: "A fault of the studio's (internal, model_load)",
    503: "Storage unavailable, out of memory, interrupted; see Retry-After",
    504: "The job ran past the time limit",
}


def error_responses(model: type[BaseModel] | None = None, changes: dict[int, str | None] | None = None
                    ) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses, each body in `model`'s shape (the studio's ErrorBody unless an
    API speaks another's); `changes` adds, rewords or (None) drops statuses."""
    descriptions = {**ERROR_DESCRIPTIONS, **(changes or {})}
    return {status: {"model": model or ErrorBody, "description": text}
            for status, text in sorted(descriptions.items()) if text is not None}


ERROR_RESPONSES = error_responses()


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a RequestError naming `body` and what is wrong with it."""
    raw = await request.body()
    if not raw.strip():
        raise RequestError("body", "is empty; send a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("body", "is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as exc:
        raise RequestError("body", f"is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise RequestError("body", f"must be a JSON object, not {type(data).__name__.replace('dict', 'object')}")
    return data


# Routes that bound their own bodies: a model import streams GBs to disk under limits.max_model_upload_bytes
# (api/uploads.py), checking its first bytes as they arrive.
OWN_LIMIT_ROUTES = frozenset({("POST", "/api/v1/models")})


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is refused with 413 before it is parsed; by its Content-Length
    when it has one, else as soon as the bytes read pass the limit. `OWN_LIMIT_ROUTES` are left to their own;
    `route_limits` gives (method, path) routes a limit of their own (e.g. Gradio's upload, for the Models panel's
    import: {("POST", "/gradio_api/upload"): limits.max_model_upload_bytes}), for callers `trusted(scope)` says
    may have them (e.g. admins: anyone else could fill the disk 20 GB at a time); others get `max_bytes`."""

    def __init__(self, app, max_bytes: int, route_limits: dict[tuple[str, str], int] | None = None,
                 trusted: Callable[[dict], bool] = lambda scope: True):
        self.app = app
        self.max_bytes = max_bytes
        self.route_limits = dict(route_limits or {})
        self.trusted = trusted

    async def __call__(self, scope, receive, send):
        route = (scope.get("method"), scope.get("path", "").rstrip("/"))
        if scope["type"] != "http" or route in OWN_LIMIT_ROUTES:
            return await self.app(scope, receive, send)
        own_limit = route in self.route_limits and self.trusted(scope)
        max_bytes = self.route_limits[route] if own_limit else self.max_bytes
        setting = "this route's limit" if own_limit else "limits.max_body_bytes"
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            response = error_response(self._too_large(max_bytes, setting))
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise self._too_large(max_bytes, setting)
            return message

        await self.app(scope, counted, send)

    @staticmethod
    def _too_large(max_bytes: int, setting: str) -> StudioError:
        return StudioError(JobError(ErrorKind.too_large, f"the request body is larger than the studio's limit of "
                                                         f"{max_bytes} bytes ({setting})", "body"))


# -- OpenAPI --------------------------------------------------------------------------------------------------
_BODY_MODELS: dict[str, type[BaseModel]] = {}


def json_body(model: type[BaseModel], *more: tuple[str, dict]) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON body of `model` (routes parse it themselves, with `json_object`, so bad
    bodies get the studio's own errors); `more`: other (content type, schema) pairs the route accepts."""
    _BODY_MODELS[model.__name__] = model
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    content.update(dict(more))
    return {"requestBody": {"required": True, "content": content}}


def add_body_schemas(schema: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Put the models named by `json_body` (and the models they use) into the document's components, with this
    studio's configured limits on a GenerationRequest's sizes, steps, batch and prompts."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, model in _BODY_MODELS.items():
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[name] = model_schema
    if "GenerationRequest" in components:
        _document_limits(components["GenerationRequest"]["properties"], limits)
    return schema


def _document_limits(properties: dict[str, Any], limits: Limits) -> None:
    bounds = {"width": {"maximum": limits.max_width, "multipleOf": 8},
              "height": {"maximum": limits.max_height, "multipleOf": 8},
              "steps": {"maximum": limits.max_steps}, "batch_size": {"maximum": limits.max_batch_size},
              "prompt": {"maxLength": limits.max_prompt_chars},
              "negative_prompt": {"maxLength": limits.max_prompt_chars}}
    for name, bound in bounds.items():
        for branch in properties[name].get("anyOf", [properties[name]]):
            if branch.get("type") in ("integer", "string"):
                branch.update(bound)
