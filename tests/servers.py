"""The studio on loopback for tests (and bench/reliability.py) that speak HTTP to it: `serving(app)` runs a uvicorn
server in a thread and stops it within a second even with streams open (Gradio's heartbeat, SSE, WebSockets), as
`serve` does; `ServeProcess` runs the real `diffusion-studio serve` command in a process of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn


def make_users(path: Path, passwords: dict[str, str], admins: tuple[str, ...] = ()):
    """A users file at `path` with these users (name -> password; `admins` are admins) and one API token each:
    (the Users, the tokens by name)."""
    from diffusion_studio.service.auth import Users

    users = Users(path)
    for name, password in passwords.items():
        users.add(name, password, admin=name in admins)
    return users, {name: users.create_token(name) for name in passwords}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1"):
    """Serve `app`; yields its base URL. On exit the server must be gone within 10 s (it takes ~1 s)."""
    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "the server did not stop within 10 s"


class ServeProcess:
    """`diffusion-studio serve` in its own process on `data_dir`; `env`: more DS_* settings. Ready when /health
    answers (200, or 503 while degraded)."""

    def __init__(self, data_dir: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "diffusion_studio.cli", "serve", "--port", str(self.port)],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                 "DS_DATA_DIR": str(data_dir), "DS_MODELS_DIR": str(Path(data_dir) / "models"), **env},
            stdin=subprocess.DEVNULL, stdout=(log := tempfile.TemporaryFile()), stderr=subprocess.STDOUT)
        self.log = log  # a file, not a pipe: a full pipe would block the server's logging
        deadline = time.time() + 180
        while not self._answers():
            if self.process.poll() is not None or time.time() > deadline:
                self.process.kill()
                raise RuntimeError("serve did not start: " + self.output()[-3000:])
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def _answers(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503)
        return False

    def job(self, body: dict) -> str:
        response = httpx.post(f"{self.url}/api/v1/jobs", json=body, timeout=30)
        response.raise_for_status()
        return response.json()["id"]

    def wait(self, job_id: str, states=("done", "failed", "cancelled", "interrupted"), timeout=120) -> dict:
        deadline = time.time() + timeout
        while (job := httpx.get(f"{self.url}/api/v1/jobs/{job_id}", timeout=10).json())["status"] not in states:
            if time.time() > deadline:
                raise TimeoutError(job)
            time.sleep(0.05)
        return job

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> float:
        """Send `sig`; seconds until the process exited."""
        started = time.monotonic()
        self.process.send_signal(sig)
        self.process.wait(timeout)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def hold_open(url: str, opened: threading.Event | None = None) -> None:
    """Read a stream (SSE, Gradio's heartbeat) until the server closes it; `opened` is set once it answers."""
    with contextlib.suppress(httpx.HTTPError):
        with httpx.stream("GET", url, timeout=httpx.Timeout(5, read=None)) as response:
            if opened is not None:
                opened.set()
            for _ in response.iter_bytes():
                pass
