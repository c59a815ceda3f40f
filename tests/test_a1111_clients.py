"""SillyTavern's and Open WebUI's A1111 call sequences, as their source makes them, against a studio with users,
over HTTP Basic (A1111's --api-auth, which both send); and Basic auth's own rules on /sdapi.

SillyTavern: src/endpoints/stable-diffusion.js (ping, samplers, schedulers, models, upscalers, vaes, get-model,
set-model with its progress poll, generate) with the txt2img body of public/scripts/extensions/stable-diffusion/
index.js (generateAutoImage). Open WebUI: backend/open_webui/routers/images.py (get_models, set_image_model
posting the whole options dict back, image_generations reading images[] and info).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from diffusion_studio.config import StudioConfig
from diffusion_studio.server import build_app
from servers import make_users, serving

PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111-clients")
    users, tokens = make_users(root / "users.json", PASSWORDS)
    config = StudioConfig(data_dir=root / "data", models_dir=root / "models", auth="on", users_file=root / "users.json")
    with serving(build_app(config)) as url:
        yield url, tokens, users


def basic(user: str, secret: str) -> str:
    """The header value both clients build from their "user:password" setting."""
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def test_basic_credentials_on_sdapi(secured):
    url, tokens, users = secured
    options = f"{url}/sdapi/v1/options"
    anonymous = httpx.get(options)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic ")
    for wrong in (basic("alice", "wrong-password"), basic("alice", tokens["bob"]), basic("nobody", "x" * 10),
                  "Basic not-base64!", basic("", PASSWORDS["alice"])):
        refused = httpx.get(options, headers={"Authorization": wrong})
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic "), wrong
    assert httpx.get(options, auth=("alice", PASSWORDS["alice"])).status_code == 200  # user + password
    assert httpx.get(options, auth=("alice", tokens["alice"])).status_code == 200  # user + API token
    assert httpx.get(options, headers={"Authorization": f"Bearer {tokens['alice']}"}).status_code == 200
    # Basic is A1111's: the studio's own API still takes only tokens and sessions
    elsewhere = httpx.get(f"{url}/api/v1/history", auth=("alice", PASSWORDS["alice"]))
    assert elsewhere.status_code == 401 and elsewhere.headers["www-authenticate"] == "Bearer"
    page = httpx.get(f"{url}/sdapi/v1/sd-models", headers={"accept": "text/html"})
    assert page.status_code == 401  # a browser gets the Basic prompt there, not the login page

    users.add("carol", "carol-password")
    assert httpx.get(options, auth=("carol", "carol-password")).status_code == 200  # remembered a minute...
    users.add("carol", "carol-new-password")
    assert httpx.get(options, auth=("carol", "carol-password")).status_code == 401  # ...unless the file changes
    assert httpx.get(options, auth=("carol", "carol-new-password")).status_code == 200


def test_sillytavern_sequence(secured):
    """As SillyTavern's server does it for its 'SD WebUI (A1111)' source, with auth 'alice:alice-password'."""
    url, _, _ = secured
    auth = {"Authorization": basic("alice", PASSWORDS["alice"])}
    with httpx.Client(base_url=url, headers=auth, timeout=120) as st:
        assert st.get("/sdapi/v1/options").status_code == 200  # /ping
        samplers = [x["name"] for x in st.get("/sdapi/v1/samplers").json()]
        schedulers = [x["name"] for x in st.get("/sdapi/v1/schedulers").json()]
        models = [{"value": x["title"], "text": x["title"]} for x in st.get("/sdapi/v1/sd-models").json()]
        upscalers = [x["name"] for x in st.get("/sdapi/v1/upscalers").json()]
        latent = [x["name"] for x in st.get("/sdapi/v1/latent-upscale-modes").json()]
        upscalers[1:1] = latent  # "0 = None, then Latent Upscalers, then Upscalers"
        vaes = [x["model_name"] for x in st.get("/sdapi/v1/sd-vae").json()]
        assert "DDIM" in samplers and "karras" in schedulers and upscalers[:2] == ["None", "Latent"]
        assert vaes == []  # none in this studio: SillyTavern shows its placeholder
        assert st.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "builtin:shapes"  # /get-model

        model = next(m["value"] for m in models if m["value"] == "builtin:shapes-xl")
        assert st.post("/sdapi/v1/options", json={"sd_model_checkpoint": model}).status_code == 200  # /set-model
        for _ in range(10):  # MAX_ATTEMPTS, CHECK_INTERVAL
            state = st.get("/sdapi/v1/progress").json()
            if state["progress"] == 0.0 and state["state"]["job_count"] == 0:
                break
        else:
            pytest.fail(f"progress never settled: {state}")

        assert "forge_preset" not in st.get("/sdapi/v1/options").json()  # /generate: not Forge
        body = {"url": url, "auth": f"alice:{PASSWORDS['alice']}",  # getSdRequestBody(): sent along as is
                "prompt": "a red circle", "negative_prompt": "blurry", "sampler_name": "DDIM",
                "scheduler": "normal", "steps": 3, "cfg_scale": 7, "width": 64, "height": 64,
                "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2,
                "denoising_strength": 0.7, "hr_second_pass_steps": 0,
                "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
                "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
                "do_not_save_samples": False}
        reply = st.post("/sdapi/v1/txt2img", json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))  # { format: 'png', data: images[0] }
        assert image.format == "PNG" and image.size == (64, 64)
        info = json.loads(data["info"])
        assert info["sd_model_name"] == "builtin:shapes-xl" and info["sampler_name"] == "DDIM"
        assert "Model: builtin:shapes-xl" in info["infotexts"][0]
        assert set(info["unhonoured"]) == {"scheduler", "url", "auth", "clip_skip"}  # said, not silently dropped
        assert PASSWORDS["alice"] not in reply.text  # the auth it sends along is not echoed back

    # options are per user: bob still has the studio's default
    bob = httpx.get(f"{url}/sdapi/v1/options", auth=("bob", PASSWORDS["bob"])).json()
    assert bob["sd_model_checkpoint"] == "builtin:shapes"


