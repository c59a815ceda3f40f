"""The Ray executor on a real Ray cluster on loopback: a head with no CPUs of its own and two worker nodes of one CPU
each (ray.cluster_utils starts real raylets, as `ray start` does), so each engine actor is a process of its own
on its own node. The studio is served over HTTP and driven as a client would."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import time

import httpx
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from diffusion_studio.config import StudioConfig  # noqa: E402
from diffusion_studio.server import build_app  # noqa: E402

from servers import serving  # noqa: E402

REQUEST = {"prompt": "a red circle on white", "steps": 4, "width": 64, "height": 64}


def wait_until(check, timeout=90, every=0.2):
    deadline = time.time() + timeout
    while not (value := check()):
        assert time.time() < deadline, "timed out"
        time.sleep(every)
    return value


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def served(cluster, data_dir, tmp_path_factory):
    config = StudioConfig(data_dir=data_dir, models_dir=tmp_path_factory.mktemp("ray-models"), executor="ray",
                          ray_address=cluster[0].address, ray_workers=2, batch_images=1, cache_entries=0,
                          torch_threads=1,
                          preview_interval=1)
    app = build_app(config)
    with serving(app) as url:
        wait_until(lambda: len(workers(url)) == 2, timeout=120)
        yield url, app.state.studio


def workers(url):
    return httpx.get(f"{url}/api/v1/queue").json()["worker_list"]


def finished(url, job_id, timeout=120):
    return wait_until(lambda: (job := httpx.get(f"{url}/api/v1/jobs/{job_id}").json())["status"]
                      not in ("queued", "running") and job, timeout)


def pixels(url, job):
    return Image.open(io.BytesIO(httpx.get(url + job["images"][0]).content)).convert("RGB").tobytes()


def test_eight_jobs_spread_over_both_workers_and_match_the_local_executor(served, engine):
    url, studio = served
    ids = [httpx.post(f"{url}/api/v1/jobs", json={**REQUEST, "seed": seed}).json()["id"] for seed in range(8)]
    jobs = [finished(url, job_id) for job_id in ids]
    assert [job["status"] for job in jobs] == ["done"] * 8
    ran_on = {job["result"]["worker"] for job in jobs}
    assert ran_on == {worker["id"] for worker in workers(url)} and len(ran_on) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors run (torch_threads=1): CPU sums are split by the thread count
    try:
        for seed in (0, 5):  # the same request and seed in this process, on the local executor's engine
            local = engine.run(studio.validate({**REQUEST, "seed": seed})).images[0]
            assert pixels(url, jobs[seed]) == local.tobytes()
    finally:
        torch.set_num_threads(threads)
    listed = workers(url)
    assert all(worker["models"] == ["builtin:shapes"] and worker["device"] == "cpu" for worker in listed)
    queue = httpx.get(f"{url}/api/v1/queue").json()
    assert queue["executor"] == "ray" and queue["workers"] == 2 and queue["pending"] == 0


def test_previews_and_cancel_cross_the_process_boundary(served):
    url, _ = served
    slow = {**REQUEST, "steps": 60, "seed": 3, "width": 128, "height": 128}  # steps slower than the cancel's trip
    job_id = httpx.post(f"{url}/api/v1/jobs", json=slow).json()["id"]
    steps_after_cancel = []
    cancelled_at = None
    with httpx.stream("GET", f"{url}/api/v1/jobs/{job_id}/events", timeout=120) as response:
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "step":
                preview = json.loads(line[6:])["preview"]  # the actor's preview, sent back with its step
                assert Image.open(io.BytesIO(base64.b64decode(preview.split(",")[-1]))).size[0] > 0
                if cancelled_at is None:
                    cancelled_at = time.time()
                    assert httpx.post(f"{url}/api/v1/jobs/{job_id}/cancel").status_code == 200
                else:
                    steps_after_cancel.append(line)
            elif line.startswith("data: ") and kind in ("cancelled", "done", "failed"):
                break
    job = finished(url, job_id)
    assert job["status"] == "cancelled"
    # The engine stopped within a step of the cancel crossing over (plus events already on their way to us).
    assert len(steps_after_cancel) <= 3, len(steps_after_cancel)


def test_the_time_limit_reaches_the_actor(served):
    url, studio = served
    studio.jobs.time_limit_s = 1.0
    try:
        job_id = httpx.post(f"{url}/api/v1/jobs", json={**REQUEST, "steps": 150, "seed": 4, "width": 128,
                                                         "height": 128}).json()["id"]
        started = time.time()
        job = finished(url, job_id)
    finally:
        studio.jobs.time_limit_s = 600
    assert job["status"] == "failed" and job["error"]["kind"] == "time_limit"
    assert time.time() - started < 20  # stopped at its next step, not after its 150 steps


def test_a_killed_worker_process_has_its_job_finish_on_the_other(served):
    url, _ = served
    before = {worker["id"] for worker in workers(url)}
    slow = {**REQUEST, "steps": 60, "seed": 11, "width": 128, "height": 128}
    job_id = httpx.post(f"{url}/api/v1/jobs", json=slow).json()["id"]
    killed, kinds = None, []
    with httpx.stream("GET", f"{url}/api/v1/jobs/{job_id}/events", timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("event: "):
                continue
            kinds.append(kind := line[7:])
            if kind == "step" and killed is None:  # mid-job: kill the actor's process (its id is ray-<pid>@<node>)
                killed = next(worker for worker in workers(url) if job_id in worker["jobs"])
                os.kill(int(killed["id"].split("-")[1].split("@")[0]), signal.SIGKILL)
            if kind in ("done", "failed", "cancelled", "interrupted"):
                break
    job = finished(url, job_id)
    assert job["status"] == "done" and job["result"]["worker"] != killed["id"]
    assert job["result"]["worker"] in before
    assert "queued" in kinds[kinds.index("step"):]  # back in the queue, then run again
    metrics = httpx.get(f"{url}/metrics").text
    assert "studio_worker_deaths_total 1.0" in metrics
    replaced = wait_until(lambda: len(listed := workers(url)) == 2 and listed, timeout=120)  # a new actor joined
    assert killed["id"] not in {worker["id"] for worker in replaced}


def test_with_every_worker_gone_jobs_wait_and_health_is_degraded_until_one_joins(served, cluster):
    url, _ = served
    head, nodes = cluster
    for node in nodes:
        head.remove_node(node)
    wait_until(lambda: not workers(url), timeout=60)
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "degraded" and any("workers" in reason for reason in health["reasons"])
    job_id = httpx.post(f"{url}/api/v1/jobs", json={**REQUEST, "seed": 21}).json()["id"]
    time.sleep(2)
    assert httpx.get(f"{url}/api/v1/jobs/{job_id}").json()["status"] == "queued"  # waiting, not failed
    nodes[:] = [head.add_node(num_cpus=1)]  # a node joins the cluster: an actor is placed on it
    job = finished(url, job_id, timeout=180)
    assert job["status"] == "done"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
