"""A real uvicorn server on loopback, in a thread, for tests that speak HTTP to the studio. It stops within a
second even with streams open (Gradio's heartbeat, SSE, WebSockets), as `serve` does."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn


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
