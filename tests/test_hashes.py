"""A1111's hashes: files hashed once (cached by path, size and mtime) in a background thread, never on a request;
PNGs carry Model hash / Lora hashes; sd-models shows them; PNG info of an A1111 image finds the local model."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time

import httpx
import pytest
import torch
import webuiapi
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from diffusion_studio import studio as studio_module
from diffusion_studio.config import StudioConfig
from diffusion_studio.engine.checkpoint import export_single_file
from diffusion_studio.engine.hashes import ADDNET, Hasher
from diffusion_studio.requests import GenerationRequest, GenerationResult, Timings
from servers import serving

MB = 2**20


def random_bytes(size: int, seed: int = 0) -> bytes:
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy() \
        .tobytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Gate:
    """A hasher read that blocks until released (the fake slow disk); counts the blocks read per file."""

    def __init__(self, hasher: Hasher):
        self.release, self.started = threading.Event(), threading.Event()
        self.reads: list[str] = []
        self.hasher = hasher

    def __enter__(self):
        def read(handle, buffer):
            self.reads.append(os.path.basename(handle.name))
            self.started.set()
            assert self.release.wait(30), "the test never released the hasher"
            return handle.readinto(buffer)

        self.hasher._read_into = read
        return self

    def __exit__(self, *exc):
        self.release.set()
        del self.hasher._read_into


# -- the hasher --------------------------------------------------------------------------------------------------

def test_a_file_hash_is_its_sha256_with_a1111s_short_forms(tmp_path):
    data = random_bytes(5 * MB + 123)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    hasher = Hasher(tmp_path / "hashes.json", block_bytes=MB)  # several blocks: the legacy window spans two reads
    try:
        digest = hasher.request(path).result(30)
        assert digest == sha256(data)
        legacy = sha256(data[0x100000:0x110000])[:8]  # A1111's pre-1.0 model_hash
        assert hasher.matches(digest[:10]) == [path] and hasher.matches(legacy) == [path]
        assert hasher.matches("0123456789") == []
        assert hasher.known(path) == digest
    finally:
        hasher.close()


def test_addnet_hash_covers_the_tensors_not_the_header(tmp_path):
    """kohya's hash, which A1111 writes for LoRAs: editing a file's metadata keeps it."""
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=torch.Generator().manual_seed(1))}
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, str(first), metadata={"ss_output_name": "a"})
    save_file(tensors, str(second), metadata={"ss_output_name": "something longer"})
    raw = first.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    hasher = Hasher(tmp_path / "hashes.json")
    try:
        addnet = hasher.request(first, ADDNET).result(30)
        assert addnet == sha256(raw[header:])
        assert hasher.request(second, ADDNET).result(30) == addnet
        assert hasher.request(first).result(30) != hasher.request(second).result(30)  # whole files differ
    finally:
        hasher.close()


def test_the_cache_survives_a_restart_and_a_changed_file_is_hashed_again(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(random_bytes(2 * MB, seed=1))
    cache = tmp_path / "hashes.json"
    first = Hasher(cache)
    digest = first.request(path).result(30)
    first.close()

    second = Hasher(cache)

    def no_reading(handle, buffer):
        raise AssertionError("a cached hash was computed again")

    second._read_into = no_reading
    assert second.known(path) == digest and second.request(path).result(0) == digest

    changed = random_bytes(2 * MB, seed=2)  # same size: only the mtime tells
    path.write_bytes(changed)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert second.known(path) is None
    del second._read_into
    assert second.request(path).result(30) == sha256(changed)
    path.write_bytes(changed + b"x")  # a new size
    assert second.known(path) is None
    second.close()


@pytest.mark.parametrize("content", ['{"version": 1, "files": {"/x": ', "[1, 2]", '{"version": 1, "files": {"/x": 5}}',
                                     "\x00\xff"])
def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path, content, caplog):
    cache = tmp_path / "hashes.json"
    cache.write_text(content, errors="surrogateescape")
    path = tmp_path / "vae.safetensors"
    path.write_bytes(b"weights")
    hasher = Hasher(cache)
    try:
        assert hasher.request(path).result(30) == sha256(b"weights")
    finally:
        hasher.close()
    files = json.loads(cache.read_text())["files"]
    assert files[str(path)]["sha256"] == sha256(b"weights") and "/x" not in files


def test_run_time_requests_overtake_the_listing_backlog_which_resumes(tmp_path):
    big, small = tmp_path / "big.safetensors", tmp_path / "small.safetensors"
    big_data, small_data = random_bytes(4 * MB, seed=3), random_bytes(MB // 2, seed=4)
    big.write_bytes(big_data)
    small.write_bytes(small_data)
    hasher = Hasher(tmp_path / "hashes.json", block_bytes=MB)
    try:
        with Gate(hasher) as gate:
            background = hasher.request(big, background=True)
            assert gate.started.wait(10)  # the listing's file is being read
            urgent = hasher.request(small)
            again = hasher.request(small)
            assert again is urgent  # asked twice, hashed once
            gate.release.set()
            assert urgent.result(30) == sha256(small_data)
            assert not background.done()  # it gave way after the block it was reading
            assert background.result(30) == sha256(big_data)  # and resumed where it stopped
        assert gate.reads[0] == "big.safetensors" and gate.reads[1] == "small.safetensors"
        assert gate.reads.count("small.safetensors") == 2  # one block of data, then the end of file
    finally:
        hasher.close()


def test_a_missing_file_fails_its_future_not_the_hasher(tmp_path):
    hasher = Hasher(tmp_path / "hashes.json")
    try:
        with pytest.raises(FileNotFoundError):
            hasher.request(tmp_path / "gone.safetensors").result(30)
        (tmp_path / "here.bin").write_bytes(b"ok")
        assert hasher.request(tmp_path / "here.bin").result(30) == sha256(b"ok")
    finally:
        hasher.close()


# -- the studio: PNGs, sd-models, PNG info -----------------------------------------------------------------------

def _save_lora(pipe_folder, target):
    """A random-weight LoRA for the tiny SD UNet (diffusers' own format), saved as one .safetensors file."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(pipe_folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_k", "to_q", "to_v"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(target.parent, unet_lora_layers=layers, weight_name=target.name,
                                              safe_serialization=True)
    return target


