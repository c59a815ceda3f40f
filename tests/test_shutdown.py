"""Graceful shutdown of the real `serve` command: with a Gradio heartbeat stream, an SSE stream and a WebSocket open
and a job running, SIGTERM stops the server within 5 s; the running job ends interrupted (recorded, so a restart
knows), the queued one stays queued for the next start."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from websockets.sync.client import connect

from diffusion_studio.service.store import JobStatus, JobStore
from servers import free_port


def hold_open(url: str, opened: threading.Event) -> None:
    """Read a stream until the server closes it."""
    try:
        with httpx.stream("GET", url, timeout=httpx.Timeout(5, read=None)) as response:
            opened.set()
            for _ in response.iter_bytes():
                pass
    except httpx.HTTPError:
        pass


def test_sigterm_stops_serve_within_5_s_with_streams_open(tmp_path):
    port = free_port()
    env = {**os.environ, "DS_DATA_DIR": str(tmp_path / "data"), "DS_MODELS_DIR": str(tmp_path / "models"),
           "DS_PREVIEW_INTERVAL": "0"}
    server = subprocess.Popen([sys.executable, "-m", "diffusion_studio.cli", "serve", "--port", str(port)],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "serve did not answer"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        running = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "long", "steps": 150, "width": 256,
                                                         "height": 256}).json()["id"]
        queued = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "next", "steps": 2}).json()["id"]
        streams = []
        for url in (f"{base}/gradio_api/heartbeat/shutdown-test", f"{base}/api/v1/jobs/{running}/events"):
            opened = threading.Event()
            thread = threading.Thread(target=hold_open, args=(url, opened), daemon=True)
            thread.start()
            assert opened.wait(10), url
            streams.append(thread)
        with connect(base.replace("http", "ws") + "/api/v1/ws") as socket:
            socket.send(json.dumps({"action": "subscribe", "job_id": running}))
            while httpx.get(f"{base}/api/v1/jobs/{running}").json()["status"] != "running":
                time.sleep(0.05)
            started = time.monotonic()
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
            stopped_in = time.monotonic() - started
    finally:
        if server.poll() is None:
            server.kill()
    assert stopped_in < 5, f"serve took {stopped_in:.1f} s to stop"
    for thread in streams:
        thread.join(5)
        assert not thread.is_alive()  # the server closed every stream
    store = JobStore(tmp_path / "data" / "studio.db")
    assert store.get(running).status == JobStatus.interrupted
    assert store.get(queued).status == JobStatus.queued  # runs on the next start
