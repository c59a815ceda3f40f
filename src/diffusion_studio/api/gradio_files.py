"""Whose files Gradio's file routes serve. Gradio serves, by path, any file under its `allowed_paths` (the
studio's outputs and training folders: the UI returns PNGs from there), its cache and upload folder and its own
assets, to anyone its `auth_dependency` admits, so one user could read another's images by their guessable paths
(outputs/<date>/<HHMMSS>-<6 hex>-<mode>-<seed>-<i>.png).

One ASGI middleware, inside the access gate (it reads the caller from `scope["state"]`), answers first for the
routes that read a file by path (`/gradio_api/file=<path>` and its older spelling `/gradio_api/file/<path>`;
Gradio's others serve its own package files, HF proxies or media streams by session). It resolves the path as
Gradio does (absolute, `..` and symlinks resolved), then:

- a file in one of the studio's private folders (outputs, training) is served only to the user whose job made
  it (the store says who); one that is nobody's (a training sample, a file not in the history) to admins only.
  The UI never needs these paths: Gradio hands the page its own copies (below);
- a file in Gradio's cache named as a history image is the copy Gradio made when the UI showed that image (it
  keeps the name, in a folder named by a seeded hash of the content): it belongs to the original's owner;
- a URL (`file=https://...`, which Gradio would fetch and stream from any public host: an open proxy for every
  signed-in user) is refused; the UI never asks for one;
- anything else (Gradio's assets, uploads, other cache files) is Gradio's to decide, as before.

Admins read everything. A refusal is Gradio's own answer for a missing file, byte for byte (403, "File not
allowed: <path>."), so it never tells whether the file exists. Share links (/share/<token>) are a route of the
studio's, not a Gradio file route, and are not affected.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from starlette.responses import JSONResponse

# As Starlette matches Gradio's "/gradio_api/file={path_or_url:path}" and "/gradio_api/file/{path:path}": re.match
# with a `$` that also matches before a final newline, so "...png%0A" reaches Gradio as "...png" and must here too.
FILE_ROUTE = re.compile(r"^/gradio_api/file[=/](?P<path>.*)$")
# As Studio.save names them, and a cache hit's copies of them (`-<job id>` added).
HISTORY_IMAGE_NAME = re.compile(r"\d{6}-[0-9a-f]{6}-[a-z0-9_]+--?\d+-\d+(?:-[0-9a-f]{16})?\.png")
FILE_METHODS = ("GET", "HEAD")
REMOTE_URL = re.compile(r"^https?://", re.IGNORECASE)  # as gradio_client's is_http_url_like


def route_path(scope) -> str:
    """The path the routers match, without the app's root path (as Starlette's routing sees it)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
        return path[len(root):]
    return path


def resolved(path: str | Path) -> Path:
    """As Gradio resolves a path before deciding whether to serve it: absolute from the cwd, links followed."""
    return Path(os.path.abspath(str(path))).resolve()


def within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class FileOwners:
    """ASGI middleware: Gradio's file routes serve a user only their own history images; see the module docstring.
    `private_dirs`: the outputs folder (where history images are) first, then any other folder of the studio's in
    Gradio's allowed_paths. `owner_of(path)`: the user whose job saved the image at that path (as saved), None if
    none did."""

    def __init__(self, app, private_dirs: Sequence[Path], gradio_cache_dir: Path,
                 owner_of: Callable[[str], str | None]):
        self.app = app
        self.private_dirs = [Path(folder) for folder in private_dirs]
        self.outputs_dir = self.private_dirs[0]
        self.gradio_cache_dir = Path(gradio_cache_dir)
        self.owner_of = owner_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in FILE_METHODS or scope.get("state", {}).get("admin"):
            return await self.app(scope, receive, send)
        match = FILE_ROUTE.match(route_path(scope))
        if match is None:
            return await self.app(scope, receive, send)
        requested = match["path"]
        # Off the event loop: paths are resolved on disk and owners looked up in SQLite.
        if await asyncio.to_thread(self.may_read, requested, scope.get("state", {}).get("user")):
            return await self.app(scope, receive, send)
        # Gradio's answer for a file that is not there (route_utils.file_fetch), to the byte.
        await JSONResponse({"detail": f"File not allowed: {requested}."}, status_code=403)(scope, receive, send)

    def may_read(self, requested: str, user: str | None) -> bool:
        """Whether `user` (not an admin) may have Gradio serve `requested`, a path as the route received it."""
        if REMOTE_URL.match(requested):  # Gradio would fetch it (public hosts only): the UI never needs that
            return False
        try:
            path = resolved(requested)
            for folder in self.private_dirs:
                if within(path, resolved(folder)):
                    return user is not None and self._owner(folder, path.relative_to(resolved(folder))) == user
            if within(path, resolved(self.gradio_cache_dir)) and HISTORY_IMAGE_NAME.fullmatch(path.name):
                owners = {self._owner(self.outputs_dir, original.relative_to(self.outputs_dir))
                          for original in self.outputs_dir.glob(f"*/{path.name}")} - {None}
                return not owners or owners == {user}  # no original in the history: an upload of that name
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a link loop, an unreadable folder
            return False
        return True  # not a history image: Gradio's own rules decide (assets, uploads; anything else it refuses)

    def _owner(self, folder: Path, relative: Path) -> str | None:
        """The owner of the image at folder/relative, in whichever spelling of the folder it was saved."""
        spellings = dict.fromkeys(str(spelling / relative) for spelling in (
            folder, Path(os.path.abspath(folder)), resolved(folder)))
        return next((owner for spelling in spellings if (owner := self.owner_of(spelling)) is not None), None)


# Gradio's routes that run an event with its inputs in a JSON body.
EVENT_ROUTE = re.compile(r"^/gradio_api/(?:queue/join|call/[^/]+|run/[^/]+|api/[^/]+)/?$")


class RemoteInputs:
    """ASGI middleware: an event input naming a remote file (`{"path": "https://..."}`) is refused. Gradio checks
    that a file input is an upload, except for http(s) URLs, which it downloads into its cache from any public host:
    every signed-in user could have the studio fetch whatever they like. The UI only ever sends uploads. Admins are
    not held to it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("state", {}).get("admin") or \
                not EVENT_ROUTE.match(route_path(scope)):
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:  # bounded: BodyLimit, outside, counts these bytes
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        if names_remote_file(body):
            refusal = JSONResponse({"detail": "a file input must be an upload (POST /gradio_api/upload), not a URL "
                                              "for the studio to fetch", "kind": "invalid_request", "field": "data"},
                                   status_code=422)
            return await refusal(scope, receive, send)
        pending = iter(messages)

        async def replay():
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)


def names_remote_file(body: bytes) -> bool:
    """Whether a JSON body holds, anywhere, an object whose `path` is an http(s) URL (Gradio's FileData)."""
    try:
        stack = [json.loads(body)]
    except ValueError:  # not JSON: Gradio refuses it itself
        return False
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and REMOTE_URL.match(path.strip()):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False

