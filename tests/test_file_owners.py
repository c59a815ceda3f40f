"""Gradio's file routes serve a user only their own images, over real HTTP with auth on: alice's PNG by its
path — and by every other spelling of it, and as the copy Gradio's cache keeps when the UI shows it — is hers
and admins', refused to bob exactly as a missing file is; a share link still opens it for anyone; bob still gets
the UI's assets and his own uploads."""

import io
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import gradio.utils
import httpx
import pytest
from gradio_client import Client
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffusion_studio.api.gradio_files import FileOwners
from diffusion_studio.config import StudioConfig
from diffusion_studio.server import build_app

from servers import make_users, serving

PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "root": "root-password"}
UPLOAD_LIMIT = 256 * 1024  # max_body_bytes here: what anyone but an admin may upload at once


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A data dir of its own (other modules count alice's jobs in the session's), outside the cwd and the temp dir
    where it can be, as the Docker image's /data is: Gradio returns its files only for being in allowed_paths."""
    try:
        folder = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ds-owners-"))
    except OSError:
        folder = tmp_path_factory.mktemp("data")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, elsewhere):
    users_file = tmp_path_factory.mktemp("owners") / "users.json"
    _, tokens = make_users(users_file, PASSWORDS, admins=("root",))
    config = StudioConfig(data_dir=elsewhere, models_dir=tmp_path_factory.mktemp("none"), auth="on",
                          users_file=users_file, limits={"max_body_bytes": UPLOAD_LIMIT})
    app = build_app(config)
    with serving(app) as url:
        yield url, app.state.studio, {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}


@pytest.fixture(scope="module")
def alices(studio) -> tuple[Path, str]:
    """A PNG of alice's, made through the REST API with her token: its path and image id."""
    base, app_studio, who = studio
    job_id = httpx.post(f"{base}/api/v1/jobs", headers=who["alice"], json={
        "prompt": "alice's secret", "model": "builtin:shapes", "width": 32, "height": 32, "steps": 2,
        "seed": 5}).json()["id"]
    deadline = time.time() + 120
    while (job := httpx.get(f"{base}/api/v1/jobs/{job_id}", headers=who["alice"]).json())["status"] != "done":
        assert job["status"] in ("queued", "running") and time.time() < deadline, job
        time.sleep(0.05)
    image_id = job["result"]["image_ids"][0]
    path = Path(app_studio.store.image(image_id)["path"])
    assert path.is_file() and app_studio.store.image_owner(path) == "alice"
    return path, image_id


@pytest.fixture(scope="module")
def alices_image(alices) -> Path:
    return alices[0]


def fetch(base, path, headers=None, method="GET"):
    return httpx.request(method, f"{base}/gradio_api/file={quote(str(path), safe='')}", headers=headers)


def refused_as_missing(reply, requested) -> bool:
    """Gradio's own answer for a file that is not there."""
    return reply.status_code == 403 and reply.json() == {"detail": f"File not allowed: {requested}."}


def test_a_history_image_is_its_owners_and_admins_only(studio, alices_image):
    base, _, who = studio
    png = alices_image.read_bytes()
    mine = fetch(base, alices_image, who["alice"])
    assert mine.status_code == 200 and mine.content == png
    assert fetch(base, alices_image, who["root"]).content == png
    assert fetch(base, alices_image).status_code == 401
    assert refused_as_missing(fetch(base, alices_image, who["bob"]), alices_image)
    missing = alices_image.with_name("000000-abcdef-txt2img-1-0.png")
    assert refused_as_missing(fetch(base, missing, who["bob"]), missing)
    assert refused_as_missing(fetch(base, missing, who["alice"]), missing)  # hers or not: no clue it's absent


