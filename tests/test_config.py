"""Config: TOML file < environment < explicit values; unknown keys are errors naming the key."""

import pytest
from pydantic import ValidationError

from diffusion_studio.cli import main
from diffusion_studio.config import StudioConfig


def test_file_then_env_then_arguments(tmp_path, monkeypatch):
    path = tmp_path / "studio.toml"
    path.write_text('default_model = "mine"\npreview_interval = 5\n[limits]\nmax_steps = 30\n'
                    '[models.mine]\nsource = "/somewhere/model.safetensors"\nconfig = "/somewhere/config"\n')
    monkeypatch.setenv("DS_CONFIG_FILE", str(path))
    monkeypatch.setenv("DS_PREVIEW_INTERVAL", "3")
    config = StudioConfig(max_loaded_models=5)
    assert config.default_model == "mine" and config.limits.max_steps == 30
    assert config.models["mine"].config == "/somewhere/config"
    assert config.preview_interval == 3  # environment beats the file
    assert config.max_loaded_models == 5


def test_unknown_keys_are_refused(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("max_stepz = 3\n")
    monkeypatch.setenv("DS_CONFIG_FILE", str(path))
    with pytest.raises(ValidationError, match="max_stepz"):
        StudioConfig()
    assert main(["models", "--config", str(path)]) == 2
    assert "max_stepz: Extra inputs are not permitted" in capsys.readouterr().err
