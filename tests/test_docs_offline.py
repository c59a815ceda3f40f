"""/docs (Swagger UI) and /redoc (ReDoc) with no network: in the real browser (Debian's Chromium through
Playwright, as tests/test_browser.py) with every request for anything but this machine aborted and recorded, both
pages render the studio's operations from the assets fastapi-offline bundles, and nothing leaves the machine. The
pages and their assets stay behind the access gate, as /docs was before."""

from urllib.parse import urlsplit

import httpx
import pytest

from diffusion_studio.config import StudioConfig
from diffusion_studio.server import build_app
from servers import make_users, serving
from browser import CHROMIUM, FLAGS, playwright  # skips this module too where there is no Chromium

LOCAL = {"127.0.0.1", "localhost"}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def offline_page(browser):
    """A page whose requests off this machine are aborted; yields (page, what the network layer saw)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    seen = {"local": [], "foreign": [], "blocked_by_page": []}

    def route(request_route):
        url = request_route.request.url
        if urlsplit(url).hostname in LOCAL:
            seen["local"].append(url)
            request_route.continue_()
        else:
            seen["foreign"].append(url)  # would have left the machine
            request_route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(60_000)
    # refused by the page's own Content-Security-Policy before any connection (Playwright still reports them)
    page.on("requestfailed", lambda request: request.failure == "csp" and seen["blocked_by_page"].append(request.url))
    yield page, seen
    context.close()


def operations(base: str) -> list[tuple[str, str]]:
    document = httpx.get(f"{base}/openapi.json").json()
    return [(method.upper(), path) for path, item in document["paths"].items() for method in item if method in METHODS]


def test_swagger_ui_lists_our_operations_offline(server, offline_page):
    base, _ = server
    page, seen = offline_page
    page.goto(f"{base}/docs")
    page.locator(".opblock").first.wait_for()
    page.wait_for_load_state("networkidle")
    expected = operations(base)
    shown = [(block.locator(".opblock-summary-method").inner_text().strip(),
              block.locator(".opblock-summary-path").inner_text().strip().replace("\u200b", ""))
             for block in page.locator(".opblock").all()]
    assert set(shown) == set(expected)  # every operation of the document, and only those (once per tag it has)
    assert ("POST", "/sdapi/v1/txt2img") in shown and ("POST", "/v1/images/generations") in shown

    # The page works, not only renders: "Try it out" on GET /health calls this server under the page's policy.
    health = page.locator(".opblock", has=page.locator(".opblock-summary-path", has_text="/health")).first
    health.locator(".opblock-summary").click()
    health.get_by_role("button", name="Try it out").click()
    health.get_by_role("button", name="Execute").click()
    playwright.expect(health.locator(".live-responses-table tr.response .response-col_status").first).to_have_text("200")

    assert seen["foreign"] == [], seen["foreign"]
    assert {urlsplit(url).path for url in seen["local"]} >= {
        "/docs", "/openapi.json", "/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/health"}


def test_redoc_renders_our_operations_offline(server, offline_page):
    base, _ = server
    page, seen = offline_page
    page.goto(f"{base}/redoc")
    page.get_by_role("heading", name="Diffusion Studio (0.1.0)").wait_for()
    page.wait_for_load_state("networkidle")
    document = httpx.get(f"{base}/openapi.json").json()
    tagged = sum(len(item[method].get("tags") or ["default"]) for item in document["paths"].values()
                 for method in item if method in METHODS)
    assert page.locator('[data-item-id^="tag/"][data-item-id*="/operation/"]').count() == tagged  # one per tag
    for path in ("/sdapi/v1/txt2img", "/v1/images/generations"):
        operation = document["paths"][path]["post"]  # its section: the summary as heading, the path below
        section = page.locator(f'[data-section-id="operation/{operation["operationId"]}"]')
        playwright.expect(section.locator("h2")).to_contain_text(operation["summary"])
        playwright.expect(section).to_contain_text(path)

    assert seen["foreign"] == [], seen["foreign"]
    assert {urlsplit(url).path for url in seen["local"]} >= {"/redoc", "/openapi.json",
                                                              "/docs-assets/redoc.standalone.js"}
    # ReDoc's sidebar always asks cdn.redoc.ly for Redocly's logo: the page's policy refuses it in the browser.
    assert all(urlsplit(url).hostname not in LOCAL for url in seen["blocked_by_page"])


@pytest.fixture(scope="module")
def secured(data_dir, tmp_path_factory):
    users_file = tmp_path_factory.mktemp("docs-auth") / "users.json"
    _, tokens = make_users(users_file, {"alice": "alice-password"})
    token = tokens["alice"]
    config = StudioConfig(data_dir=data_dir, models_dir=tmp_path_factory.mktemp("none"), auth="on",
                          users_file=users_file)
    with serving(build_app(config)) as url:
        yield url, token


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui-bundle.js",
                                  "/docs-assets/redoc.standalone.js"])
def test_docs_stay_behind_the_access_gate(secured, path):
    base, token = secured
    assert httpx.get(base + path).status_code == 401
    page = httpx.get(base + path, headers={"accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    assert httpx.get(base + path, headers={"authorization": f"Bearer {token}"}).status_code == 200
