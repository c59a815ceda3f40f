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

CORS only keeps a foreign page from reading answers; a form or a `text/plain` fetch from one is still sent, with
the user's cookie (SameSite=Lax lets it through from another port of the same host). So a request that changes
something (any method but GET/HEAD/OPTIONS) naming a foreign `Origin` is refused before it reaches the app: a
page elsewhere can't queue jobs, log a user in or import a model in the user's name (Django's CSRF origin check
does the same).

A studio on loopback without auth trusts every caller, so it must answer only callers on this machine: a page on
evil.example whose name is made to resolve to 127.0.0.1 (DNS rebinding) reaches it as a same-origin caller. So
there, a request whose `Host` is not a loopback name (localhost, 127.x.x.x, [::1]) is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, Response

from ..config import is_loopback

ALLOWED_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}  # change nothing, so a foreign page may send them (it can't read them)
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


def is_own(key: tuple[str, str, int], scope) -> bool:
    """Whether an origin is the studio's own as this request reached it. A `Host` without a port stands for the
    origin scheme's default, so a TLS-terminating proxy that keeps the Host header (https://studio.example in the
    browser, plain http behind the proxy) still matches; with a port, scheme, host and port must all match."""
    host = Headers(scope=scope).get("host")
    if not host:
        return False
    reached = own_origin(scope)
    if reached is not None and reached == key:
        return True
    portless = origin_key(f"{key[0]}://{host}")
    return portless is not None and ":" not in host.rsplit("]", 1)[-1] and portless == key


def is_loopback_host(host: str | None) -> bool:
    """`Host` names this machine only: localhost (or a name under it), 127.x.x.x, [::1]."""
    key = origin_key(f"http://{host}") if host else None
    if key is None:
        return False
    name = key[1].strip("[]")
    return name.endswith(".localhost") or is_loopback(name)  # the rule auth="auto" uses for the listening host


class OriginPolicy:
    """ASGI middleware: CORS for exactly the studio's own origin and `allowed_origins`; see the module docstring."""

    def __init__(self, app, allowed_origins: Iterable[str] = (), loopback_only: bool = False):
        """`loopback_only`: answer only requests whose Host is a loopback name (a studio on loopback without
        auth)."""
        self.app = app
        self.allowed = {key for origin in allowed_origins if (key := origin_key(origin)) is not None}
        self.loopback_only = loopback_only

    def allows(self, origin: str, scope) -> bool:
        key = origin_key(origin)
        return key is not None and (key in self.allowed or is_own(key, scope))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if self.loopback_only and not is_loopback_host(headers.get("host")):
            return await self._refuse(scope, receive, send, 400, "Host", f"this studio answers only as localhost, "
                                      f"127.x.x.x or [::1] (it runs without auth on loopback), not as "
                                      f"'{headers.get('host', '')[:100]}'")
        if scope["type"] == "websocket":
            if origin is not None and not self.allows(origin, scope):
                return await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
            return await self.app(scope, receive, send)
        if origin is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await self._preflight(scope, receive, send, headers, origin)
        allowed = origin is not None and self.allows(origin, scope)
        if origin is not None and not allowed and scope["method"] not in SAFE_METHODS:
            return await self._refuse(scope, receive, send, 403, "Origin", f"a page of {origin[:100]} may not "
                                      f"send {scope['method']} requests to this studio: only its own pages and the "
                                      "config's allowed_origins may (behind a proxy that changes the Host, add "
                                      "the public origin there, e.g. allowed_origins = "
                                      "[\"https://studio.example.com\"])")

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

    @staticmethod
    async def _refuse(scope, receive, send, status: int, field: str, detail: str) -> None:
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        refusal = JSONResponse({"detail": detail, "kind": "invalid_request", "field": field}, status_code=status,
                               headers={"Vary": "Origin"})
        await refusal(scope, receive, send)

    async def _preflight(self, scope, receive, send, headers: Headers, origin: str) -> None:
        if not self.allows(origin, scope):
            return await self._refuse(scope, receive, send, 403, "Origin", f"origin {origin[:100]} may not call "
                                      "this studio from a browser: only its own origin and those in the config's "
                                      "allowed_origins may (e.g. allowed_origins = [\"https://app.example.com\"])")
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
