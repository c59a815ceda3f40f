"""Models by name (issue 16, item 5): a user who is not an admin may name only what the studio lists (built-ins,
configured models, the models folders' entries, their own trained LoRAs); any other name, a path that exists or
not, `~root`, `../x` or a hub id, gets one refusal whose text differs only by the name, on every route a name enters
(REST jobs, A1111 options and txt2img, OpenAI images, recovered jobs, training). Admins still load by path. Error
messages show a server path by its last part only."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from diffusion_studio.config import StudioConfig
from diffusion_studio.requests import RequestError, image_to_base64
from diffusion_studio.server import build_app
from diffusion_studio.service.outcomes import scrub
from diffusion_studio.service.store import JobRecord, JobStatus
from diffusion_studio.service.training import install_lora, lora_owners
from diffusion_studio.studio import Studio
from diffusion_studio.training.config import TrainConfig

from model_trees import controlnet_folder, kohya_lora, vae_file
from servers import make_users, serving

QUICK = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "seed": 3}
NOT_LISTED = "is not a model this studio lists"


@dataclass
class Site:
    url: str
    studio: Studio
    headers: dict[str, dict[str, str]]  # user -> Authorization header
    root: Path  # the test's folder: data dir, models folder and the files outside both
    sd_folder: Path  # a diffusers folder outside the models folder

    def post(self, user: str, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers[user], timeout=60)

    def get(self, user: str, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers[user], timeout=60)

    def job(self, user: str, **fields) -> httpx.Response:
        return self.post(user, "/api/v1/jobs", {**QUICK, **fields})

    def finished(self, user: str, job_id: str) -> dict:
        deadline = time.time() + 120
        while (job := self.get(user, f"/api/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.time() < deadline, job
            time.sleep(0.05)
        return job


@pytest.fixture(scope="module")
def site(tmp_path_factory, sd_folder):
    root = tmp_path_factory.mktemp("names")
    models = root / "models"
    shutil.copytree(sd_folder, models / "listed-sd")  # the same tiny model, listed by name
    config = StudioConfig(data_dir=root / "data", models_dir=models, auth="on", users_file=root / "users.json",
                          preview_interval=0, rate_per_minute=6000, rate_burst=1000)  # probes are many, fast
    trained = kohya_lora(sd_folder, root / "trained" / "style.safetensors")
    install_lora(config, trained, "alice-style", "alice")
    install_lora(config, trained, "bob-style", "bob")
    install_lora(config, trained, "shared-style")  # trained with auth off: everyone's
    kohya_lora(sd_folder, root / "outside" / "stray-lora.safetensors")
    vae_file(sd_folder, root / "outside" / "stray-vae.safetensors")
    controlnet_folder(root / "outside" / "stray-canny")
    passwords = {name: f"{name}-password" for name in ("alice", "bob", "root")}
    _, tokens = make_users(config.users_file, passwords, admins=("root",))
    app = build_app(config)
    with serving(app) as url:
        yield Site(url, app.state.studio, {name: {"Authorization": f"Bearer {token}"}
                                           for name, token in tokens.items()}, root, sd_folder)


def probes(site: Site) -> list[str]:
    """Names a user might try: system paths that exist and that don't, home folders, traversal, a hub id, and real
    models reached by path (one outside the models folder, one inside it)."""
    return ["/etc", "/etc/passwd", "/nonexistent", "/no/such/thing", "~root", "~root/.bashrc", "~nosuchuser/x",
            "../x", "../../etc/passwd", "some-org/some-model", str(site.sd_folder),
            str(site.root / "models" / "listed-sd"), str(site.root / "outside" / "stray-lora.safetensors")]


def modulo_name(text: str) -> str:
    """The refusal with the (quoted) name it echoes replaced: what must be equal for every unlisted name."""
    return re.sub(r"'[^']*'", "'NAME'", text, count=1)


def refusal(reply: httpx.Response, status: int = 422) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    return body["detail"] if "detail" in body else body["error"]["message"]


def assert_alike(details: list[str], site: Site) -> str:
    """Every refusal the same but for the name, and, but for the name, none names a path on the server."""
    assert len({modulo_name(detail) for detail in details}) == 1, details
    rest = modulo_name(details[0])
    assert str(site.root) not in rest and "/etc" not in rest and "/tmp" not in rest, rest
    return details[0]


def test_unlisted_names_are_refused_alike_whether_or_not_they_exist(site):
    replies = [site.job("alice", model=name) for name in probes(site)]
    details = [refusal(reply) for reply in replies]
    assert {reply.json()["field"] for reply in replies} == {"model"}
    detail = assert_alike(details, site)
    assert NOT_LISTED in detail and "listed-sd" in detail and "builtin:shapes" in detail, detail
    assert not any("/tmp" in each for each in details)  # a typed path is echoed by its last part only
    # A built-in that doesn't exist says so, and lists the built-ins: the disk is not looked at either.
    assert "unknown built-in" in refusal(site.job("alice", model="builtin:../../etc"))


def test_a_user_runs_the_listed_name_and_an_admin_the_path(site):
    listed = site.job("alice", model="listed-sd")
    assert listed.status_code == 202, listed.text
    assert site.finished("alice", listed.json()["id"])["status"] == "done"
    by_path = site.job("root", model=str(site.sd_folder))
    assert by_path.status_code == 202, by_path.text
    assert site.finished("root", by_path.json()["id"])["status"] == "done"
    # Loaded by path: the listings name it so for the admin, by its last part for everyone else.
    def loaded(name, route):
        answer = httpx.get(f"{site.url}{route}", headers=site.headers[name]).json()
        return answer["loaded"] if "loaded" in answer else [{"name": model} for worker in answer["worker_list"]
                                                             for model in worker["models"]]
    for route in ("/api/v1/models", "/health", "/api/v1/queue"):
        assert str(site.sd_folder) in {row["name"] for row in loaded("root", route)}, route
        names = {row["name"] for row in loaded("bob", route)}
        assert site.sd_folder.name in names and not any("/" in name for name in names), (route, names)
    # The admin's own typing gets the full answer (what the path is), with the path shown by its last part.
    detail = refusal(site.job("root", model="/etc"))
    assert "folder 'etc' is not a diffusers pipeline" in detail and NOT_LISTED not in detail


def test_loras_vaes_and_controlnets_by_path_are_refused_for_users(site):
    outside = site.root / "outside"
    lora_details = [refusal(site.job("alice", model="listed-sd", loras=[{"name": name}]))
                    for name in (str(outside / "stray-lora.safetensors"), "/nonexistent.safetensors", "~root")]
    assert "is not a LoRA this studio lists" in assert_alike(lora_details, site)
    vae_details = [refusal(site.job("alice", model="listed-sd", vae=name))
                   for name in (str(outside / "stray-vae.safetensors"), "/etc/passwd", "/nonexistent")]
    assert "is not a VAE this studio lists" in assert_alike(vae_details, site)
    control = image_to_base64(Image.new("RGB", (32, 32), "white"))
    controlnet_replies = [site.job("alice", mode="controlnet", control_image=control, control_preprocess=False,
                                   controlnet=name) for name in (str(outside / "stray-canny"), "/etc", "/nope")]
    assert {reply.json()["field"] for reply in controlnet_replies} == {"controlnet"}
    assert NOT_LISTED in assert_alike([refusal(reply) for reply in controlnet_replies], site)
    # A1111's prompt tags name LoRAs too.
    tagged = site.post("alice", "/sdapi/v1/txt2img", {"prompt": "x <lora:/etc/passwd:1>", "steps": 2,
                                                      "width": 32, "height": 32})
    assert "is not a LoRA this studio lists" in refusal(tagged)
    # The admin may name the file.
    accepted = site.job("root", model="listed-sd", loras=[{"name": str(outside / "stray-lora.safetensors")}])
    assert accepted.status_code == 202, accepted.text
    assert site.finished("root", accepted.json()["id"])["status"] == "done"


def test_trained_loras_are_their_trainers_own(site):
    assert lora_owners(site.studio.config) == {"alice-style": "alice", "bob-style": "bob"}

    def listed(user: str) -> tuple[set[str], set[str]]:
        rest = {row["name"] for row in site.get(user, "/api/v1/models?kind=lora").json()["available"]}
        a1111 = {row["name"] for row in site.get(user, "/sdapi/v1/loras").json()}
        return rest, a1111

    assert listed("alice") == ({"alice-style", "shared-style"},) * 2
    assert listed("bob") == ({"bob-style", "shared-style"},) * 2
    assert listed("root") == ({"alice-style", "bob-style", "shared-style"},) * 2
    others = [refusal(site.job("bob", model="listed-sd", loras=[{"name": name}]))
              for name in ("alice-style", "no-such-style")]
    assert "is not a LoRA this studio lists" in assert_alike(others, site)
    assert "alice-style" not in modulo_name(others[0])  # the list of LoRAs offered leaves it out too
    own = site.job("alice", model="listed-sd", loras=[{"name": "alice-style"}])
    assert own.status_code == 202, own.text
    assert site.finished("alice", own.json()["id"])["status"] == "done"


def test_a1111_options_take_listed_checkpoints_and_vaes_only(site):
    checkpoints = [refusal(site.post("alice", "/sdapi/v1/options", {"sd_model_checkpoint": name}))
                   for name in ("/etc/passwd", "/nonexistent", "~root", str(site.sd_folder))]
    assert "no checkpoint" in assert_alike(checkpoints, site)
    vaes = [refusal(site.post("alice", "/sdapi/v1/options", {"sd_vae": name}))
            for name in (str(site.root / "outside" / "stray-vae.safetensors"), "/nonexistent")]
    assert "no VAE" in assert_alike(vaes, site)
    overridden = [refusal(site.post("alice", "/sdapi/v1/txt2img", {
        "prompt": "x", "steps": 2, "override_settings": {"sd_model_checkpoint": name}})) for name in ("/etc", "/nope")]
    assert_alike(overridden, site)
    chosen = site.post("alice", "/sdapi/v1/options", {"sd_model_checkpoint": "listed-sd"})
    assert chosen.status_code == 200 and chosen.json()["updated"] == ["model"], chosen.text


def test_openai_model_takes_listed_names_only(site):
    details = [refusal(site.post("alice", "/v1/images/generations", {"prompt": "x", "model": name, "size": "32x32"}),
                       400) for name in ("/etc/passwd", "/nonexistent", str(site.sd_folder), "some-org/some-model")]
    assert NOT_LISTED in assert_alike(details, site)


def test_recovered_jobs_are_checked_again(site, tmp_path):
    """A job queued before a restart runs only if its user may still name its model."""
    config = site.studio.config.model_copy(update={"data_dir": tmp_path / "data"})
    studio = Studio(config)
    for job_id, user, model in (("probe", "alice", "/etc/passwd"), ("listed", "alice", "listed-sd"),
                                ("admin", "root", str(site.sd_folder))):
        studio.store.add(JobRecord(id=job_id, user=user, request={**QUICK, "model": model}))

    async def restart() -> None:
        await studio.jobs.start()
        try:
            deadline = time.time() + 120
            while any(studio.store.get(job_id).status in (JobStatus.queued, JobStatus.running)
                      for job_id in ("listed", "admin")):
                assert time.time() < deadline
                await asyncio.sleep(0.05)
        finally:
            await studio.jobs.stop()

    asyncio.run(restart())
    probe = studio.store.get("probe")
    assert probe.status == JobStatus.failed and NOT_LISTED in probe.error.message, probe.error
    assert studio.store.get("listed").status == JobStatus.done
    assert studio.store.get("admin").status == JobStatus.done


def test_training_takes_listed_bases_and_uploaded_datasets_for_users(site, tmp_path):
    studio = site.studio
    run = {"method": "lora", "steps": 2, "output_dir": tmp_path / "run"}
    bases = []
    for base in ("/etc", "/nonexistent", str(site.sd_folder)):
        with pytest.raises(RequestError) as refused:
            studio.start_training("probe", TrainConfig(base=base, **run), "alice")
        bases.append(f"{refused.value.field}: {refused.value.message}")
    assert NOT_LISTED in assert_alike(bases, site) and bases[0].startswith("base:")
    datasets = []
    for dataset in ("/etc", "/nonexistent", str(studio.config.data_dir / "datasets" / ".." / "loras")):
        with pytest.raises(RequestError) as refused:
            studio.start_training("probe", TrainConfig(dataset=dataset, **run), "alice")
        datasets.append(refused.value.message)
    assert len(set(datasets)) == 1 and refused.value.field == "dataset"
    assert not (tmp_path / "run").exists()  # nothing was written for a refused run
    with pytest.raises(RequestError, match="name: use 1-48 letters"):  # the name becomes a folder: checked first
        studio.check_training("../../x", "alice")
    with pytest.raises(RequestError, match="'bob-style' exists and is not yours"):
        studio.check_training("bob-style", "alice")
    studio.check_training("alice-style", "alice")  # retraining one's own is fine
    # A trained LoRA is found before the models folders': named like a shared one, it would hide it from everyone
    # else and swap its weights under them.
    shared = kohya_lora(site.sd_folder, studio.config.models_dir / "loras" / "folder-style.safetensors")
    studio.refresh_models()
    try:
        with pytest.raises(RequestError, match="'folder-style' exists and is not yours"):
            studio.check_training("folder-style", "alice")
    finally:  # the module's other tests list LoRAs
        shared.unlink()
        studio.refresh_models()
    studio.check_training("bob-style", "root")  # and an admin may replace any


def test_scrub_shows_every_server_path_by_its_last_part():
    assert scrub("[Errno 2] No such file or directory: '/srv/models/x.bin'") == \
        "[Errno 2] No such file or directory: 'x.bin'"
    assert scrub("folder '/home/me/my models/tiny' is not a pipeline") == "folder 'tiny' is not a pipeline"
    assert scrub("can't read /etc/passwd, ~root/.ssh/id_rsa, file:///var/x or C:\\Users\\me\\x.ckpt") == \
        "can't read passwd, id_rsa, x or x.ckpt"
    assert scrub("<Foo object at 0x7f00aa> at /") == "<object> at /"
    # The studio's own routes and plain text stay as they are.
    for kept in ("checkpoints (GET /sdapi/v1/sd-models): a", "POST /api/v1/models with {\"path\": ...}",
                 "5/10 steps of a/b", "between 1 and 8 (got 9)"):
        assert scrub(kept) == kept
    for kept in ("see GET /health", "log in at /login?next=/", "scrape /metrics"):
        assert scrub(kept) == kept
    # A server folder whose name begins like a route is still a server path.
    assert scrub("no /healthcheck/x.ckpt, /metrics_data/a.bin or /api/../etc/passwd") == "no x.ckpt, a.bin or passwd"
