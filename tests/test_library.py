"""Models folders in A1111/Forge and ComfyUI layouts (and the studio's own): every kind listed by name, usable by
name through the engine, the API, the A1111 routes and the CLI; unusable files listed with the reason; the scan
cached; nothing ever written into the folders."""

import json
import shutil
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from diffusion_studio.cli import main
from diffusion_studio.engine.library import ModelLibrary, detect_layout
from diffusion_studio.engine.sources import list_models, resolve, resolve_embedding, resolve_lora, resolve_vae
from diffusion_studio.requests import GenerationRequest, RequestError
from model_trees import a1111_tree, comfyui_tree, kohya_lora, tiny_checkpoint, tree_state


@pytest.fixture(scope="module")
def trees(sd_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("installs")
    return a1111_tree(root / "webui", sd_folder), comfyui_tree(root / "ComfyUI", sd_folder)


@pytest.fixture
def config(make_config, trees, tmp_path):
    return make_config(models_dir=tmp_path / "own", models_dirs=list(trees))


def by_name(rows, kind):
    return {row["name"]: row for row in rows if row["kind"] == kind}


def test_layouts_are_told_by_their_folders(trees, tmp_path):
    webui, comfy = trees
    assert [detect_layout(p) for p in (webui, comfy, webui / "models", comfy / "models", tmp_path)] == [
        "a1111", "comfyui", "a1111-models", "comfyui-models", "flat"]


def test_every_kind_is_listed_with_relative_paths_and_reasons(config, trees):
    rows = list_models(config)
    checkpoints = by_name(rows, "checkpoint")
    assert checkpoints["anime/tiny"]["path"] == "models/Stable-diffusion/anime/tiny.safetensors"
    assert checkpoints["anime/tiny"]["usable"] and checkpoints["anime/tiny"]["family"] == "sd"
    assert checkpoints["anime/tiny"]["size_bytes"] == (trees[0] / checkpoints["anime/tiny"]["path"]).stat().st_size
    assert checkpoints["comfy-tiny"]["origin"] == "models folder 2"
    assert "anime/tiny/unet" not in checkpoints and "anime/tiny" in checkpoints  # the configs beside are no model
    misplaced = checkpoints["oops-lora"]
    assert not misplaced["usable"] and "looks like a LoRA (kohya format, SD 1.x): put it in loras/" in \
        misplaced["reason"]
    loras = by_name(rows, "lora")
    assert loras["style/inkwash"]["usable"] and loras["comfy-lora"]["usable"]
    assert not loras["notes"]["usable"] and "not a safetensors file" in loras["notes"]["reason"]
    assert "inkwash.civitai" not in loras  # files beside models that are not models are not listed
    assert set(by_name(rows, "controlnet")) >= {"canny", "comfy-canny"}
    assert by_name(rows, "embedding")["badhands"]["path"] == "embeddings/badhands.pt"
    vaes = [row for row in rows if row["kind"] == "vae"]
    assert [(row["path"], row["usable"]) for row in vaes] == [("models/VAE/tiny-vae-folder", True),
                                                              ("models/VAE/tiny-vae.safetensors", True),
                                                              ("models/vae/tiny-vae.safetensors", False)]
    assert "models/VAE/tiny-vae.safetensors in models folder 1" in vaes[2]["reason"]  # the clash: first wins
    assert list_models(config, "lora") == [row for row in rows if row["kind"] == "lora"]
    assert str(trees[0]) not in json.dumps(rows) and str(trees[1]) not in json.dumps(rows)


def test_names_resolve_in_every_layout(config, trees):
    webui, comfy = trees
    source = resolve("anime/tiny", config)
    assert (source.kind, source.role, source.family, source.location) == (
        "single_file", "base", "sd", str(webui / "models/Stable-diffusion/anime/tiny.safetensors"))
    assert source.config_folder == webui / "models/Stable-diffusion/anime/tiny"
    assert resolve("anime/tiny.safetensors [0123456789]", config).location == source.location  # an A1111 title
    assert resolve("tiny", config).location == str(comfy / "models/checkpoints/tiny.safetensors")  # exact name first
    assert resolve("canny", config).role == "controlnet"
    assert resolve_lora("inkwash", config) == webui / "models/Lora/style/inkwash.safetensors"  # the file name alone
    assert resolve_lora("style/inkwash", config) == resolve_lora("inkwash", config)
    assert resolve_vae("tiny-vae", config) == webui / "models/VAE/tiny-vae.safetensors"
    assert resolve_embedding("comfy-emb", config) == comfy / "models/embeddings/comfy-emb.pt"
    with pytest.raises(RequestError, match=r"'oops-lora' \(models/Stable-diffusion/oops-lora.safetensors\) can't be "
                                           r"used: 'oops-lora.safetensors' looks like a LoRA") as refused:
        resolve("oops-lora", config)
    assert refused.value.field == "model"
    with pytest.raises(RequestError, match=r"LoRA 'nope' not found; LoRAs: (.*, )?style/inkwash, comfy-lora") as refused:
        resolve_lora("nope", config)
    assert refused.value.field == "loras"


def test_an_inner_models_folder_and_many_names(make_config, trees, sd_folder, tmp_path):
    webui, _ = trees
    config = make_config(models_dir=webui / "models")
    assert resolve_lora("inkwash", config).is_file() and resolve("anime/tiny", config).family == "sd"
    assert resolve_embedding("badhands", config) == webui / "embeddings/badhands.pt"  # A1111 keeps it beside models/
    for index in range(25):
        (tmp_path / "many" / f"broken-{index:02}.safetensors").parent.mkdir(exist_ok=True)
        (tmp_path / "many" / f"broken-{index:02}.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(RequestError, match=r"models: builtin:shapes, .*broken-09.* and \d+ more$"):
        resolve("no-such-model", make_config(models_dir=tmp_path / "many"))


def test_the_scan_is_cached_and_cheap(sd_folder, tmp_path):
    folder = tmp_path / "flat"
    first = kohya_lora(sd_folder, folder / "loras" / "lora-000.safetensors")
    for index in range(1, 100):
        shutil.copyfile(first, folder / "loras" / f"lora-{index:03}.safetensors")
    tiny_checkpoint(sd_folder, folder / "base.safetensors")
    library = ModelLibrary([folder])
    started = time.perf_counter()
    assert len(library.entries()) == 101
    cold = time.perf_counter() - started
    scans = library.scans
    started = time.perf_counter()
    assert all(entry.usable for entry in library.entries())
    warm = time.perf_counter() - started
    assert library.scans == scans  # no folder read again
    print(f"100 LoRAs + a checkpoint: first listing {cold * 1000:.0f} ms, cached {warm * 1000:.1f} ms")
    assert cold < 2.0 and warm < 0.05
    shutil.copyfile(first, folder / "loras" / "new.safetensors")  # the folder's mtime changes: it is read again
    assert "new" in [entry.name for entry in library.entries("lora")] and library.scans == scans + 1
    library.refresh()
    library.entries()
    assert library.scans > scans + 1


def test_listed_and_used_through_api_a1111_and_cli_writing_nothing(config, trees, shape_image, capsys):
    from diffusion_studio.server import build_app

    before = [tree_state(tree) for tree in trees]
    app = build_app(config)
    with TestClient(app, base_url="http://localhost") as client:  # a loopback studio answers only as such
        everything = client.get("/api/v1/models").json()["available"]
        assert {row["kind"] for row in everything} == {"checkpoint", "controlnet", "lora", "vae", "embedding"}
        loras = client.get("/api/v1/models", params={"kind": "lora"}).json()["available"]
        assert {row["name"] for row in loras if row["origin"] != "data dir"} == {"style/inkwash", "notes", "comfy-lora"}
        assert client.get("/api/v1/models", params={"kind": "nope"}).status_code == 422
        sd_models = {model["filename"]: model for model in client.get("/sdapi/v1/sd-models").json()}
        assert sd_models["models/Stable-diffusion/anime/tiny.safetensors"]["title"].startswith(
            "anime/tiny.safetensors")  # A1111's title: the name with its suffix (and the hash once known)
        assert "models/Stable-diffusion/oops-lora.safetensors" not in sd_models  # only what can be loaded
        a1111_loras = {lora["name"]: lora for lora in client.get("/sdapi/v1/loras").json()}
        assert set(a1111_loras) - {lora["name"] for lora in loras if lora["origin"] == "data dir"} == {
            "style/inkwash", "comfy-lora"}  # usable ones, as A1111 lists
        assert a1111_loras["style/inkwash"]["alias"] == "inkwash"
        assert a1111_loras["style/inkwash"]["metadata"]["ss_network_dim"] == "2"
        assert client.get("/sdapi/v1/sd-vae").json() == [
            {"model_name": "tiny-vae-folder", "filename": "models/VAE/tiny-vae-folder"},
            {"model_name": "tiny-vae", "filename": "models/VAE/tiny-vae.safetensors"}]
        embeddings = client.get("/sdapi/v1/embeddings").json()
        assert embeddings["loaded"]["badhands"] == {"step": 1500, "sd_checkpoint": "abcdef12",
                                                    "sd_checkpoint_name": "v1-5", "shape": 768, "vectors": 2}
        for route in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras"):
            assert client.post(route).status_code == 200
        for reply in (client.get("/api/v1/models"), client.get("/sdapi/v1/sd-models"),
                      client.get("/sdapi/v1/loras"), client.get("/sdapi/v1/embeddings")):
            assert str(trees[0]) not in reply.text and str(trees[1]) not in reply.text  # no server path (issue 16)
        studio = app.state.studio
        request = GenerationRequest(model="anime/tiny", prompt="a green star", steps=2, width=64, height=64, seed=3,
                                    loras=[{"name": "inkwash", "weight": 0.8}])
        with_lora = np.asarray(studio.generate(request).images[0])
        plain = np.asarray(studio.generate(request.model_copy(update={"loras": []})).images[0])
        assert with_lora.shape == (64, 64, 3) and not np.array_equal(with_lora, plain)  # the LoRA was applied
        own_vae = np.asarray(studio.generate(request.model_copy(update={"vae": "tiny-vae-folder"})).images[0])
        assert own_vae.shape == (64, 64, 3)  # the A1111 folder's VAE, by name
        control = studio.generate(GenerationRequest(mode="controlnet", model="builtin:shapes", controlnet="canny",
                                                    control_image=shape_image, prompt="a red circle", steps=2,
                                                    seed=1))
        assert control.control_image is not None  # the A1111 folder's ControlNet, by name
    assert main(["models", "--data-dir", str(config.data_dir), "--models-dir", str(config.models_dir),
                 "--models-dir", str(trees[0]), "--models-dir", str(trees[1]), "--kind", "checkpoint"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tiny = next(line for line in lines if line.startswith("anime/tiny "))
    assert tiny.split()[1:3] == ["checkpoint", "sd"] and "ok (models folder 1:" in tiny
    assert any(line.startswith("oops-lora ") and "unusable" in line for line in lines)
    assert [tree_state(tree) for tree in trees] == before  # listing, resolving and generating wrote nothing


def test_the_models_panel_lists_refreshes_and_imports(config, trees, sd_folder, tmp_path):
    import gradio as gr
    from gradio_client import Client

    from diffusion_studio.server import build_app
    from diffusion_studio.ui.tabs.models import import_file
    from servers import serving

    app = build_app(config)
    studio = app.state.studio
    with serving(app) as url:
        table = Client(url, download_files=False, verbose=False).predict("lora", api_name="/models")
        rows = {row[0]: row for row in table["data"]}
        assert rows["style/inkwash"][1:] == ["lora", "sd", "ok"]
        assert rows["notes"][3].startswith("unusable: 'notes.safetensors' is not a safetensors file")
    lora = kohya_lora(sd_folder, tmp_path / "upload" / "panel-lora.safetensors")
    with pytest.raises(gr.Error, match="only an admin may import models"):
        import_file(studio, "alice", lambda user: False, str(lora), None, None, False)
    with pytest.raises(gr.Error, match="the file is a LoRA .*, not a vae"):
        import_file(studio, "root", lambda user: True, str(lora), "", "vae", False)
    assert not (config.models_dir / "loras").exists()
    outcome = import_file(studio, "root", lambda user: True, str(lora), "", "any kind", False)
    assert outcome.startswith("Imported **panel-lora**: a LoRA (kohya format, SD 1.x)")
    assert (config.models_dir / "loras" / "panel-lora.safetensors").is_file() and lora.is_file()
    assert "panel-lora" in studio.loras()
    with pytest.raises(gr.Error, match="a lora called 'panel-lora' exists"):
        import_file(studio, "root", lambda user: True, str(lora), "", "any kind", False)
