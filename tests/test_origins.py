"""No foreign origin may read the studio from a browser, on Gradio's routes as on the API's, with the studio on a
non-localhost address (127.0.0.2), where Gradio's own CORS would echo any Origin with credentials: no answer
carries a CORS header for a foreign origin, preflights from one are refused, WebSockets from one are refused;
the studio's own origin and `allowed_origins` work, and so do gradio_client and a real browser."""

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from gradio_client import Client
from PIL import Image
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from diffusion_studio.api.origins import origin_key, own_origin
from diffusion_studio.config import StudioConfig
from diffusion_studio.server import build_app

from servers import free_port, make_users, serving

HOST = "127.0.0.2"  # not a localhost alias: Gradio's CORS middleware echoes any origin here
ALLOWED = "http://app.example"


@pytest.fixture(scope="module")
def pages():
    """Two web pages' origins on the studio's host, each its own port: one allowed, one not. Real servers, so that
    the browser puts them in the studio's address space and only CORS decides what they may read."""
    servers = [ThreadingHTTPServer((HOST, 0), Page) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://{HOST}:{server.server_address[1]}" for server in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


class Page(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<p>a page</p>")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, pages):
    """Auth on; allowed: ALLOWED and the first of the pages."""
    users_file = tmp_path_factory.mktemp("origins") / "users.json"
    _, tokens = make_users(users_file, {"alice": "alice-password"})
    config = StudioConfig(data_dir=tmp_path_factory.mktemp("data"), models_dir=tmp_path_factory.mktemp("none"),
                          auth="on", users_file=users_file, allowed_origins=[ALLOWED, pages[0]])
    with serving(build_app(config), host=HOST) as url:
        yield url, {"Authorization": f"Bearer {tokens['alice']}"}


@pytest.fixture(scope="module")
def unguarded(tmp_path_factory):
    """Auth off (every caller is the local admin), no allowed origins."""
    config = StudioConfig(data_dir=tmp_path_factory.mktemp("data"), models_dir=tmp_path_factory.mktemp("none"),
                          auth="off")
    with serving(build_app(config), host=HOST) as url:
        yield url, {}


def foreign_origins(base):
    port = int(base.rsplit(":", 1)[1])
    return ["http://evil.example", "null", f"http://{HOST}:{free_port(HOST)}", f"http://localhost:{port}",
            f"https://{HOST}:{port}"]


def cors_headers(reply) -> dict:
    return {name: value for name, value in reply.headers.items() if name.startswith("access-control-")}


def uploaded_image(base, auth) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    [path] = httpx.post(f"{base}/gradio_api/upload", headers=auth,
                        files={"files": ("probe.png", buffer.getvalue(), "image/png")}).json()
    return path


def routes(base, auth):
    """(method, path, body) of Gradio's routes, the REST API's and the A1111 API's."""
    return [("GET", "/config", None), ("GET", "/gradio_api/info", None),
            ("GET", f"/gradio_api/file={uploaded_image(base, auth)}", None),
            ("POST", "/gradio_api/call/system", {"data": []}), ("GET", "/theme.css", None),
            ("GET", "/api/v1/queue", None), ("GET", "/api/v1/history", None),
            ("POST", "/api/v1/jobs", {"prompt": "x", "steps": -1}),  # a refusal (422) counts too
            ("GET", "/sdapi/v1/samplers", None), ("GET", "/sdapi/v1/options", None), ("GET", "/health", None)]


@pytest.mark.parametrize("served", ["guarded", "unguarded"])
def test_no_answer_carries_cors_headers_for_a_foreign_origin(served, request):
    base, auth = request.getfixturevalue(served)
    checked = 0
    for method, path, body in routes(base, auth):
        plain = httpx.request(method, base + path, headers=auth, json=body)
        for origin in foreign_origins(base):
            reply = httpx.request(method, base + path, headers={**auth, "Origin": origin}, json=body)
            if method == "GET":
                assert reply.status_code == plain.status_code, (origin, path)  # answered as before, ...
            else:  # a change a foreign page asks for is refused (below)
                assert reply.status_code == 403 and reply.json()["field"] == "Origin", (origin, path)
            assert cors_headers(reply) == {}, (origin, path, cors_headers(reply))  # ... but not for that page
            checked += 1
    assert checked == 55
    if auth:  # a refusal for want of credentials does not tell a foreign page anything either
        for origin in foreign_origins(base):
            refused = httpx.get(base + "/config", headers={"Origin": origin})
            assert refused.status_code == 401 and cors_headers(refused) == {}, origin


@pytest.mark.parametrize("served", ["guarded", "unguarded"])
def test_preflights_from_a_foreign_origin_are_refused(served, request):
    base, _ = request.getfixturevalue(served)
    for path in ("/api/v1/jobs", "/gradio_api/call/generate", "/gradio_api/upload", "/config", "/sdapi/v1/txt2img",
                 "/v1/images/generations"):
        for origin in foreign_origins(base):
            reply = httpx.options(base + path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})
            assert reply.status_code == 403 and cors_headers(reply) == {}, (origin, path)
            assert reply.json()["field"] == "Origin" and "allowed_origins" in reply.json()["detail"]


@pytest.mark.parametrize("served", ["guarded", "unguarded"])
def test_a_foreign_page_cannot_make_the_studio_do_anything(served, request):
    """CORS keeps a foreign page from reading; a form or text/plain POST needs no preflight and carries the
    user's cookie (SameSite=Lax sends it from another port of the same host), so it is refused by its Origin."""
    base, auth = request.getfixturevalue(served)
    studio_jobs = len(httpx.get(base + "/api/v1/history", headers=auth).json())
    body = json.dumps({"prompt": "queued by a foreign page", "steps": 2, "width": 32, "height": 32})
    for origin in foreign_origins(base):
        for path in ("/api/v1/jobs", "/sdapi/v1/txt2img", "/gradio_api/upload", "/login"):
            reply = httpx.post(base + path, headers={**auth, "Origin": origin, "Content-Type": "text/plain"},
                               content=body)
            assert reply.status_code == 403, (origin, path, reply.status_code)
            assert reply.json()["field"] == "Origin" and "allowed_origins" in reply.json()["detail"]
        assert httpx.delete(base + "/api/v1/jobs/x", headers={**auth, "Origin": origin}).status_code == 403
    assert len(httpx.get(base + "/api/v1/history", headers=auth).json()) == studio_jobs  # nothing was queued
    mine = httpx.post(base + "/api/v1/jobs", headers={**auth, "Origin": base, "Content-Type": "text/plain"},
                      content=body)
    assert mine.status_code == 202, mine.text  # the studio's own page may


def test_a_loopback_studio_without_auth_answers_only_to_loopback_names(unguarded):
    """DNS rebinding: a page of evil.example whose name resolves to 127.0.0.1 calls the studio as same-origin,
    Host: evil.example. A studio that trusts every caller because it is on loopback refuses other Host names."""
    base, _ = unguarded
    port = base.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"192.168.1.5:{port}", f"127.0.0.1.evil.example:{port}"):
        reply = httpx.get(base + "/api/v1/queue", headers={"Host": host})
        assert reply.status_code == 400 and reply.json()["field"] == "Host", host
        assert httpx.post(base + "/api/v1/jobs", headers={"Host": host}, json={"prompt": "x"}).status_code == 400
    for host in (f"localhost:{port}", f"127.0.0.2:{port}", f"[::1]:{port}", "app.localhost"):
        assert httpx.get(base + "/api/v1/queue", headers={"Host": host}).status_code == 200, host


