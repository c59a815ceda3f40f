"""Importing a model (POST /api/v1/models, admin only): the header decides what it is before anything is written;
refusals leave the folders as they were; an accepted file is listed at once and usable; a taken name, a loaded
model and a model in use are 409; uploads are bounded by their own limit, not max_body_bytes."""


import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from diffusion_studio.config import StudioConfig
from diffusion_studio.requests import GenerationRequest
from diffusion_studio.server import build_app
from full_size import checkpoint_shapes, write_sparse_safetensors
from model_trees import a1111_tree, kohya_lora, tree_state
from servers import make_users


def sparse_checkpoint(path, variant="v1"):
    """A full-size fp16 checkpoint's header with its data left as a hole: identified exactly like the real file
    (2.1 GB long) while taking no disk space."""
    return write_sparse_safetensors(path, {name: (shape, torch.float16)
                                           for name, shape in checkpoint_shapes(variant).items()})


@pytest.fixture(scope="module")
def site(sd_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    data_dir = root / "data"  # its own: a LoRA "trained" into it below
    _, tokens = make_users(root / "users.json", {"root": "root-password", "alice": "alice-password"}, admins=("root",))
    tokens = {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}
    webui = a1111_tree(root / "webui", sd_folder)
    files = root / "files"
    files.mkdir()
    config = StudioConfig(data_dir=data_dir, models_dir=root / "own", models_dirs=[webui], auth="on",
                          users_file=root / "users.json", preview_interval=0,
                          limits={"max_body_bytes": 2**20, "max_model_upload_bytes": 8 * 2**20})
    app = build_app(config)
    with TestClient(app, base_url="http://localhost") as client:  # a loopback studio answers only as such
        yield {"client": client, "studio": app.state.studio, "tokens": tokens, "own": root / "own",
               "webui": webui, "files": files, "sd_folder": sd_folder, "data_dir": data_dir}


def upload(site, file_name, content, user="root", **fields):
    return site["client"].post("/api/v1/models", headers=site["tokens"][user],
                               files={"file": (file_name, content, "application/octet-stream")}, data=fields)


def leftovers(site):
    imports = site["data_dir"] / "imports"
    return sorted(path.name for path in imports.iterdir()) if imports.is_dir() else []


def test_refusals_write_nothing(site):
    own = site["own"]
    own.mkdir(exist_ok=True)
    lora = kohya_lora(site["sd_folder"], site["files"] / "inkwash.safetensors").read_bytes()
    before = tree_state(own), tree_state(site["webui"])
    assert upload(site, "x.safetensors", lora, user="alice").status_code == 403  # admins only
    text = upload(site, "notes.safetensors", b"just some notes, not a model\n" * 1000)
    assert text.status_code == 422 and text.json()["field"] == "file"
    assert "'notes.safetensors' is not a safetensors file (no valid header)" in text.json()["detail"]
    assert upload(site, "notes.txt", b"hello").json()["detail"].startswith("file: 'notes.txt' is not a model file")
    mismatch = upload(site, "inkwash.safetensors", lora, kind="checkpoint")  # a LoRA sent as a checkpoint
    assert mismatch.status_code == 422 and mismatch.json()["field"] == "kind"
    assert "the file is a LoRA (kohya format, SD 1.x), not a checkpoint" in mismatch.json()["detail"]
    not_a_model = site["files"] / "no-tensors.safetensors"
    save_file({}, str(not_a_model))
    refused = site["client"].post("/api/v1/models", headers=site["tokens"]["root"], json={"path": str(not_a_model)})
    assert refused.status_code == 422 and "is not a model file (no tensors)" in refused.json()["detail"]
    too_big = upload(site, "big.safetensors", b"\0" * (9 * 2**20))
    assert too_big.status_code == 413 and "limits.max_model_upload_bytes" in too_big.json()["detail"]
    assert (tree_state(own), tree_state(site["webui"])) == before and leftovers(site) == []


def test_an_upload_is_listed_at_once_and_used(site):
    lora = kohya_lora(site["sd_folder"], site["files"] / "inkwash2.safetensors", seed=5).read_bytes()
    reply = upload(site, "inkwash2.safetensors", lora, name="styles/ink")
    assert reply.status_code == 201, reply.text
    assert reply.json()["name"] == "styles/ink" and reply.json()["path"] == "loras/styles/ink.safetensors"
    assert (site["own"] / "loras/styles/ink.safetensors").read_bytes() == lora and leftovers(site) == []
    listed = site["client"].get("/api/v1/models", params={"kind": "lora"}, headers=site["tokens"]["alice"])
    assert "styles/ink" in {row["name"] for row in listed.json()["available"] if row["usable"]}
    fields = {"model": "anime/tiny", "prompt": "a green star", "steps": 2, "width": 64, "height": 64, "seed": 2}
    studio = site["studio"]
    plain = np.asarray(studio.generate(GenerationRequest(**fields)).images[0])
    with_lora = studio.generate(GenerationRequest(**fields, loras=[{"name": "ink", "weight": 1.0}]))
    assert not np.array_equal(np.asarray(with_lora.images[0]), plain)
    # Bigger than limits.max_body_bytes (1 MiB): this route is bounded by max_model_upload_bytes instead.
    embedding = site["files"] / "wide.safetensors"
    save_file({"emb_params": torch.zeros(700, 768)}, str(embedding))
    assert embedding.stat().st_size > 2**20
    reply = upload(site, "wide.safetensors", embedding.read_bytes())
    assert reply.status_code == 201 and reply.json()["kind"] == "embedding"
    assert reply.json()["path"] == "embeddings/wide.safetensors"


def test_a_checkpoint_by_path_duplicates_and_models_in_use(site):
    client, root = site["client"], site["tokens"]["root"]
    checkpoint = sparse_checkpoint(site["files"] / "sd15.safetensors")
    webui_before = tree_state(site["webui"])
    reply = client.post("/api/v1/models", headers=root, json={"path": str(checkpoint), "name": "sd15"})
    assert reply.status_code == 201, reply.text
    row = reply.json()
    assert (row["kind"], row["family"], row["variant"], row["dtype"], row["usable"]) == (
        "checkpoint", "sd", "v1", "float16", True)
    assert row["path"] == "sd15.safetensors" and checkpoint.is_file()  # a server file is linked or copied, kept
    names = {model["title"].split(" [")[0] for model in client.get("/sdapi/v1/sd-models", headers=root).json()}
    assert "sd15.safetensors" in names  # listed at once
    again = client.post("/api/v1/models", headers=root, json={"path": str(checkpoint), "name": "sd15"})
    assert again.status_code == 409 and again.json()["kind"] == "conflict" and "replace=true" in again.json()["detail"]
    assert client.post("/api/v1/models", headers=root,
                       json={"path": str(checkpoint), "name": "sd15", "replace": True}).status_code == 201
    studio = site["studio"]
    studio.preload("anime/tiny")  # A1111's tiny checkpoint is loaded: an import of that name may not shadow it
    loaded = client.post("/api/v1/models", headers=root, json={"path": str(checkpoint), "name": "anime/tiny",
                                                               "replace": True})
    assert loaded.status_code == 409 and "is loaded" in loaded.json()["detail"]
    with studio.engine.manager.use("anime/tiny"):  # as a running job holds it
        busy = client.post("/api/v1/models", headers=root, json={"path": str(checkpoint), "name": "anime/tiny",
                                                                 "replace": True})
        assert busy.status_code == 409 and "in use by a running job" in busy.json()["detail"]
        assert not studio.unload_model("anime/tiny")
    assert studio.unload_model("anime/tiny")
    assert not (site["own"] / "anime").exists() and tree_state(site["webui"]) == webui_before
    assert client.post("/api/v1/models", headers=root, json={"path": str(checkpoint), "name": "missing",
                                                             "kind": "lora"}).status_code == 422


def test_a_trained_lora_keeps_its_name(site):
    """LoRAs trained here (<data_dir>/loras) are found before any models folder, so an import can't take the name."""
    trained = kohya_lora(site["sd_folder"], site["data_dir"] / "loras" / "trained.safetensors", seed=3)
    site["studio"].refresh_models()
    reply = upload(site, "trained.safetensors", trained.read_bytes(), replace="true")
    assert reply.status_code == 409 and "a LoRA trained here" in reply.json()["detail"]
    assert not (site["own"] / "loras" / "trained.safetensors").exists() and leftovers(site) == []


def test_an_upload_is_refused_from_its_first_bytes(tmp_path):
    """A text file of many chunks is refused after the first: the rest of the body is never read or stored."""
    import asyncio

    from starlette.requests import Request

    from diffusion_studio.api.uploads import receive_model_upload
    from diffusion_studio.requests import RequestError

    boundary = "studio-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.safetensors\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    chunks = [head + b"this is not a model " * 50] + [b"more text " * 10_000] * 200
    pulled = []

    async def receive():
        pulled.append(1)
        index = len(pulled) - 1
        return {"type": "http.request", "body": chunks[index], "more_body": index < len(chunks) - 1}

    request = Request({"type": "http", "method": "POST", "path": "/api/v1/models", "headers": [
        (b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}, receive)
    with pytest.raises(RequestError, match="'big.safetensors' is not a safetensors file") as refused:
        asyncio.run(receive_model_upload(request, tmp_path / "imports", 2**30))
    assert refused.value.field == "file" and len(pulled) == 1  # of 201 chunks (20 MB)
    assert list((tmp_path / "imports").iterdir()) == []  # the partial file is gone


def test_body_limits_by_route():
    """BodyLimit: the import route is left to its own limit; a route may be given a larger one (Gradio's upload,
    for the Models panel); every other route keeps limits.max_body_bytes."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from diffusion_studio.api.bodies import BodyLimit

    async def echo(request):
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(routes=[Route(path, echo, methods=["POST"]) for path in
                            ("/api/v1/models", "/gradio_api/upload", "/api/v1/jobs")])
    client = TestClient(BodyLimit(app, max_bytes=1024, route_limits={("POST", "/gradio_api/upload"): 8192}))
    assert client.post("/api/v1/models", content=b"x" * 100_000).json() == {"bytes": 100_000}
    assert client.post("/gradio_api/upload", content=b"x" * 5000).json() == {"bytes": 5000}
    assert client.post("/gradio_api/upload", content=b"x" * 9000).status_code == 413
    refused = client.post("/api/v1/jobs", content=b"x" * 2000)
    assert refused.status_code == 413 and "limits.max_body_bytes" in refused.json()["detail"]
