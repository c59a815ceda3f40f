"""Users and API tokens from a JSON file (passwords as scrypt hashes, tokens as SHA-256 digests), and login
sessions. The CLI writes the file (`diffusion-studio users add|token`); a running server notices changes.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path

SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def _parse(stored) -> tuple[bytes, str] | None:
    """(salt, hex digest) of a well-formed stored hash, else None."""
    if not isinstance(stored, str):
        return None
    scheme, _, rest = stored.partition("$")
    salt, _, digest = rest.partition("$")
    try:
        return (bytes.fromhex(salt), digest) if scheme == "scrypt" and salt and digest else None
    except ValueError:  # not hex
        return None


@functools.cache
def _dummy_hash() -> tuple[bytes, str]:
    """Checked instead when there is no usable hash, so that an unknown name (or a broken entry) costs the same
    scrypt as a real one and the time taken does not say which names exist."""
    return _parse(hash_password(secrets.token_urlsafe(16)))


def password_matches(password: str, stored) -> bool:
    """Whether `password` is the one `stored` hashes; one scrypt either way, also when `stored` is malformed."""
    parsed = _parse(stored)
    salt, digest = parsed or _dummy_hash()
    candidate = hashlib.scrypt(password.encode(errors="surrogatepass"), salt=salt, **SCRYPT)
    return hmac.compare_digest(candidate.hex(), digest) and parsed is not None


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict = {"users": {}, "tokens": {}}
        self._mtime = None
        self._sessions: dict[str, tuple[str, float]] = {}  # session id -> (user, expiry)
        _dummy_hash()  # made now, or the first unknown name would take two scrypts' time

    def _load(self) -> dict:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return {"users": {}, "tokens": {}}
        if mtime != self._mtime:  # the CLI may have added a user or token since
            self._data = json.loads(self.path.read_text())
            self._mtime = mtime
        return self._data

    def _save(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(json.dumps(data, indent=2))
        os.chmod(scratch, 0o600)
        os.replace(scratch, self.path)

    # -- management (CLI) -----------------------------------------------------------------------------------
    def add(self, name: str, password: str, admin: bool = False) -> None:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError("name: use letters, digits, '-' and '_'")
        if len(password) < 8:
            raise ValueError("password: at least 8 characters")
        with self._lock:
            data = self._load()
            data["users"][name] = {"password": hash_password(password), "created": time.time(), "admin": admin}
            self._save(data)

    def create_token(self, name: str, label: str = "") -> str:
        """A new API token for `name`, shown once; only its digest is stored."""
        with self._lock:
            data = self._load()
            if name not in data["users"]:
                raise ValueError(f"name: no user '{name}'; add it first")
            token = "ds_" + secrets.token_urlsafe(32)
            data["tokens"][_token_digest(token)] = {"user": name, "label": label, "created": time.time()}
            self._save(data)
        return token

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._load()["users"])

    # -- checks (server) ------------------------------------------------------------------------------------
    def check_password(self, name: str, password: str) -> bool:
        """Whether `name` is a user with this password: the same work (one scrypt) for a name that is no user."""
        with self._lock:
            user = self._load()["users"].get(name)
        stored = user.get("password") if isinstance(user, dict) else None
        return password_matches(password, stored) and user is not None

    def is_admin(self, name: str) -> bool:
        """Admins may pause the queue and unload models for everyone."""
        with self._lock:
            return bool(self._load()["users"].get(name, {}).get("admin"))

    def user_for_token(self, token: str) -> str | None:
        with self._lock:
            entry = self._load()["tokens"].get(_token_digest(token))
        return entry["user"] if entry else None

    def start_session(self, name: str, lifetime_s: float = 7 * 24 * 3600) -> str:
        session = secrets.token_urlsafe(32)
        self._sessions[session] = (name, time.time() + lifetime_s)
        return session

    def user_for_session(self, session: str) -> str | None:
        entry = self._sessions.get(session)
        if entry is None or entry[1] < time.time():
            self._sessions.pop(session, None)
            return None
        return entry[0]

    def end_session(self, session: str) -> None:
        self._sessions.pop(session, None)