def test_an_allowed_origin_may_call_with_credentials(guarded):
    base, auth = guarded
    preflight = httpx.options(base + "/api/v1/jobs", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # no credentials: a browser sends none
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
    for method, path, body in routes(base, auth):
        reply = httpx.request(method, base + path, headers={**auth, "Origin": ALLOWED}, json=body)
        assert reply.headers["access-control-allow-origin"] == ALLOWED, path
        assert reply.headers["access-control-allow-credentials"] == "true", path
        assert "origin" in reply.headers["vary"].lower(), path
    refused = httpx.get(base + "/config", headers={"Origin": ALLOWED})  # the page may read that it must log in
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ALLOWED
    # What an allowed origin is answered depends on the Origin: a cache must not hand it to another page
    assert "origin" in httpx.get(base + "/config", headers=auth).headers["vary"].lower()


@pytest.mark.parametrize("served", ["guarded", "unguarded"])
def test_the_studios_own_origin_keeps_working(served, request):
    base, auth = request.getfixturevalue(served)
    own = {**auth, "Origin": base}  # browsers send Origin on same-origin POSTs and fetches
    assert httpx.get(base + "/config", headers=own).status_code == 200
    event = httpx.post(base + "/gradio_api/call/system", headers=own, json={"data": []})
    assert event.status_code == 200 and "event_id" in event.json()
    with httpx.stream("GET", f"{base}/gradio_api/call/system/{event.json()['event_id']}", headers=own,
                      timeout=60) as stream:
        assert "event: complete" in stream.read().decode()
    assert httpx.get(base + "/api/v1/queue", headers=own).headers.get("access-control-allow-origin") in (None, base)


def test_websockets_from_a_foreign_origin_are_refused(guarded):
    base, auth = guarded
    url = base.replace("http", "ws") + "/api/v1/ws"
    for origin in foreign_origins(base):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, origin=origin, additional_headers=auth)
        assert refused.value.response.status_code == 403, origin
    for origin in (None, base, ALLOWED):  # a program (no Origin), the studio's own page, an allowed one
        with connect(url, origin=origin, additional_headers=auth) as socket:
            socket.send(json.dumps({"action": "subscribe", "job_id": "nope"}))
            assert json.loads(socket.recv(timeout=10))["error"] == "not_found"


