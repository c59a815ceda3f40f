"""Who is calling: one ASGI middleware in front of everything (UI pages, Gradio's API and files, /api/v1,
/sdapi/v1, images, metrics, WebSockets). A caller is a user by an API token (`Authorization: Bearer ...`) or a
login session cookie; anyone else gets 401 (a browser asking for a page is sent to /login). With auth off (a
loopback-only studio) every caller is the single user `local`, who is also the admin. Admin-only routes (queue
pause/resume, model unload) depend on `require_admin`.

Public on purpose: /login, /logout, /health (for probes; it says only that the server is up) and /share/<token>
(one shared image, by its unguessable token).

On /sdapi (A1111's API, whose clients send A1111's --api-auth credentials) HTTP Basic is accepted too: a user name
with that user's password or one of their API tokens; a refusal there says `WWW-Authenticate: Basic`. A Basic
header verified by its password is remembered for a minute (clients send it on every progress poll; a password
check costs a scrypt), and forgotten as soon as the users file changes.

Guessing is throttled (service/throttle.py): wrong passwords on the login form and in Basic headers count against
the client address and the user name, wrong bearer tokens against the address. A locked-out name or address gets
429 with Retry-After and is told for how long; meanwhile even the right password is refused, remembered or not,
while a session or an API token already held keeps working (tokens are 256 random bits: not guessable, so a
lockout has nothing to protect there). A success on the login form forgives the name's failures (not the
address's); a Basic success does not, or a client polling with its password would keep wiping the count of
someone guessing at the same name.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import html
import ipaddress
import json
import time
from http.cookies import SimpleCookie
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ..service.auth import Users
from ..service.throttle import LockedOut, LoginThrottle

SESSION_COOKIE = "ds_session"
LOCAL_USER = "local"
PUBLIC_PATHS = {"/login", "/logout", "/health"}
PUBLIC_PREFIXES = ("/share/",)
BASIC_PREFIX = "/sdapi/"  # where HTTP Basic credentials are accepted, as A1111's --api-auth
BASIC_REMEMBER_S = 60.0
BASIC_REMEMBERED = 256  # verified headers kept at most


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def client_address(scope) -> str:
    """The address failed logins count against: the peer of the connection. Never X-Forwarded-For or the like:
    any client can write those headers, so trusting them would let a guesser pick a fresh address per try. Behind
    a reverse proxy every client has the proxy's address (raise login_address_max_failures there)."""
    client = scope.get("client")
    if not client:
        return "unknown"
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:  # a Unix socket's peer, a test client's name
        return client[0]
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.version == 6:  # one IPv6 client holds a whole /64: a fresh address per guess costs it nothing
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class AccessControl:
    def __init__(self, app, users: Users | None, login_max_failures: int = 5, login_address_max_failures: int = 20,
                 login_window_s: float = 600, login_lockout_s: float = 300):
        self.app = app
        self.users = users  # None: auth off
        # One memory of failures for every way in; the login form finds it in the request's state.
        self.throttle = LoginThrottle(login_max_failures, login_address_max_failures, login_window_s,
                                      login_lockout_s)
        self._verified: dict[str, tuple[str, float, int | None]] = {}  # header digest -> (user, expiry, file mtime)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        public = is_public(scope["path"])
        try:
            user = LOCAL_USER if self.users is None else await self._identify(scope, public)
        except LockedOut as lockout:
            return await self._locked_out(scope, receive, send, lockout)
        if user is None and not public:
            return await self._refuse(scope, receive, send)
        admin = self.users is None or (user is not None and self.users.is_admin(user))
        scope["state"] = {**scope.get("state", {}), "user": user, "admin": admin, "login_throttle": self.throttle}
        await self.app(scope, receive, send)

    async def _identify(self, scope, public: bool) -> str | None:
        """The caller's user, None if anonymous; raises LockedOut when its credentials are refused unchecked or
        their failure locks it out. A public path's answer does not depend on the caller, so a wrong token there
        tells a guesser nothing and is not counted."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token:
            user = self.users.user_for_token(token.strip())
            if user is None and not public:
                self.throttle.failed(client_address(scope))
            return user
        if scheme.lower() == "basic" and token and scope["path"].startswith(BASIC_PREFIX):
            return await self._basic_user(token.strip(), client_address(scope))
        cookie = SimpleCookie(headers.get("cookie", ""))
        if SESSION_COOKIE in cookie:
            return self.users.user_for_session(cookie[SESSION_COOKIE].value)
        return None

    async def _basic_user(self, credentials: str, address: str) -> str | None:
        """The user of a Basic header: a user name and that user's API token or password (the password's scrypt
        runs off the event loop: it takes tens of milliseconds)."""
        try:
            name, colon, secret = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # not base64, or not UTF-8
            name, colon, secret = "", "", ""
        if not colon or not name:  # no name to count against, but a refused credential all the same
            self.throttle.failed(address)
            return None
        if self.users.user_for_token(secret) == name:
            return name  # a token: unguessable, so it passes lockouts as a bearer token does
        digest = hashlib.sha256(credentials.encode()).hexdigest()
        stamp = self._users_stamp()
        remembered = self._verified.get(digest)
        if remembered and remembered[1] > time.monotonic() and remembered[2] == stamp:
            self.throttle.check(address, name)  # a lockout refuses the password, remembered or not
            return remembered[0]
        with self.throttle.attempt(address, name) as attempt:
            attempt.ok = await asyncio.to_thread(self.users.check_password, name, secret)
        if not attempt.ok:
            return None
        if len(self._verified) >= BASIC_REMEMBERED:
            self._verified.clear()
        self._verified[digest] = (name, time.monotonic() + BASIC_REMEMBER_S, stamp)
        return name

    def _users_stamp(self) -> int | None:
        try:
            return self.users.path.stat().st_mtime_ns
        except OSError:
            return None

    async def _locked_out(self, scope, receive, send, lockout: LockedOut):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": str(lockout)})
        body = {"detail": str(lockout), "kind": "rate_limited", "field": None}
        response = HTMLResponse(json.dumps(body), status_code=429, media_type="application/json",
                                headers={"Retry-After": str(lockout.retry_after_s)})
        await response(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": "authentication required"})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["method"] == "GET" and "text/html" in headers.get("accept", "") and \
                not scope["path"].startswith(BASIC_PREFIX):
            target = "/login?next=" + quote(scope["path"], safe="")
            response = RedirectResponse(target, status_code=303)
        else:
            body = {"detail": "authentication required: log in, or send 'Authorization: Bearer <token>' "
                              "(diffusion-studio users token NAME)"}
            challenge = "Bearer"
            if scope["path"].startswith(BASIC_PREFIX):
                body = {"detail": "authentication required: send HTTP Basic credentials (a user name and its "
                                  "password or API token), or 'Authorization: Bearer <token>'"}
                challenge = 'Basic realm="diffusion-studio", charset="UTF-8"'
            response = HTMLResponse(json.dumps(body), status_code=401, media_type="application/json",
                                    headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


LOGIN_PAGE = """<!doctype html><html><head><title>Diffusion Studio · log in</title><meta name="viewport"
content="width=device-width"><style>body{{font-family:system-ui,sans-serif;background:#f5f6fb;display:grid;
place-items:center;height:100vh;margin:0}}form{{background:#fff;padding:2rem;border-radius:12px;
box-shadow:0 2px 12px #0002;display:grid;gap:.8rem;width:18rem}}input,button{{font:inherit;padding:.5rem}}
button{{background:#4f46e5;color:#fff;border:0;border-radius:6px}}.error{{color:#b91c1c}}</style></head><body>
<form method="post" action="/login"><h2>Diffusion Studio</h2>{error}
<input name="username" placeholder="user" autocomplete="username" required autofocus>
<input name="password" type="password" placeholder="password" autocomplete="current-password" required>
<input type="hidden" name="next" value="{next}"><button type="submit">Log in</button></form></body></html>"""


def _safe_next(target: str) -> str:
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _login_page(error: str, next: str, **response) -> HTMLResponse:
    page = LOGIN_PAGE.format(error=f'<p class="error">{html.escape(error)}</p>', next=html.escape(_safe_next(next)))
    return HTMLResponse(page, **response)


def build_login_router(users: Users | None) -> APIRouter:
    router = APIRouter(tags=["auth"], include_in_schema=False)

    @router.get("/login")
    def login_page(next: str = "/") -> HTMLResponse:
        if users is None:
            return RedirectResponse("/", status_code=303)
        return HTMLResponse(LOGIN_PAGE.format(error="", next=html.escape(_safe_next(next))))

    @router.post("/login")
    def login(request: Request, username: str = Form(...), password: str = Form(...), next: str = Form("/")):
        if users is None:
            return RedirectResponse("/", status_code=303)
        throttle: LoginThrottle = request.state.login_throttle  # AccessControl's, shared with Basic and tokens
        try:
            with throttle.attempt(client_address(request.scope), username) as attempt:
                attempt.ok = users.check_password(username, password)
        except LockedOut as lockout:
            message = str(lockout)
            return _login_page(message[0].upper() + message[1:] + ".", next, status_code=429,
                               headers={"Retry-After": str(lockout.retry_after_s)})
        if not attempt.ok:
            return _login_page("Wrong user or password.", next, status_code=401)
        throttle.forgive(username)
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(SESSION_COOKIE, users.start_session(username), httponly=True, samesite="lax",
                            max_age=7 * 24 * 3600)
        return response

    @router.get("/logout")
    def logout(request: Request):
        if users is not None and SESSION_COOKIE in request.cookies:
            users.end_session(request.cookies[SESSION_COOKIE])
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    return router


def current_user(request: Request) -> str:
    """FastAPI dependency: the caller AccessControl identified."""
    return request.state.user


def require_admin(request: Request) -> str:
    """FastAPI dependency for routes that act on everyone's work."""
    if not request.state.admin:
        raise HTTPException(403, "admin only: an admin user (diffusion-studio users add NAME --admin) may do this")
    return request.state.user