def test_no_other_spelling_of_the_path_gets_through(studio, alices_image, tmp_path):
    base, _, who = studio
    folder = alices_image.parent
    link = tmp_path / "link.png"
    link.symlink_to(alices_image)
    Path(gradio.utils.get_upload_folder()).mkdir(parents=True, exist_ok=True)
    cache_link = Path(tempfile.mkdtemp(dir=gradio.utils.get_upload_folder())) / "innocent.png"
    cache_link.symlink_to(alices_image)  # a link where Gradio serves anything: it is alice's image all the same
    spellings = [
        f"{folder}/../{folder.name}/{alices_image.name}",  # ..
        f"{folder}/./{alices_image.name}",
        f"{folder}//{alices_image.name}",
        os.path.relpath(alices_image),  # relative to the server's cwd, as Gradio reads it
        str(link),  # Gradio follows links into its allowed folders
        str(cache_link),
    ]
    for spelling in spellings:
        assert refused_as_missing(fetch(base, spelling, who["bob"]), spelling), spelling
        assert fetch(base, spelling, who["alice"]).status_code == 200, spelling
    # The older route, HEAD, percent-encoding every character, and a trailing newline (Starlette's `$` matches
    # before it, so Gradio would get the path without it)
    encoded = "".join(f"%{byte:02X}" for byte in str(alices_image).encode())
    for url in (f"/gradio_api/file/{alices_image}", f"/gradio_api/file={encoded}", f"/gradio_api/file={encoded}%0A"):
        assert httpx.get(base + url, headers=who["bob"]).status_code == 403, url
        assert httpx.get(base + url, headers=who["alice"]).status_code == 200, url
    assert fetch(base, alices_image, who["bob"], method="HEAD").status_code == 403
    assert fetch(base, alices_image, who["alice"], method="HEAD").status_code == 200
    shutil.rmtree(cache_link.parent)


def test_a_file_in_the_outputs_that_is_nobodys_is_for_admins_only(studio):
    base, app_studio, who = studio
    stray = app_studio.outputs_dir / "stray" / "left-behind.png"
    stray.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "green").save(stray)
    assert app_studio.store.image_owner(stray) is None
    for user in ("alice", "bob"):
        assert refused_as_missing(fetch(base, stray, who[user]), stray)
    assert fetch(base, stray, who["root"]).content == stray.read_bytes()


def test_the_ui_shows_alice_her_images_and_bob_cannot_open_the_copies(studio):
    """Gradio copies each image the UI shows into its cache (a folder named by a seeded hash of the content, the
    file name kept): those copies are served to the image's owner only."""
    base, _, who = studio
    alice = Client(base, headers=who["alice"], download_files=False, verbose=False)
    _, gallery, _ = alice.predict("alice via the ui", "", 1, "builtin:shapes", 2, 7.0, 0, 0, 11, "Euler", 1, [],
                                  api_name="/generate")
    shown = gallery[0]["image"]["path"]
    assert Path(shown).is_relative_to(gradio.utils.get_upload_folder())  # Gradio's copy, not the outputs file
    assert fetch(base, shown, who["alice"]).status_code == 200
    assert fetch(base, shown, who["root"]).status_code == 200
    assert refused_as_missing(fetch(base, shown, who["bob"]), shown)
    history, _ = alice.predict("alice via the ui", "any", "any", "any time", api_name="/history")
    assert history and all(fetch(base, item["image"]["path"], who["alice"]).status_code == 200 for item in history)
    assert all(fetch(base, item["image"]["path"], who["bob"]).status_code == 403 for item in history)


def call(base, headers, api_name, data) -> str:
    """One event through Gradio's call API, raw (gradio_client would upload a local path first): its stream."""
    event = httpx.post(f"{base}/gradio_api/call/{api_name}", headers=headers, json={"data": data}).json()["event_id"]
    return httpx.get(f"{base}/gradio_api/call/{api_name}/{event}", headers=headers, timeout=60).text