@pytest.mark.parametrize("served", ["guarded", "unguarded"])
def test_gradio_client_still_works(served, request):
    base, auth = request.getfixturevalue(served)
    client = Client(base, headers=auth, download_files=False, verbose=False)
    assert "/generate" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert client.predict(api_name="/system")  # the System tab's snapshot, through Gradio's queue


@pytest.mark.parametrize("origin, key", [
    ("http://App.Example", ("http", "app.example", 80)), ("https://app.example:443", ("https", "app.example", 443)),
    ("http://[::1]:8000", ("http", "::1", 8000)), ("ws://host", ("http", "host", 80)),
    ("null", None), ("http://app.example/", None), ("http://user@app.example", None), ("http://app.example:x", None),
    ("file:///etc", None), ("", None)])
def test_origins_compare_as_browsers_serialize_them(origin, key):
    assert origin_key(origin) == key


def test_the_own_origin_is_the_requests_scheme_and_host():
    scope = {"type": "http", "scheme": "http", "headers": [(b"host", b"127.0.0.2:7860")]}
    assert own_origin(scope) == ("http", "127.0.0.2", 7860)
    assert own_origin({**scope, "scheme": "wss", "headers": [(b"host", b"studio.example")]}) == \
        ("https", "studio.example", 443)
    assert own_origin({**scope, "headers": []}) is None


def test_a_page_of_another_origin_cannot_read_the_studio_in_a_real_browser(guarded, pages):
    """Chromium, logged in as alice: the studio's own page loads and runs its same-origin API calls; a page on
    another port of the same host (the same site, so her cookie goes along) reads nothing, with her cookie or
    with a token; a page of an allowed origin reads, with either."""
    browser = pytest.importorskip("browser")  # skips where there is no Chromium
    base, auth = guarded
    allowed, other = pages
    read = """([url, token]) => fetch(url, token ? {headers: {Authorization: token}} : {credentials: 'include'})
                                 .then(reply => 'read ' + reply.status).catch(() => 'refused')"""
    with browser.playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser.CHROMIUM, args=browser.FLAGS)
        page = chromium.new_page()
        page.set_default_timeout(60_000)
        page.goto(base + "/login")
        page.fill("input[name=username]", "alice")
        page.fill("input[name=password]", "alice-password")
        page.click("button[type=submit]")
        page.get_by_role("tab", name="Generate").wait_for()  # the page and its own API calls went through
        assert page.evaluate(read, [base + "/config", None]) == "read 200"
        for origin, outcome in ((other, "refused"), (allowed, "read 200")):
            page.goto(origin + "/")
            for path in ("/config", "/gradio_api/info", "/api/v1/history"):
                assert page.evaluate(read, [base + path, None]) == outcome, (origin, path)
                assert page.evaluate(read, [base + path, auth["Authorization"]]) == outcome, (origin, path)
        chromium.close()


def test_behind_a_tls_proxy_that_keeps_the_host_the_page_is_still_the_studios_own():
    from diffusion_studio.api.origins import is_own

    behind_proxy = {"type": "http", "scheme": "http", "headers": [(b"host", b"studio.example")]}
    assert is_own(origin_key("https://studio.example"), behind_proxy)
    assert is_own(origin_key("http://studio.example"), behind_proxy)
    assert not is_own(origin_key("https://studio.example:8443"), behind_proxy)
    assert not is_own(origin_key("https://evil.example"), behind_proxy)
    with_port = {**behind_proxy, "headers": [(b"host", b"studio.example:7860")]}
    assert is_own(origin_key("http://studio.example:7860"), with_port)
    assert not is_own(origin_key("https://studio.example:7860"), with_port)  # a port: the scheme must match too
