"""Every malformed request is a 4xx that names the field, on every route, over real HTTP; nothing is queued for a
refused request and no response carries a server path or an object repr."""

import base64
import io
import json
import socket
import struct
import zlib
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image, PngImagePlugin

from diffusion_studio.requests import image_to_base64


def png(image: Image.Image | None = None, **chunks) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, (value, compressed) in chunks.items():
        info.add_text(key.replace("_", "-"), value, zip=compressed)
    buffer = io.BytesIO()
    (image or Image.new("RGB", (8, 8), "red")).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def huge_header_png(width=20000, height=20000) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with a few bytes of pixels: a decompression bomb."""
    data = png()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return data[:8] + chunk + data[8 + 25:]


GOOD = png()
NOISE = png(Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48))  # incompressible: a long IDAT to cut
B64 = base64.b64encode
IMAGES = {  # name -> bytes of a bad image
    "truncated": NOISE[:len(NOISE) // 2],
    "bomb header": huge_header_png(),
    "json list chunk": png(diffusion_studio=("[1, 2]", False)),
    "2 MB zTXt": png(parameters=("x" * (2 * 2**20), True)),
    "not an image": b"hello, world",
}
UNREADABLE = [data for name, data in IMAGES.items() if name != "json list chunk"]  # that one's pixels are fine

JOBS, TXT, IMG, A_PNG, PNG_INFO = ("/api/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info",
                                   "/api/v1/png-info")
BODIES = [  # (route, raw body, expected status, expected field)
    *[(route, body, 422, "body") for route in (JOBS, TXT, IMG, A_PNG, PNG_INFO)
      for body in (b"", b"{", b"\xff\xfe{}", b"[1, 2]", b'"text"', b"null")],
    (JOBS, {"prompt": "x", "width": "abc"}, 422, "width"),
    (JOBS, {"prompt": "x", "steps": None}, 422, "steps"),
    (JOBS, {"prompt": "x", "nonsense": 1}, 422, "nonsense"),
    (JOBS, {"mode": "img2img", "init_image": "data:image/png;base64"}, 422, "init_image"),
    (JOBS, {"mode": "img2img", "init_image": "!!not base64!!"}, 422, "init_image"),
    *[(JOBS, {"mode": "img2img", "init_image": B64(data).decode()}, 422, "init_image") for data in UNREADABLE],
    (TXT, {"n_iter": "abc"}, 422, "n_iter"),
    (TXT, {"n_iter": [2]}, 422, "n_iter"),
    (TXT, {"n_iter": 100000}, 422, "n_iter"),
    (TXT, {"n_iter": 5, "batch_size": 4}, 422, "n_iter"),
    (TXT, {"override_settings": "x"}, 422, "override_settings"),
    (TXT, {"sampler_name": 5, "scheduler": "Karras"}, 422, "sampler_name"),
    (TXT, {"steps": "many"}, 422, "steps"),
    (TXT, {"width": 61}, 422, "width"),
    (IMG, {"init_images": "notalist"}, 422, "init_images"),
    (IMG, {"init_images": []}, 422, "init_images"),
    (IMG, {"init_images": ["data:image/png;base64"]}, 422, "init_images"),  # named as the client sent it
    (IMG, {"init_images": [B64(GOOD).decode()], "mask": "!!"}, 422, "mask"),
    (IMG, {"init_images": [B64(GOOD).decode()], "denoising_strength": 2}, 422, "denoising_strength"),
    (TXT, {"sampler_name": "Nonexistent"}, 422, "sampler_name"),
    (TXT, {"cfg_scale": 99}, 422, "cfg_scale"),
    *[(IMG, {"init_images": [B64(data).decode()]}, 422, "init_images") for data in UNREADABLE],
    (A_PNG, {"image": 5}, 422, "image"),
    (A_PNG, {}, 422, "image"),
    (A_PNG, {"image": "data:image/png;base64"}, 422, "image"),
    # A1111's png-info reads text chunks only: a JSON list chunk is just text there (tested below).
    *[(A_PNG, {"image": B64(data).decode()}, 422, "image") for data in UNREADABLE],
    (PNG_INFO, {"image": None}, 422, "image"),
    *[(PNG_INFO, {"image": B64(data).decode()}, 422, "image") for data in IMAGES.values()],
]


def body_id(case) -> str:
    route, body, _, field = case
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else json.dumps(body)
    return f"{route} {field} {text[:40]}"


def post(base: str, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(base + route, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    return httpx.post(base + route, json=body, timeout=30)


def assert_clean(response: httpx.Response, status: int, field: str | None) -> dict:
    assert response.status_code == status, response.text
    data = response.json()
    assert data["kind"] and data["detail"]
    if field is not None:
        assert data["field"] == field, data
    for leak in ("/tmp/", "/work/", "/root/", " object at 0x", "Traceback"):
        assert leak not in data["detail"], data
    return data


@pytest.mark.parametrize("case", BODIES, ids=body_id)
def test_malformed_bodies_are_4xx_naming_the_field(server, case):
    base, studio = server
    route, body, status, field = case
    before = len(studio.history(None, limit=100_000))
    assert_clean(post(base, route, body), status, field)
    assert len(studio.history(None, limit=100_000)) == before  # refused before any job was queued


@pytest.mark.parametrize("files, data, field", [
    ({"other": ("x.png", GOOD, "image/png")}, None, "file"),
    ({"file": ("x.png", IMAGES["bomb header"], "image/png")}, None, "image"),
    ({"file": ("x.png", IMAGES["truncated"], "image/png")}, None, "image"),
    ({"file": ("x.png", IMAGES["2 MB zTXt"], "image/png")}, None, "image"),
    (None, {"file": "not a file"}, "file"),
])
def test_png_info_multipart_refusals(server, files, data, field):
    base, _ = server
    response = httpx.post(f"{base}{PNG_INFO}", files=files, data=data, timeout=30) if files else \
        httpx.post(f"{base}{PNG_INFO}", data=data, files={"dummy": ("", b"", "text/plain")}, timeout=30)
    assert_clean(response, 422, field)


def test_broken_multipart_is_4xx(server):
    base, _ = server
    for content in (b"--x\r\nnonsense", b"--x\r\nContent-Disposition: form-data\r\n\r\n\r\n--x--\r\n"):
        response = httpx.post(f"{base}{PNG_INFO}", content=content,
                              headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=30)
        assert response.status_code == 422 and response.json()["field"] in ("body", "file"), response.text


def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    base, studio = server
    limit = studio.config.limits.max_body_bytes
    url = urlparse(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as connection:
        connection.sendall(f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {limit + 1}\r\n\r\n{{".encode())  # the body never comes
        reply = b""
        while b"max_body_bytes" not in reply and (chunk := connection.recv(65536)):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "max_body_bytes" in reply


def test_a1111_png_info_of_odd_but_readable_pngs(server):
    base, _ = server
    plain = httpx.post(f"{base}{A_PNG}", json={"image": image_to_base64(Image.new("RGB", (8, 8)))}, timeout=30)
    assert plain.status_code == 200 and plain.json()["info"] == ""
    listed = httpx.post(f"{base}{A_PNG}", json={"image": B64(IMAGES["json list chunk"]).decode()}, timeout=30)
    assert listed.status_code == 200 and listed.json()["items"] == {"diffusion-studio": "[1, 2]"}


def test_websocket_bad_messages_are_errors_and_the_socket_stays_open(server):
    from websockets.sync.client import connect

    base, _ = server
    with connect(base.replace("http", "ws") + "/api/v1/ws") as ws:
        for message, field in (("not json", "message"), ("[1]", "message"),
                               (json.dumps({"action": "submit", "priority": "high"}), "priority"),
                               (json.dumps({"action": "dance"}), "action"),
                               (json.dumps({"action": "submit", "request": {"width": "x"}}), "width")):
            ws.send(message)
            reply = json.loads(ws.recv(timeout=10))
            assert reply["kind"] == "error" and reply["field"] == field, reply