def test_no_one_names_a_file_on_the_server_as_an_input(studio, alices_image):
    """An event's file inputs must be uploads (server.py makes Gradio check them; a mounted Blocks would not):
    bob cannot have PNG info read alice's prompt by naming her image's path, nor any other server file."""
    base, _, who = studio
    for user in ("bob", "alice"):  # alice neither: the UI uploads what it sends
        for path in (str(alices_image), "/etc/hostname"):
            answer = call(base, who[user], "png_info", [{"path": path, "meta": {"_type": "gradio.FileData"}}])
            assert "event: error" in answer and "not uploaded by a user" in answer, (user, path, answer)
            assert "alice's secret" not in answer
    # Nor a URL: Gradio would fetch it from any public host into its cache.
    for path in ("https://example.com/a.png", " HTTP://example.com/a.png"):
        refused = httpx.post(f"{base}/gradio_api/call/png_info", headers=who["bob"],
                             json={"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}]})
        assert refused.status_code == 422 and refused.json()["field"] == "data", refused.text
        joined = httpx.post(f"{base}/gradio_api/queue/join", headers=who["bob"], json={
            "data": [[{"image": {"path": path}}]], "fn_index": 0, "session_hash": "x"})
        assert joined.status_code == 422, joined.text
    parameters = PngInfo()
    parameters.add_text("parameters", "bob's own prompt\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buffer, format="PNG", pnginfo=parameters)
    [uploaded] = httpx.post(f"{base}/gradio_api/upload", headers=who["bob"],
                            files={"files": ("bobs.png", buffer.getvalue(), "image/png")}).json()
    answer = call(base, who["bob"], "png_info", [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}])
    assert "event: complete" in answer and "bob's own prompt" in answer  # an upload is read


def test_a_share_link_opens_alices_image_for_anyone(studio, alices):
    base, _, who = studio
    alices_image, image_id = alices
    link = httpx.post(f"{base}/api/v1/images/{image_id}/share", headers=who["alice"]).json()["url"]
    for headers in (who["bob"], None):
        shared = httpx.get(base + link, headers=headers)
        assert shared.status_code == 200 and shared.content == alices_image.read_bytes()


def test_bob_gets_the_ui_assets_and_his_own_uploads(studio):
    base, _, who = studio
    assert httpx.get(base + "/theme.css", headers=who["bob"]).status_code == 200
    page = httpx.get(base + "/", headers=who["bob"]).text
    [script] = re.findall(r'src="\./(assets/index-[^"]+\.js)"', page)  # the page's own bundle
    assert httpx.get(f"{base}/{script}", headers=who["bob"]).status_code == 200
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "blue").save(buffer, format="PNG")
    [uploaded] = httpx.post(f"{base}/gradio_api/upload", headers=who["bob"],
                            files={"files": ("bobs.png", buffer.getvalue(), "image/png")}).json()
    assert fetch(base, uploaded, who["bob"]).content == buffer.getvalue()


def test_owner_rules_in_one_place(tmp_path):
    """FileOwners.may_read without a server: every branch, and a path that cannot be resolved."""
    outputs, cache = tmp_path / "outputs", tmp_path / "cache"
    image = outputs / "2026-12-01" / "120000-abcdef-txt2img-7-0.png"
    copy = cache / ("ab" * 32) / image.name
    for path in (image, copy):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"png")
    owners = FileOwners(None, [outputs], cache, {str(image): "alice"}.get)
    assert owners.may_read(str(image), "alice") and not owners.may_read(str(image), "bob")
    assert owners.may_read(str(copy), "alice") and not owners.may_read(str(copy), "bob")
    assert not owners.may_read(str(outputs / "2026-12-01" / "nobodys.png"), "alice")
    assert owners.may_read(str(cache / "cd" / "upload.png"), "bob")  # not a history image: Gradio decides
    assert owners.may_read(str(cache / "cd" / "130000-abcdef-txt2img-7-0.png"), "bob")  # no such original
    assert not owners.may_read("x\0y", "alice")


def test_owners_are_found_however_the_outputs_folder_was_spelled(tmp_path, monkeypatch):
    """A relative data_dir saves relative paths in the store; a request names the file absolutely or relatively."""
    monkeypatch.chdir(tmp_path)
    image = Path("data/outputs/2026-12-01/120000-abcdef-txt2img-7-0.png")
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png")
    owners = FileOwners(None, [Path("data/outputs")], tmp_path / "cache", {str(image): "alice"}.get)
    for spelling in (str(image), str(tmp_path / image), f"./data/../{image}"):
        assert owners.may_read(spelling, "alice") and not owners.may_read(spelling, "bob"), spelling


def test_only_admins_may_upload_model_sized_files(studio):
    """Gradio's upload route carries the Models panel's imports (GBs), an admin's job; anyone else's uploads
    (images, datasets) are held to max_body_bytes, or one user could fill the disk 20 GB at a time."""
    base, _, who = studio
    big = {"files": ("big.bin", b"\0" * (UPLOAD_LIMIT + 1), "application/octet-stream")}
    refused = httpx.post(f"{base}/gradio_api/upload", headers=who["bob"], files=big)
    assert refused.status_code == 413 and "max_body_bytes" in refused.json()["detail"], refused.text
    assert httpx.post(f"{base}/gradio_api/upload", headers=who["root"], files=big).status_code == 200
    small = {"files": ("small.bin", b"\0" * 1000, "application/octet-stream")}
    assert httpx.post(f"{base}/gradio_api/upload", headers=who["bob"], files=small).status_code == 200
