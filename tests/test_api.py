"""/api/v1 over real HTTP against a running server: jobs, events (SSE), history, images, models, png-info."""

import base64
import io
import json
import time

import httpx
from PIL import Image

from diffusion_studio.requests import image_to_base64


def wait_done(base, job_id, timeout=60):
    deadline = time.time() + timeout
    while (job := httpx.get(f"{base}/api/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.05)
    return job


def test_job_lifecycle_and_image(server):
    base, _ = server
    created = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "api circle", "steps": 3, "seed": 9})
    assert created.status_code == 202 and created.json()["status"] == "queued"
    job = wait_done(base, created.json()["id"])
    assert job["status"] == "done" and job["result"]["seeds"] == [9] and job["request"]["prompt"] == "api circle"
    png = httpx.get(base + job["images"][0])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    info = httpx.post(f"{base}/api/v1/png-info", json={"image": base64.b64encode(png.content).decode()}).json()
    assert info["parameters"]["seed"] == 9 and "Steps: 3" in info["text"]["parameters"]
    uploaded = httpx.post(f"{base}/api/v1/png-info", files={"file": ("x.png", png.content, "image/png")}).json()
    assert uploaded["parameters"] == info["parameters"]


def test_img2img_with_base64_image(server):
    base, _ = server
    image = Image.new("RGB", (64, 64), "red")
    created = httpx.post(f"{base}/api/v1/jobs", json={"mode": "img2img", "prompt": "api img2img", "steps": 2,
                                                      "init_image": image_to_base64(image), "strength": 0.5})
    job = wait_done(base, created.json()["id"])
    assert job["status"] == "done" and "init_image" not in job["request"]


def test_events_stream_steps_then_done(server):
    base, _ = server
    job_id = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "api events", "steps": 3, "seed": 1}).json()["id"]
    kinds, previews = [], 0
    with httpx.stream("GET", f"{base}/api/v1/jobs/{job_id}/events", timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: "))
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                previews += bool(data.get("preview"))
    assert kinds[-1] == "done" and kinds.count("step") >= 1
    assert previews >= 1  # base64 latent previews
    again = httpx.get(f"{base}/api/v1/jobs/{job_id}/events", timeout=10).text
    assert again.startswith("event: done")  # a finished job's stream says so and ends


def test_cancel_errors_history_and_models(server):
    base, _ = server
    job_id = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "api long", "steps": 150, "width": 256,
                                                     "height": 256}).json()["id"]
    deadline = time.time() + 30
    while httpx.get(f"{base}/api/v1/jobs/{job_id}").json()["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.05)
    assert httpx.post(f"{base}/api/v1/jobs/{job_id}/cancel").status_code == 200
    assert wait_done(base, job_id)["status"] == "cancelled"

    bad = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "x", "width": 61})
    assert bad.status_code == 422 and "width: must be a multiple of 8" in bad.json()["detail"]
    unknown = httpx.post(f"{base}/api/v1/jobs", json={"model": "nowhere"})  # refused before it is queued
    assert unknown.status_code == 422 and unknown.json()["kind"] == "invalid_request"
    assert unknown.json()["field"] == "model" and "'nowhere'" in unknown.json()["detail"]
    assert httpx.get(f"{base}/api/v1/jobs/nope").status_code == 404
    assert httpx.get(f"{base}/api/v1/images/nope").status_code == 404
    not_png = httpx.post(f"{base}/api/v1/png-info", json={"image": base64.b64encode(b"text").decode()})
    assert not_png.status_code == 422 and not_png.json()["field"] == "image"

    found = httpx.get(f"{base}/api/v1/history", params={"prompt": "api circle"}).json()
    assert [job["request"]["prompt"] for job in found] == ["api circle"]
    assert all(job["request"]["mode"] == "img2img" for job in
               httpx.get(f"{base}/api/v1/history", params={"mode": "img2img"}).json())

    models = httpx.get(f"{base}/api/v1/models").json()
    assert models["available"][0]["name"] == "builtin:shapes"
    assert any(m["name"] == "builtin:shapes" for m in models["loaded"])
    unloaded = httpx.post(f"{base}/api/v1/models/builtin:shapes/unload").json()
    assert unloaded == {"name": "builtin:shapes", "unloaded": True}


def test_openapi_lists_the_routes(server):
    base, _ = server
    paths = httpx.get(f"{base}/openapi.json").json()["paths"]
    for path in ("/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/cancel",
                 "/api/v1/jobs/{job_id}/events", "/api/v1/history", "/api/v1/images/{image_id}", "/api/v1/models",
                 "/api/v1/png-info", "/health"):
        assert path in paths, path


