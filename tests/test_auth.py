"""Auth on a running server: every route refuses an anonymous call, tokens and login sessions work, users see
only their own work, a share link opens exactly one image; a password check costs the same for any name."""

import json
import re
import statistics
import time

import httpx
import pytest
from gradio_client import Client
from starlette.routing import Mount

from diffusion_studio.api.access import is_public
from diffusion_studio.config import StudioConfig
from diffusion_studio.server import build_app

from servers import make_users, serving


@pytest.fixture(scope="module")
def secured(data_dir, tmp_path_factory):
    users_file = tmp_path_factory.mktemp("auth") / "users.json"
    _, tokens = make_users(users_file, {"alice": "alice-password", "bob": "bob-password", "root": "root-password"},
                           admins=("root",))
    config = StudioConfig(data_dir=data_dir, models_dir=tmp_path_factory.mktemp("none"), auth="on",
                          users_file=users_file)
    app = build_app(config)
    with serving(app) as url:
        yield url, app, tokens


def every_route(routes, prefix=""):
    """(path, methods) of every route: the app's own, included routers' and mounted apps' (Gradio)."""
    for route in routes:
        if isinstance(route, Mount):
            inner = getattr(route.app, "routes", None)
            yield from every_route(inner, prefix + route.path) if inner else [(prefix + route.path + "/x", {"GET"})]
        elif hasattr(route, "original_router"):  # FastAPI's included router
            yield from every_route(route.original_router.routes, prefix + route.include_context.prefix)
        else:
            yield prefix + route.path, getattr(route, "methods", None) or {"GET"}


