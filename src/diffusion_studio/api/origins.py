"""Which web origins may read the studio's answers in a browser (CORS), on every route: ours, Gradio's, and
whatever is mounted later. One ASGI middleware, outermost, decides for all of them.

Why it is needed: Gradio's own CORS middleware (gradio/route_utils.CustomCORSMiddleware) protects only a studio
reached as localhost/127.0.0.1/0.0.0.0; reached by any other name (a LAN address, a container's, 127.0.0.2) it
answers every `Origin` (also `null` and other localhost ports) with `Access-Control-Allow-Origin: <that origin>`
and `Allow-Credentials: true`, on its routes and, being mounted at `/`, on every path the API routers don't
answer, preflights for /api/v1 included. A page anywhere could then read a signed-in user's config, images and
results with their cookie.

The policy here: a preflight (OPTIONS with `Access-Control-Request-Method`) is answered before anything else runs
(preflights carry no credentials, so the access gate would refuse them): 200 with the methods and the requested
headers for an allowed origin, 403 without any CORS header for any other. Every other answer has whatever CORS
headers the app behind set removed, and gets `Allow-Origin` + `Allow-Credentials` only for an allowed origin.
Allowed: the studio's own origin (the request's scheme and `Host`, which a browser never preflights or needs
headers for, but may name in `Origin`) and exactly the `allowed_origins` of the config. A WebSocket handshake is
outside CORS (browsers open it from any page, with the user's cookies), so one from a foreign origin is refused;
programs send no `Origin` and are not affected.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, Response

ALLOWED_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
EXPOSED_HEADERS = "Content-Disposition, Retry-After"  # read by clients; not on the CORS-safelisted list
PREFLIGHT_MAX_AGE_S = 600
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
WEB_SCHEMES = {"ws": "http", "wss": "https"}  # a WebSocket's scope scheme -> the page's


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a serialized origin, lower case, default port filled in; None for `null`, a path,
    or anything else that is not scheme://host[:port]."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:  # a port that is not a number, a malformed IPv6 literal
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path or parts.query or parts.fragment or \
            parts.username is not None or parts.password is not None:
        return None
    return WEB_SCHEMES.get(scheme, scheme), parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def own_origin(scope) -> tuple[str, str, int] | None:
    """The studio's origin as this request reached it: its scheme and `Host` header."""
    host = Headers(scope=scope).get("host")
    scheme = scope.get("scheme", "http")
    return origin_key(f"{scheme}://{host}") if host else None


class OriginPolicy:
    """ASGI middleware: CORS for exactly the studio's own origin and `allowed_origins`; see the module docstring."""

    def __init__(self, app, allowed_origins: Iterable[str] = ()):
        self.app = app
        self.allowed = {key for origin in allowed_origins if (key := origin_key(origin)) is not None}

    def allows(self, origin: str, scope) -> bool:
        key = origin_key(origin)
        return key is not None and (key in self.allowed or key == own_origin(scope))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if scope["type"] == "websocket":
            if origin is not None and not self.allows(origin, scope):
                return await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
            return await self.app(scope, receive, send)
        if origin is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await self._preflight(scope, receive, send, headers, origin)
        allowed = origin is not None and self.allows(origin, scope)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name in {key for key in response_headers if key.startswith("access-control-")}:
                    del response_headers[name]  # the app's own CORS answer (Gradio's echoes any origin)
                if allowed:
                    response_headers["Access-Control-Allow-Origin"] = origin
                    response_headers["Access-Control-Allow-Credentials"] = "true"
                    response_headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
                if allowed or self.allowed:  # the answer depends on the Origin: caches must keep them apart
                    add_vary_origin(response_headers)
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, scope, receive, send, headers: Headers, origin: str) -> None:
        if not self.allows(origin, scope):
            refusal = JSONResponse({"detail": f"origin {origin} may not call this studio from a browser: only its "
                                              "own origin and those in the config's allowed_origins may (e.g. "
                                              "allowed_origins = [\"https://app.example.com\"])", "field": "Origin"},
                                   status_code=403, headers={"Vary": "Origin"})
            return await refusal(scope, receive, send)
        answer = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
                  "Access-Control-Allow-Methods": ALLOWED_METHODS, "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
                  "Vary": "Origin"}
        if requested := headers.get("access-control-request-headers"):
            answer["Access-Control-Allow-Headers"] = requested
        if headers.get("access-control-request-private-network") == "true":  # an https page calling a LAN studio
            answer["Access-Control-Allow-Private-Network"] = "true"
        await Response(status_code=200, headers=answer)(scope, receive, send)


def add_vary_origin(headers: MutableHeaders) -> None:
    """`Vary: Origin` once, keeping the other Vary names (Gradio's own may already say Origin)."""
    names = [name.strip() for name in headers.get("vary", "").split(",") if name.strip()]
    if not any(name == "*" or name.lower() == "origin" for name in names):
        headers["Vary"] = ", ".join([*names, "Origin"])