def test_a1111_client_calls(server):
    base, _ = server
    samplers = httpx.get(f"{base}/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M Karras"} <= {s["name"] for s in samplers}
    assert httpx.get(f"{base}/sdapi/v1/sd-models").json()[0]["title"] == "builtin:shapes"
    payload = {"prompt": "a1111 circle", "negative_prompt": "", "steps": 3, "cfg_scale": 6, "seed": 77,
               "sampler_name": "DPM++ 2M", "scheduler": "Karras", "batch_size": 2, "n_iter": 2, "width": 64,
               "height": 64, "restore_faces": False, "send_images": True}  # unknown A1111 keys are ignored
    reply = httpx.post(f"{base}/sdapi/v1/txt2img", json=payload, timeout=120).json()
    assert len(reply["images"]) == 4 and reply["parameters"] == payload
    info = json.loads(reply["info"])
    assert info["all_seeds"] == [77, 78, 79, 80] and info["sampler_name"] == "DPM++ 2M Karras"
    assert "Seed: 79" in info["infotexts"][2]
    first = Image.open(io.BytesIO(base64.b64decode(reply["images"][0])))
    read = httpx.post(f"{base}/sdapi/v1/png-info", json={"image": reply["images"][0]}).json()
    assert read["info"].startswith("a1111 circle\nSteps: 3, Sampler: DPM++ 2M Karras") and first.size == (64, 64)

    source = image_to_base64(Image.new("RGB", (64, 64), "white"))
    mask = image_to_base64(Image.new("L", (64, 64), 255))
    inpainted = httpx.post(f"{base}/sdapi/v1/img2img", timeout=120, json={
        "prompt": "a1111 inpaint", "init_images": [source], "mask": mask, "denoising_strength": 0.6, "steps": 2,
        "seed": 3}).json()
    assert len(inpainted["images"]) == 1 and json.loads(inpainted["info"])["seed"] == 3
    missing = httpx.post(f"{base}/sdapi/v1/img2img", json={"prompt": "x"})
    assert missing.status_code == 422 and "init_images" in missing.json()["detail"]
    idle = httpx.get(f"{base}/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["sampling_steps"] == 0


def test_a1111_progress_and_interrupt(server):
    import threading

    base, _ = server
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(reply=httpx.post(
        f"{base}/sdapi/v1/txt2img", json={"prompt": "a1111 long", "steps": 150, "width": 256, "height": 256},
        timeout=120)))
    thread.start()
    deadline = time.time() + 60
    while (progress := httpx.get(f"{base}/sdapi/v1/progress").json())["state"]["sampling_step"] < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    httpx.post(f"{base}/sdapi/v1/interrupt")
    thread.join(60)
    assert outcome["reply"].status_code == 200  # A1111 returns what was made before the interrupt


def test_metrics_after_jobs(server):
    base, _ = server
    text = httpx.get(f"{base}/metrics").text
    assert 'studio_jobs_total{status="done"}' in text and 'studio_jobs_total{status="cancelled"}' in text
    for name in ("studio_queue_wait_seconds_count", "studio_job_seconds_count", "studio_step_seconds_count",
                 "studio_last_it_per_second", "studio_last_peak_memory_bytes", "studio_queue_length",
                 "studio_jobs_running"):
        assert name in text, name


def test_cache_hit_over_http(server):
    base, _ = server
    body = {"prompt": "api cached", "steps": 4, "seed": 1234}
    first = wait_done(base, httpx.post(f"{base}/api/v1/jobs", json=body).json()["id"])
    again = httpx.post(f"{base}/api/v1/jobs", json=body).json()
    assert again["status"] == "done"  # answered at submit time, without queueing
    second = httpx.get(f"{base}/api/v1/jobs/{again['id']}").json()
    assert second["result"]["cached"] is True and second["result"]["seeds"] == first["result"]["seeds"]
    assert httpx.get(base + second["images"][0]).content == httpx.get(base + first["images"][0]).content
    bad_model = httpx.post(f"{base}/api/v1/jobs", json={"model": "nowhere", "seed": 1})
    assert bad_model.status_code == 422 and bad_model.json()["field"] == "model"


def test_delete_and_export_history(server):
    import zipfile

    base, studio = server
    job = wait_done(base, httpx.post(f"{base}/api/v1/jobs", json={"prompt": "api export", "steps": 2,
                                                                  "batch_size": 2}).json()["id"])
    archive = zipfile.ZipFile(io.BytesIO(httpx.get(f"{base}/api/v1/history/export",
                                                   params={"prompt": "api export"}).content))
    names = archive.namelist()
    assert "history.json" in names and sum(name.startswith(job["id"] + "/") for name in names) == 2
    assert json.loads(archive.read("history.json"))[0]["id"] == job["id"]
    files = studio.image_paths(studio.store.get(job["id"]).result["image_ids"])
    assert httpx.delete(f"{base}/api/v1/jobs/{job['id']}").json() == {"deleted": job["id"], "files": 2}
    assert not any(path.exists() for path in files)
    assert httpx.get(f"{base}/api/v1/jobs/{job['id']}").status_code == 404