def test_every_route_refuses_anonymous_calls(secured):
    base, app, _ = secured
    checked = 0
    for path, methods in every_route(app.routes):
        concrete = re.sub(r"\{[^}]+\}", "x", path) or "/"
        if is_public(concrete):
            continue
        for method in methods - {"HEAD", "OPTIONS"}:
            reply = httpx.request(method, base + concrete)
            assert reply.status_code == 401, (method, concrete, reply.status_code)
            checked += 1
    assert checked > 40  # the studio's routes and Gradio's own
    page = httpx.get(base + "/", headers={"accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2F"
    assert httpx.get(base + "/health").json() == {"status": "ok", "reasons": []}  # public, but says nothing more


def test_tokens_sessions_and_ownership(secured):
    base, _, tokens = secured
    alice, bob = ({"Authorization": f"Bearer {tokens[name]}"} for name in ("alice", "bob"))
    assert httpx.get(base + "/api/v1/history", headers={"Authorization": "Bearer wrong"}).status_code == 401
    job_id = httpx.post(base + "/api/v1/jobs", headers=alice, json={"prompt": "alice only", "steps": 2,
                                                                     "seed": 1}).json()["id"]
    deadline = time.time() + 60
    while (job := httpx.get(f"{base}/api/v1/jobs/{job_id}", headers=alice).json())["status"] != "done":
        assert time.time() < deadline
        time.sleep(0.05)
    assert httpx.get(f"{base}/api/v1/jobs/{job_id}", headers=bob).status_code == 404
    assert httpx.get(base + job["images"][0], headers=bob).status_code == 404
    assert httpx.get(base + job["images"][0], headers=alice).status_code == 200
    assert [j["id"] for j in httpx.get(base + "/api/v1/history", headers=alice).json()] == [job_id]
    assert httpx.get(base + "/api/v1/history", headers=bob).json() == []

    image_id = job["images"][0].rsplit("/", 1)[-1]
    assert httpx.post(f"{base}/api/v1/images/{image_id}/share", headers=bob).status_code == 404
    link = httpx.post(f"{base}/api/v1/images/{image_id}/share", headers=alice).json()["url"]
    shared = httpx.get(base + link)  # no credentials at all
    assert shared.status_code == 200 and shared.content == httpx.get(base + job["images"][0], headers=alice).content
    assert httpx.get(base + "/share/not-a-token").status_code == 404

    with httpx.Client(base_url=base) as browser:
        wrong = browser.post("/login", data={"username": "alice", "password": "nope", "next": "/"})
        assert wrong.status_code == 401 and "Wrong user or password" in wrong.text
        ok = browser.post("/login", data={"username": "alice", "password": "alice-password", "next": "/"})
        assert ok.status_code == 303 and "ds_session" in browser.cookies
        assert browser.get("/").status_code == 200
        assert browser.get("/api/v1/history").json()[0]["id"] == job_id
        browser.get("/logout")
        assert browser.get("/api/v1/history").status_code == 401


def test_ui_calls_run_as_the_token_user(secured):
    base, app, tokens = secured
    client = Client(base, headers={"Authorization": f"Bearer {tokens['bob']}"}, download_files=False, verbose=False)
    client.predict("bob via the ui", "", 1, "builtin:shapes", 2, 7.0, 0, 0, 3, "Euler", 1, [], api_name="/generate")
    [job] = app.state.studio.store.find(prompt="bob via the ui")
    assert job.user == "bob"


def test_websocket_needs_credentials(secured):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    base, _, tokens = secured
    url = base.replace("http", "ws") + "/api/v1/ws"
    with pytest.raises(InvalidStatus):
        connect(url)
    with connect(url, additional_headers={"Authorization": f"Bearer {tokens['alice']}"}) as socket:
        socket.send(json.dumps({"action": "subscribe", "job_id": "nope"}))
        assert json.loads(socket.recv(timeout=10)) == {"kind": "error", "error": "not_found", "field": None,
                                                          "detail": "no such job or image: nope"}


def test_only_admins_pause_the_queue_and_unload_models(secured):
    base, _, tokens = secured
    as_user = {"Authorization": f"Bearer {tokens['alice']}"}
    as_admin = {"Authorization": f"Bearer {tokens['root']}"}
    for path in ("/api/v1/queue/pause", "/api/v1/queue/resume", "/api/v1/models/builtin:shapes/unload"):
        refused = httpx.post(base + path, headers=as_user)
        assert refused.status_code == 403 and "admin only" in refused.json()["detail"]
    assert httpx.get(f"{base}/api/v1/queue", headers=as_user).json()["paused"] is False
    assert httpx.post(f"{base}/api/v1/queue/pause", headers=as_admin).json()["paused"] is True
    assert httpx.get(f"{base}/api/v1/queue", headers=as_user).json()["paused"] is True
    assert httpx.post(f"{base}/api/v1/queue/resume", headers=as_admin).json()["paused"] is False


def test_password_checks_cost_one_scrypt_for_any_name(tmp_path):
    """Unknown names and broken stored hashes are checked against a dummy hash: refused, never an error, and no
    quicker than a known name's wrong password (interleaved medians, as ratios)."""
    users_file = tmp_path / "users.json"
    users, _ = make_users(users_file, {"alice": "alice-password"})
    data = json.loads(users_file.read_text())
    broken = {"not-hex": "scrypt$zz$00", "other-scheme": "md5$00$00", "no-parts": "plaintext", "not-text": None}
    for name, stored in broken.items():
        data["users"][name] = {"password": stored, "created": 0, "admin": False}
    users_file.write_text(json.dumps(data))
    assert users.check_password("alice", "alice-password")
    for name in (*broken, "nobody"):
        assert not users.check_password(name, "alice-password")

    times: dict[str, list[float]] = {"alice": [], "nobody": [], "not-hex": []}
    for _ in range(7):
        for name, series in times.items():
            started = time.perf_counter()
            users.check_password(name, "wrong-password")
            series.append(time.perf_counter() - started)
    known = statistics.median(times["alice"])
    for name in ("nobody", "not-hex"):
        assert 0.5 <= statistics.median(times[name]) / known <= 2, (name, times)


def test_a_training_run_is_its_owners_to_see_and_steer(secured):
    """One LoRA trains at a time for the whole studio: another user sees only that the trainer is busy, and may
    not pause, resume or stop it; its owner and admins may."""
    from diffusion_studio.service.training import TrainingRun
    from diffusion_studio.training.config import TrainConfig

    base, app, tokens = secured

    class Trainer:  # stands in for the training thread's trainer: records what it was told
        def __init__(self):
            self.told = []

        def __getattr__(self, action):
            return lambda: self.told.append(action)

    trainer = Trainer()
    run = TrainingRun("alices-secret-lora", TrainConfig(base="builtin:shapes", method="lora", dataset="shapes",
                                                        steps=40), owner="alice", state="running",
                      events=[{"step": 7, "loss": 0.25}], samples=[], trainer=trainer)
    studio = app.state.studio
    studio.training.current = run
    try:
        def client(name):
            return Client(base, headers={"Authorization": f"Bearer {tokens[name]}"}, download_files=False,
                          verbose=False)

        bob = client("bob")
        _, text, *plots, samples = bob.predict(api_name="/train_status")
        assert "alices-secret-lora" not in text and "Another user's LoRA is training (step 7/40)" in text
        assert all(plot is None for plot in plots) and samples == []
        for action in ("pause", "resume", "stop"):
            with pytest.raises(Exception, match="only its owner or an admin"):
                bob.predict(api_name=f"/train_{action}")
        assert trainer.told == [] and run.state == "running"

        alice = client("alice")
        _, text, *_ = alice.predict(api_name="/train_status")
        assert "alices-secret-lora" in text and "step 7/40" in text
        alice.predict(api_name="/train_pause")
        client("root").predict(api_name="/train_stop")  # an admin may stop anyone's run
        assert trainer.told == ["pause", "stop"]
    finally:
        studio.training.current = None


def test_a_header_that_is_not_utf8_is_no_server_error(secured):
    """HTTP allows any byte from 0x80 in a header value; the gate reads them as Latin-1, as Starlette does."""
    import socket
    from urllib.parse import urlparse

    base, _, tokens = secured
    url = urlparse(base)
    for path, auth in (("/health", b""), ("/api/v1/queue", f"Authorization: Bearer {tokens['bob']}\r\n".encode())):
        with socket.create_connection((url.hostname, url.port), timeout=10) as connection:
            connection.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: caf\xe9\r\n" + auth +
                               b"Connection: close\r\n\r\n")
            reply = b""
            while chunk := connection.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), (path, reply[:200])