@pytest.fixture(scope="module")
def library(tmp_path_factory, sd_folder):
    """A flat models folder: a single-file checkpoint (its config folder beside it) and a LoRA."""
    models = tmp_path_factory.mktemp("hash-models")
    export_single_file(sd_folder, models / "tiny.safetensors")
    shutil.copytree(sd_folder, models / "config")  # the resolver's configs for a file with no shipped family
    (models / "loras").mkdir()
    _save_lora(sd_folder, models / "loras" / "tiny-lora.safetensors")
    return models


@pytest.fixture(scope="module")
def served(library, data_dir):
    from diffusion_studio.server import build_app

    config = StudioConfig(data_dir=data_dir, models_dir=library, preview_interval=0)
    app = build_app(config)
    with serving(app) as url:
        yield url, app.state.studio


def _a1111_png_bytes(parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _a1111_png(parameters: str) -> Image.Image:
    return Image.open(io.BytesIO(_a1111_png_bytes(parameters)))


def test_sd_models_answers_while_a_hash_is_stuck_then_shows_it(served, library):
    """The listing queues the file; the route never waits for it (the hasher's read is blocked meanwhile)."""
    url, studio = served
    fresh = library / "fresh.safetensors"
    shutil.copy(library / "tiny.safetensors", fresh)
    try:
        with Gate(studio.hasher) as gate:
            started = time.perf_counter()
            models = {m["filename"]: m for m in httpx.get(f"{url}/sdapi/v1/sd-models", timeout=10).json()}
            assert gate.started.wait(10)  # the listing queued it and the hasher is stuck reading it...
            again = {m["filename"]: m for m in httpx.get(f"{url}/sdapi/v1/sd-models", timeout=10).json()}
            health = httpx.get(f"{url}/health", timeout=10)
            elapsed = time.perf_counter() - started
            assert elapsed < 5 and health.status_code == 200  # ...while the routes and the event loop answer
            assert models["fresh.safetensors"]["hash"] is None and again["fresh.safetensors"]["sha256"] is None
            assert again["fresh.safetensors"]["title"] == "fresh.safetensors"
        digest = studio.hasher.request(fresh).result(30)
        assert digest == sha256(fresh.read_bytes())

        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
        assert f"fresh.safetensors [{digest[:10]}]" in api.util_get_model_names()
        entry = next(m for m in api.get_sd_models() if m["filename"] == "fresh.safetensors")
        assert entry == {"title": f"fresh.safetensors [{digest[:10]}]", "model_name": "fresh", "hash": digest[:10],
                         "sha256": digest, "filename": "fresh.safetensors", "config": None}
        assert "builtin:shapes" in api.util_get_model_names()  # built-ins: no file, so no hash
    finally:
        fresh.unlink()


def test_generated_png_carries_model_and_lora_hashes(served, library):
    """Through webuiapi: the model picked by its sd-models title, a LoRA by its prompt tag; the infotext (the
    PNG's own) has A1111's Model hash and Lora hashes."""
    url, studio = served
    model_sha = sha256((library / "tiny.safetensors").read_bytes())
    lora_raw = (library / "loras" / "tiny-lora.safetensors").read_bytes()
    lora_addnet = sha256(lora_raw[8 + int.from_bytes(lora_raw[:8], "little"):])
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
    result = api.txt2img(prompt="a red circle <lora:tiny-lora:0.5>", steps=2, width=32, height=32, seed=3,
                         sampler_name="Euler", override_settings={
                             "sd_model_checkpoint": f"tiny.safetensors [{model_sha[:10]}]"})
    infotext = result.info["infotexts"][0]
    # The title names the model as the studio lists it ("tiny"), which is A1111's Model: the file name's stem.
    assert f"Model hash: {model_sha[:10]}, Model: tiny," in infotext
    assert f'Lora hashes: "tiny-lora: {lora_addnet[:12]}"' in infotext
    assert infotext.startswith("a red circle <lora:tiny-lora:0.5>\n")
    assert result.image.info["parameters"] == infotext


def test_png_info_of_an_a1111_image_names_the_local_model(served, library):
    url, studio = served
    model_sha = studio.hasher.request(library / "tiny.safetensors").result(30)
    lora_hash = studio.hasher.request(library / "loras" / "tiny-lora.safetensors", ADDNET).result(30)[:12]
    written = ("a cat <lora:their-lora-name:0.7>\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
               f"Seed: 1, Size: 32x32, Model hash: {model_sha[:10]}, Model: their-name-for-it, "
               f'Lora hashes: "their-lora-name: {lora_hash}", Version: v1.10.1')
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
    a1111 = api.png_info(_a1111_png(written)).json
    assert a1111["info"] == written and a1111["parameters"]["Model"] == "tiny"
    assert a1111["model_found"] is True and a1111["model_hash"] == model_sha[:10]

    ours = httpx.post(f"{url}/api/v1/png-info", files={"file": ("a.png", _a1111_png_bytes(written), "image/png")},
                      timeout=30).json()
    assert ours["parameters"]["model"] == "tiny" and ours["model_found"] is True
    assert [(lora["name"], lora["weight"]) for lora in ours["parameters"]["loras"]] == [("tiny-lora", 0.7)]
    assert {m["kind"]: m["local"] for m in ours["hashes"]} == {"checkpoint": "tiny", "lora": "tiny-lora"}

    elsewhere = written.replace(model_sha[:10], "0123456789").replace(lora_hash, "0123456789ab")
    unknown = api.png_info(_a1111_png(elsewhere)).json
    assert unknown["model_found"] is False and unknown["model_hash"] == "0123456789"
    assert unknown["parameters"]["Model"] == "their-name-for-it"
    assert [m["found"] for m in unknown["hashes"]] == [False, False]


def _result(studio, model: str) -> GenerationResult:
    request = studio.validate({"model": model, "prompt": "a blue square", "steps": 2, "seed": 5})
    return GenerationResult(request=request, images=[Image.new("RGB", (32, 32))], seeds=[5], model_id=model,
                            timings=Timings(), peak_memory_bytes=0, device="cpu")


def test_saving_waits_for_the_runs_hash_within_a_bound(served, library, tmp_path, monkeypatch, caplog):
    url, studio = served
    late = library / "late.safetensors"
    shutil.copy(library / "tiny.safetensors", late)
    digest = sha256(late.read_bytes())
    try:
        with Gate(studio.hasher) as gate:  # the hash is slow: saving waits for it, then writes it
            studio._queue_hashes(_result(studio, "late").request)  # as a run's start does
            saved: list = []
            saver = threading.Thread(target=lambda: saved.extend(studio.save(_result(studio, "late"), tmp_path)))
            saver.start()
            assert gate.started.wait(10)
            time.sleep(0.3)
            assert saver.is_alive()  # waiting for the hash
            gate.release.set()
            saver.join(30)
        assert f"Model hash: {digest[:10]}, Model: late," in Image.open(saved[0]).text["parameters"]

        stat = late.stat()
        os.utime(late, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # changed: hashed again
        monkeypatch.setattr(studio_module, "HASH_WAIT_S", 0.2)
        with Gate(studio.hasher), caplog.at_level(logging.WARNING):
            started = time.perf_counter()
            paths = studio.save(_result(studio, "late"), tmp_path)
            assert time.perf_counter() - started < 5
        assert "Model hash" not in Image.open(paths[0]).text["parameters"]
        assert "not hashed within" in caplog.text
    finally:
        late.unlink()


def test_a_runs_vae_lora_and_embeddings_are_found_and_hashed_as_a1111_does(tmp_path, library, sd_folder, data_dir):
    """run_files resolves what a request names the way the engine does; collect_hashes shortens each as A1111:
    VAE 10 hex of the sha256, LoRA 12 of the addnet hash, embedding 12 of the sha256."""
    from diffusers import AutoencoderKL

    from diffusion_studio.engine.checkpoint import vae_to_ldm
    from diffusion_studio.engine.resources import collect_hashes, run_files

    models = tmp_path / "models"
    for kind in ("vae", "embeddings", "loras"):
        (models / kind).mkdir(parents=True)
    vae = models / "vae" / "tiny-vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(AutoencoderKL.from_pretrained(sd_folder, subfolder="vae"))
               .items()}, str(vae))
    embedding = models / "embeddings" / "shiny.safetensors"
    save_file({"emb_params": torch.randn(2, 768, generator=torch.Generator().manual_seed(2))}, str(embedding))
    lora = models / "loras" / "tiny-lora.safetensors"
    shutil.copy(library / "loras" / "tiny-lora.safetensors", lora)
    config = StudioConfig(data_dir=data_dir, models_dir=models)
    asked = GenerationRequest(prompt="a shiny red circle <lora:tiny-lora:0.3>", negative_prompt="blurry",
                              vae="tiny-vae")
    files = run_files(asked, config)
    assert (files.model, files.vae, files.loras, files.embeddings) == (
        None, vae, {"tiny-lora": lora}, {"shiny": embedding})  # a built-in base is no single file
    assert run_files(GenerationRequest(prompt="shinyness"), config).embeddings == {}  # words, not substrings

    hasher = Hasher(tmp_path / "hashes.json")
    try:
        hashes = collect_hashes(hasher, files, 30)
    finally:
        hasher.close()
    raw = lora.read_bytes()
    assert hashes.model is None and hashes.vae == sha256(vae.read_bytes())[:10]
    assert hashes.loras == {"tiny-lora": sha256(raw[8 + int.from_bytes(raw[:8], "little"):])[:12]}
    assert hashes.embeddings == {"shiny": sha256(embedding.read_bytes())[:12]}