def test_websocket_submit_follow_and_cancel(server):
    from websockets.sync.client import connect

    base, _ = server
    with connect(base.replace("http", "ws") + "/api/v1/ws") as socket:
        socket.send(json.dumps({"action": "submit", "request": {"prompt": "ws job", "steps": 3, "seed": 2}}))
        messages = []
        while not messages or messages[-1]["kind"] not in ("done", "failed"):
            messages.append(json.loads(socket.recv(timeout=60)))
        kinds = [m["kind"] for m in messages]
        assert kinds[0] == "accepted" and "running" in kinds and kinds.count("step") == 3 and kinds[-1] == "done"
        assert messages[-1]["result"]["seeds"] == [2]
        job_id = messages[0]["job_id"]
        socket.send(json.dumps({"action": "subscribe", "job_id": job_id}))
        assert json.loads(socket.recv(timeout=10))["kind"] == "done"
        socket.send(json.dumps({"action": "submit", "request": {"prompt": "ws", "width": 61}}))
        assert "width: must be a multiple of 8" in json.loads(socket.recv(timeout=10))["detail"]
        socket.send(json.dumps({"action": "submit", "request": {"prompt": "ws long", "steps": 150, "width": 256,
                                                                "height": 256}}))
        long_id = json.loads(socket.recv(timeout=10))["job_id"]
        while json.loads(socket.recv(timeout=60))["kind"] != "step":
            pass
        socket.send(json.dumps({"action": "cancel", "job_id": long_id}))
        while (message := json.loads(socket.recv(timeout=60)))["kind"] not in ("cancelled", "done", "failed"):
            pass
        assert message["kind"] == "cancelled"


def test_batched_jobs_over_http_match_lone_runs(server):
    """Three clients' compatible jobs queue while paused and run as one pipeline call; each job's PNG has the
    bytes of the same request run alone."""
    base, studio = server
    shared = {"steps": 3, "guidance": 6.0, "seed": 123}
    prompts = ["a red star on a black background", "a blue circle on a white background",
               "a yellow square on a gray background"]
    httpx.post(f"{base}/api/v1/queue/pause")
    ids = [httpx.post(f"{base}/api/v1/jobs", json={"prompt": p, **shared}).json()["id"] for p in prompts]
    assert httpx.get(f"{base}/api/v1/queue").json()["queued"] == 3
    httpx.post(f"{base}/api/v1/queue/resume")
    jobs = [wait_done(base, job_id) for job_id in ids]
    assert [job["result"]["batched_with"] for job in jobs] == [3, 3, 3]
    for prompt, job in zip(prompts, jobs):
        alone = studio.engine.run(studio.validate({"prompt": prompt, **shared}))
        served = Image.open(io.BytesIO(httpx.get(base + job["images"][0]).content)).convert("RGB")
        assert served.tobytes() == alone.images[0].tobytes()


def test_restart_keeps_history_interrupts_the_running_job_and_requeues_the_rest(tmp_path):
    """Two servers on one data dir, one after the other: what the first left behind is there in the second."""
    from diffusion_studio.config import StudioConfig
    from diffusion_studio.server import build_app
    from servers import serving

    def app():
        return build_app(StudioConfig(data_dir=tmp_path, models_dir=tmp_path / "none", preview_interval=0,
                                      workers=1))

    with serving(app()) as base:
        finished = wait_done(base, httpx.post(f"{base}/api/v1/jobs", json={"prompt": "kept", "steps": 2}).json()["id"])
        running = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "long", "steps": 150, "width": 256,
                                                          "height": 256}).json()["id"]
        queued = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "waiting", "steps": 2}).json()["id"]
        while httpx.get(f"{base}/api/v1/jobs/{running}").json()["status"] != "running":
            time.sleep(0.05)
    # the studio stopped while `long` ran and `waiting` waited

    with serving(app()) as base:
        kept = httpx.get(f"{base}/api/v1/jobs/{finished['id']}").json()
        assert kept["status"] == "done" and httpx.get(base + kept["images"][0]).status_code == 200
        assert httpx.get(f"{base}/api/v1/jobs/{running}").json()["status"] == "interrupted"
        assert wait_done(base, queued)["status"] == "done"  # queued again, and ran
