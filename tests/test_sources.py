"""Model sources: folders, single-file checkpoints, hub ids offline, the models list."""

import shutil

import numpy as np
import pytest

from diffusion_studio.engine.checkpoint import export_single_file
from diffusion_studio.engine.runner import Engine
from diffusion_studio.engine.sources import list_models, resolve
from diffusion_studio.requests import GenerationRequest, RequestError


def generate(engine, model):
    request = GenerationRequest(model=model, prompt="a green star", steps=2, seed=4)
    return np.asarray(engine.run(request).images[0])


def test_folder_and_single_file_give_the_same_image(make_config, sd_folder, tmp_path):
    checkpoint = export_single_file(sd_folder, tmp_path / "tiny.safetensors")
    shutil.copytree(sd_folder, tmp_path / "tiny")  # the local config folder beside the file (no hub needed)
    engine = Engine(make_config())
    source = resolve(str(checkpoint), engine.config)
    assert (source.kind, source.family, source.config_folder) == ("single_file", "sd", tmp_path / "tiny")
    from_file = generate(engine, str(checkpoint))
    from_folder = generate(engine, str(sd_folder))
    assert np.array_equal(from_file, from_folder)
    assert engine.manager.load_count == 2


def test_single_file_of_no_known_family_without_configs_is_refused(make_config, sd_folder, tmp_path):
    """The tiny test UNet fits no SD family's shapes, so without explicit configs nothing says how to build it."""
    checkpoint = export_single_file(sd_folder, tmp_path / "lonely.safetensors")
    with pytest.raises(RequestError, match="a UNet of an architecture the studio doesn't know"):
        resolve(str(checkpoint), make_config())


def test_configured_single_file_with_explicit_config(make_config, sd_folder, tmp_path):
    checkpoint = export_single_file(sd_folder, tmp_path / "named.safetensors")
    config = make_config(models={"my-model": {"source": str(checkpoint), "config": str(sd_folder)}})
    assert generate(Engine(config), "my-model").shape == (32, 32, 3)


def test_hub_id_offline_is_a_clear_error(make_config):
    engine = Engine(make_config())
    with pytest.raises(RequestError, match=r"not in the local Hugging Face cache and the hub can.t be reached \(offline\)"):
        generate(engine, "some-org/some-model-that-is-not-cached")


def test_models_list(make_config, sd_folder):
    config = make_config()
    config.models_dir.mkdir(parents=True)
    shutil.copytree(sd_folder, config.models_dir / "found-sd")
    (config.models_dir / "notes.txt").write_text("not a model")
    rows = {row["name"]: row for row in list_models(config)}
    assert list(rows)[:5] == ["builtin:shapes", "builtin:shapes-xl", "builtin:shapes-canny", "builtin:shapes-inpaint",
                              "builtin:shapes-xl-canny"]
    assert all(rows[name]["origin"] == "built-in" for name in list(rows)[:5])  # all trained and committed
    assert rows["found-sd"]["role"] == "base" and rows["found-sd"]["family"] == "sd"
    assert "notes.txt" not in rows
    assert generate(Engine(config), "found-sd").shape == (32, 32, 3)  # names in the models folder resolve


def test_resolving_a_builtin_writes_nothing(tmp_path, monkeypatch):
    """Resolution is pure: a stand-in is only built by the explicit ensure_standins (the Engine's start-up)."""
    from diffusion_studio.builtin import catalog
    from diffusion_studio.config import StudioConfig
    from diffusion_studio.engine import sources

    monkeypatch.setattr(catalog, "is_trained", lambda name: False)  # every built-in a stand-in, even when trained
    monkeypatch.setattr(sources, "is_trained", lambda name: False)
    monkeypatch.setattr(catalog, "_build_standin", lambda *args: pytest.fail("resolving built a stand-in"))
    config = StudioConfig(data_dir=tmp_path / "fresh", models_dir=tmp_path / "models")
    source = resolve("builtin:shapes-xl-canny", config)
    assert source.standin and source.location == str(tmp_path / "fresh" / "builtin-standins" / "shapes-xl-canny")
    assert list_models(config) and not (tmp_path / "fresh").exists()


def test_engine_builds_the_missing_standins_at_start(engine, data_dir):
    from diffusion_studio.builtin.catalog import (
        BUILTINS,
        builtin_folder,
        ensure_standins,
        is_standin,
        is_trained,
    )

    for name in BUILTINS:
        folder = builtin_folder(name, data_dir)
        assert folder.is_dir() and is_standin(folder) != is_trained(name), name
    assert ensure_standins(data_dir) == []  # built once per data dir; later calls only look


def test_a_builtin_without_committed_weights_says_it_is_a_stand_in(monkeypatch, tmp_path):
    from diffusion_studio.engine import sources

    monkeypatch.setattr(sources, "COMMITTED_DIR", tmp_path)  # as in a checkout where one is not trained yet
    assert sources.builtin_origin("shapes-xl-canny") == "built-in (untrained stand-in)"