def test_open_webui_sequence(secured):
    """As Open WebUI's images router does it with AUTOMATIC1111_API_AUTH 'bob:<token>'."""
    url, tokens, _ = secured
    headers = {"authorization": basic("bob", tokens["bob"])}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as owui:
        models = [{"id": m["title"], "name": m["model_name"]} for m in owui.get("/sdapi/v1/sd-models").json()]
        model = next(m["id"] for m in models if m["name"] == "builtin:shapes-xl")
        options = owui.get("/sdapi/v1/options").json()  # set_image_model
        if model != options["sd_model_checkpoint"]:
            options["sd_model_checkpoint"] = model
            owui.post("/sdapi/v1/options", json=options).raise_for_status()  # the whole dict, back
        assert owui.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == model  # get_image_model

        data = {"prompt": "a blue square", "batch_size": 2, "width": 64, "height": 64, "steps": 3,
                "negative_prompt": ""}
        res = owui.post("/sdapi/v1/txt2img", json=data).json()
        images = []
        for image in res["images"]:  # get_image_data: no ',' in it, so base64 PNG
            assert "," not in image
            images.append(Image.open(io.BytesIO(base64.b64decode(image))))
        assert [i.size for i in images] == [(64, 64), (64, 64)]
        info = json.loads(res["info"])  # kept as the file's metadata
        assert info["sd_model_name"] == "builtin:shapes-xl" and len(info["all_seeds"]) == 2
        assert info["all_seeds"][1] == info["all_seeds"][0] + 1 and info["unhonoured"] == {}


def test_one_account_running_two_requests(secured):
    """Open WebUI sends every chat's images under its one A1111 account: progress counts both, interrupt stops
    both, and each answers with what it made."""
    url, tokens, _ = secured
    auth = {"Authorization": basic("alice", tokens["alice"])}
    replies = {}

    def generate(name):
        replies[name] = httpx.post(f"{url}/sdapi/v1/txt2img", headers=auth, timeout=120, json={
            "prompt": name, "width": 128, "height": 128, "steps": 150, "seed": 1})

    workers = [threading.Thread(target=generate, args=(name,)) for name in ("first", "second")]
    for worker in workers:
        worker.start()
    try:
        deadline = time.time() + 90
        while True:
            state = httpx.get(f"{url}/sdapi/v1/progress", headers=auth).json()["state"]
            if state["job_count"] == 2 and state["sampling_step"] >= 2:
                break
            assert time.time() < deadline, state
            time.sleep(0.05)
        assert httpx.post(f"{url}/sdapi/v1/interrupt", headers=auth).json() == {}
    finally:
        for worker in workers:
            worker.join(120)
    assert [replies[name].status_code for name in ("first", "second")] == [200, 200]
    made = sorted(len(replies[name].json()["images"]) for name in ("first", "second"))
    assert made in ([0, 1], [1, 1])  # the running one stops within a step, with its image; the queued one is
    # cancelled before it starts (or just after, with its image)
    assert httpx.get(f"{url}/sdapi/v1/progress", headers=auth).json()["state"]["job_count"] == 0
