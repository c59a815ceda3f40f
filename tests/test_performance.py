"""The opt-in fast path (engine/performance.py): step caching per request, fused QKV projections per config (with
LoRAs still applying), channels-last, VAE tiling chosen when a full decode would not fit. Speed itself is
bench/speed.py's to measure; these check what each option does to the work and to the image."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from pydantic import ValidationError

from diffusion_studio.engine.runner import Engine
from diffusion_studio.requests import GenerationRequest, RequestError

PROMPT = "a red circle on a blue background"


def run(engine, **fields):
    return engine.run(GenerationRequest(**{"prompt": PROMPT, "steps": 6, "seed": 3, **fields}))


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def count_deep_calls(engine):
    """How often the mid block really runs: a hook on a layer inside it (the block's own hooks fire around the
    cache's wrapper, so also on steps it reuses)."""
    calls = []
    with engine.manager.use("builtin:shapes") as (base, _):
        handle = base.pipeline.unet.mid_block.resnets[0].register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_step_cache_runs_the_deep_blocks_on_one_step_in_n_and_stays_close(engine):
    calls, handle = count_deep_calls(engine)
    try:
        plain = run(engine, steps=20)
        plain_calls = len(calls)
        calls.clear()
        cached = run(engine, steps=20, step_cache=3)
        cached_calls = len(calls)
        again = run(engine, steps=20, step_cache=3)
    finally:
        handle.remove()
    assert plain_calls == 20 and cached_calls == 7  # steps 1, 4, 7, ..., 19 in full
    difference = np.abs(pixels(plain.images[0]) - pixels(cached.images[0]))
    other_seed = np.abs(pixels(plain.images[0]) - pixels(run(engine, steps=20, seed=4).images[0]))
    assert 0 < difference.max() and difference.mean() < other_seed.mean() / 2  # another image, the same picture
    assert np.array_equal(pixels(cached.images[0]), pixels(again.images[0]))  # reproducible
    assert cached.request.parameters()["step_cache"] == 3  # in the metadata and the cache key


def test_step_cache_is_per_thread_on_a_shared_model(engine):
    """A cached run and a plain run at once on one UNet: each gets the image it gets alone."""
    alone_plain, alone_cached = run(engine, seed=5), run(engine, seed=5, step_cache=2)
    results = {}

    def go(name, **fields):
        results[name] = run(engine, seed=5, **fields)

    threads = [threading.Thread(target=go, args=("plain",)),
               threading.Thread(target=go, args=("cached",), kwargs={"step_cache": 2})]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert np.array_equal(pixels(results["plain"].images[0]), pixels(alone_plain.images[0]))
    assert np.array_equal(pixels(results["cached"].images[0]), pixels(alone_cached.images[0]))


def test_step_cache_field_is_checked():
    for wrong in (0, 9, "fast"):
        with pytest.raises(ValidationError, match="step_cache"):
            GenerationRequest(prompt="x", step_cache=wrong)


def test_fused_projections_keep_the_image_and_give_way_to_loras(make_config, data_dir, tmp_path):
    from test_engine import _save_random_lora

    from diffusion_studio.builtin.catalog import builtin_folder

    plain, fused = Engine(make_config()), Engine(make_config(performance={"fuse_qkv": True}))
    a, b = run(plain), run(fused)
    with fused.manager.use("builtin:shapes") as (base, _):
        unet = base.pipeline.unet
        assert any(hasattr(module, "to_qkv") or hasattr(module, "to_kv") for module in unet.modules())
        assert unet._qkv_fused
    assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= 2
    lora = _save_random_lora(builtin_folder("shapes", data_dir), tmp_path)
    with_lora = {name: run(engine, loras=[{"name": str(lora), "weight": 1.0}]) for name, engine in
                 (("plain", plain), ("fused", fused))}
    assert not np.array_equal(pixels(with_lora["fused"].images[0]), pixels(b.images[0]))  # the LoRA applies
    assert np.abs(pixels(with_lora["fused"].images[0]) - pixels(with_lora["plain"].images[0])).max() <= 2
    assert not unet._qkv_fused  # unfused while the LoRA is on
    assert np.array_equal(pixels(run(fused).images[0]), pixels(b.images[0]))  # fused again without it
    assert unet._qkv_fused


def test_channels_last_keeps_the_image(make_config):
    import torch

    engine = Engine(make_config(performance={"channels_last": True}))
    image = run(engine).images[0]
    with engine.manager.use("builtin:shapes") as (base, _):
        weight = base.pipeline.unet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert np.abs(pixels(image) - pixels(run(Engine(make_config())).images[0])).max() <= 2


def test_a_decode_too_big_for_memory_goes_in_tiles(make_config, monkeypatch):
    """When only a tiled decode fits, the run decodes in tiles (performance.tile_when_needed, the default); with
    it off, the run is refused as before. The VAE's own tiling switch is left off for other runs."""
    import diffusion_studio.engine.runner as runner
    from diffusion_studio.engine import memory

    engine = Engine(make_config())
    with engine.manager.use("builtin:shapes") as (base, _):
        pipe = base.pipeline
        base.pipeline.vae.tile_sample_min_size, base.pipeline.vae.tile_latent_min_size = 32, 8
        untiled = memory.estimate_run_bytes(pipe, 64, 64, 1, 5.0, tiled=False)
        tiled = memory.estimate_run_bytes(pipe, 64, 64, 1, 5.0, tiled=True)
    assert tiled < untiled
    monkeypatch.setattr(memory, "available_bytes", lambda device: (tiled + untiled) // 2)
    decodes, decode_tiled = [], runner.decode_tiled
    monkeypatch.setattr(runner, "decode_tiled", lambda vae, z: decodes.append(tuple(z.shape)) or
                        decode_tiled(vae, z))
    result = run(engine)
    assert result.images[0].size == (64, 64) and decodes == [(1, 4, 16, 16)]
    assert not pipe.vae.use_tiling
    with pytest.raises(RequestError, match="width: 1 image\\(s\\) of 64x64 need about"):
        run(Engine(make_config(performance={"tile_when_needed": False})))


def test_step_cache_travels_in_the_infotext():
    """An image made with step caching says so in its A1111 text, and the text alone asks for it again."""
    from diffusion_studio.engine.metadata import a1111_parameters, parse_a1111

    text = a1111_parameters(GenerationRequest(prompt="x", step_cache=2), 1, 64, 64, "builtin:shapes")
    assert "Step cache: 2" in text and parse_a1111(text)["step_cache"] == 2
    assert "Step cache" not in a1111_parameters(GenerationRequest(prompt="x"), 1, 64, 64, "builtin:shapes")


def test_the_system_tab_switches_the_load_options_for_admins_only(tmp_path):
    """Through the real page's API: an admin turns fused projections on (the idle model is unloaded and
    reloads fused); a user who is not an admin is refused and nothing changes; a wrong value names its field."""
    from gradio_client import Client

    from servers import make_users, serving
    from diffusion_studio.config import StudioConfig
    from diffusion_studio.server import build_app

    _, tokens = make_users(tmp_path / "users.json", {"root": "root-password", "bob": "bob-password"},
                           admins=("root",))
    config = StudioConfig(data_dir=tmp_path, models_dir=tmp_path / "models", auth="on",
                          users_file=tmp_path / "users.json")
    app = build_app(config)
    studio = app.state.studio
    with serving(app) as url:
        studio.preload("builtin:shapes")
        bob = Client(url, headers={"Authorization": f"Bearer {tokens['bob']}"}, verbose=False)
        with pytest.raises(Exception, match="only an admin"):
            bob.predict(True, False, False, True, "linear", api_name="/set_performance")
        assert studio.config.performance.fuse_qkv is False and studio.loaded_models()
        root = Client(url, headers={"Authorization": f"Bearer {tokens['root']}"}, verbose=False)
        assert root.predict(True, False, False, True, "linear", api_name="/set_performance") == "Applied."
        assert studio.config.performance.fuse_qkv is True and studio.engine.config.performance.fuse_qkv is True
        assert studio.loaded_models() == []
        studio.generate(studio.validate({"prompt": "x", "steps": 2}))
        with studio.engine.manager.use("builtin:shapes") as (base, _):
            assert base.pipeline.unet._qkv_fused
    with pytest.raises(RequestError, match="performance.preview_decoder: Input should be 'linear' or 'tiny'"):
        studio.set_performance({"preview_decoder": "huge"})
    with pytest.raises(RequestError, match="performance.turbo: Extra inputs are not permitted"):
        studio.set_performance({"turbo": True})


def test_the_gpu_bench_script_runs_here_on_the_tiny_architectures(tmp_path):
    """bench/gpu_speed.py waits for a GPU machine; its logic runs here on the built-in-sized models on the CPU, so
    it is ready when one comes: every arm and batch gets a row."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_speed.py"), "--tiny", "--device", "cpu",
                           "--steps", "3", "--batches", "1,2", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(row["model"], row["arm"], row["batch"]) for row in rows} == {
        (model, arm, batch) for model in ("sd15", "sdxl") for arm in ("plain", "fast", "fast+step_cache=2")
        for batch in (1, 2)}
    assert all(row["it_per_s"] > 0 for row in rows)
    # And on a machine with no GPU, the real run says so in one line.
    if not __import__("torch").cuda.is_available():
        plain = subprocess.run([sys.executable, str(root / "bench" / "gpu_speed.py")], capture_output=True,
                               text=True, timeout=300)
        assert plain.returncode == 2 and "no CUDA device here" in plain.stdout


def test_the_speed_bench_runs_every_arm_in_its_own_process(tmp_path):
    """bench/speed.py --quick: raw, default and fast each answer with seconds, it/s, RSS and adherence, and the
    verdict line compares the fast path with the raw call."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(root / "bench" / "speed.py"), "--quick", "--json", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["builtin"]
    assert set(rows) == {"raw", "default", "fast"}
    assert all(row["images"] == 4 and row["s_per_image"] > 0 and row["peak_rss_gb"] > 0.1 and
               0 <= row["adherence"] <= 1 for row in rows.values())
    assert "fast path" in done.stdout and "the raw call (goal >= 1.5)" in done.stdout


def test_the_tiny_preview_decoder_shows_previews_at_the_image_size(make_config):
    """performance.preview_decoder = "tiny": the built-in's previews come from its trained tiny decoder, at the
    image's size (the linear map's are latent-sized); the image itself is unchanged."""
    from diffusion_studio.builtin.catalog import is_trained

    if not is_trained("shapes"):
        pytest.skip("the tiny decoder is made for the trained built-in's VAE")
    sizes = {}
    for choice in ("linear", "tiny"):
        previews = []
        engine = Engine(make_config(performance={"preview_decoder": choice}, preview_interval=2))
        result = engine.run(GenerationRequest(prompt=PROMPT, steps=4, seed=3),
                            on_step=lambda event: event.preview is not None and previews.append(event.preview))
        sizes[choice] = ({preview.size for preview in previews}, pixels(result.images[0]))
    assert sizes["linear"][0] == {(16, 16)} and sizes["tiny"][0] == {(64, 64)}
    assert np.array_equal(sizes["linear"][1], sizes["tiny"][1])


def test_fused_projections_give_way_to_attention_slicing(make_config):
    """Fused attention would replace the sliced processors (and their memory saving): slicing wins."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    engine = Engine(make_config(memory={"attention_slicing": True}, performance={"fuse_qkv": True}))
    run(engine)
    with engine.manager.use("builtin:shapes") as (base, _):
        processors = base.pipeline.unet.attn_processors.values()
        assert processors and all(isinstance(p, SlicedAttnProcessor) for p in processors)
        assert not getattr(base.pipeline.unet, "_qkv_fused", False)
