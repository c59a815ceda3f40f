"""Graceful shutdown of the real `serve` command: with a Gradio heartbeat stream, an SSE stream and a WebSocket open
and a job running, SIGTERM stops the server within 5 s; the running job ends interrupted (recorded, so a restart
knows), the queued one stays queued for the next start."""

import json
import signal
import threading

from websockets.sync.client import connect

from diffusion_studio.service.store import JobStatus, JobStore
from servers import ServeProcess, hold_open


def test_sigterm_stops_serve_within_5_s_with_streams_open(tmp_path):
    server = ServeProcess(tmp_path / "data", DS_PREVIEW_INTERVAL="0")
    base = server.url
    try:
        running = server.job({"prompt": "long", "steps": 150, "width": 256, "height": 256})
        queued = server.job({"prompt": "next", "steps": 2})
        streams = []
        for url in (f"{base}/gradio_api/heartbeat/shutdown-test", f"{base}/api/v1/jobs/{running}/events"):
            opened = threading.Event()
            thread = threading.Thread(target=hold_open, args=(url, opened), daemon=True)
            thread.start()
            assert opened.wait(10), url
            streams.append(thread)
        with connect(base.replace("http", "ws") + "/api/v1/ws") as socket:
            socket.send(json.dumps({"action": "subscribe", "job_id": running}))
            server.wait(running, states=("running",))
            stopped_in = server.stop(signal.SIGTERM, timeout=30)
    finally:
        server.kill()
    assert stopped_in < 5, f"serve took {stopped_in:.1f} s to stop"
    for thread in streams:
        thread.join(5)
        assert not thread.is_alive()  # the server closed every stream
    store = JobStore(tmp_path / "data" / "studio.db")
    assert store.get(running).status == JobStatus.interrupted
    assert store.get(queued).status == JobStatus.queued  # runs on the next start