def test_two_hashers_on_one_cache_file_keep_each_others_hashes(tmp_path):
    """serve and a CLI run may share a data dir: each write merges what the other wrote."""
    first_file, second_file = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    first_file.write_bytes(b"a")
    second_file.write_bytes(b"b")
    one, two = Hasher(tmp_path / "hashes.json"), Hasher(tmp_path / "hashes.json")
    try:
        one.request(first_file).result(30)
        two.request(second_file).result(30)
    finally:
        one.close()
        two.close()
    after = Hasher(tmp_path / "hashes.json")
    assert (after.known(first_file), after.known(second_file)) == (sha256(b"a"), sha256(b"b"))


def test_a_deleted_files_hash_is_forgotten_at_the_next_start(tmp_path):
    kept, gone = tmp_path / "kept.ckpt", tmp_path / "gone.ckpt"
    kept.write_bytes(b"k")
    gone.write_bytes(b"g")
    hasher = Hasher(tmp_path / "hashes.json")
    hasher.request(kept).result(30)
    hasher.request(gone).result(30)
    hasher.close()
    gone.unlink()
    restarted = Hasher(tmp_path / "hashes.json")
    new = tmp_path / "new.ckpt"
    new.write_bytes(b"n")
    assert restarted.known(kept) == sha256(b"k")
    restarted.request(new).result(30)  # a write: the file now holds what this hasher knows
    restarted.close()
    assert set(json.loads((tmp_path / "hashes.json").read_text())["files"]) == {str(kept), str(new)}
