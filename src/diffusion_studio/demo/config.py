"""DemoConfig: the seed demo's settings, each turned into the studio setting that does what it says, or a
NoEffectWarning where it can do nothing on this machine (never silently ignored)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ..config import Limits, MemoryOptions, StudioConfig
from ..requests import default_of


class NoEffectWarning(UserWarning):
    """A DemoConfig setting that does nothing on this machine (said when the DiffusionDemo is built)."""


class DemoConfig(BaseModel):
    """The seed's fields under the seed's names (older names `model` and `controlnet` still work), plus where the
    studio keeps its data and which device it runs on. Generation defaults are the built-in models' (the seed's
    30 steps, 7.5 and 512 px were SD 1.5's): an unset size is the model's native one."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    # Models
    default_model: str = Field("builtin:shapes", min_length=1, validation_alias=AliasChoices("default_model", "model"),
                               description="the model of every pipeline but stable_diffusion_xl")
    xl_model: str = Field("builtin:shapes-xl", min_length=1, description="the stable_diffusion_xl pipeline's model")
    controlnet_model: str | None = Field(None, min_length=1,
                                         validation_alias=AliasChoices("controlnet_model", "controlnet"),
                                         description="None: the base's built-in ControlNet for the control type")

    # Defaults for calls that don't give them
    default_steps: int = Field(default_of("steps"), ge=1)
    default_guidance_scale: float = Field(default_of("guidance"), ge=0.0, le=50.0)
    default_height: int | None = Field(None, ge=8, multiple_of=8, description="None: the model's native size")
    default_width: int | None = Field(None, ge=8, multiple_of=8, description="None: the model's native size")

    # Limits: the studio's request limits for this demo
    max_batch_size: int = Field(4, ge=1, description="limits.max_batch_size: the most prompts one generate_batch "
                                                     "takes, and the most images one request may ask for")
    max_prompt_length: int = Field(500, ge=1, description="limits.max_prompt_chars: longer prompts are refused")
    enable_advanced_controls: bool = Field(
        True, description="the generate methods take any other GenerationRequest field as a keyword (scheduler, "
                          "clip_skip, loras, hires, vae, ...); False: the seed's parameters only")
    enable_training_demo: bool = Field(
        True, description="demo.training (the studio's LoRA trainer) and demo.training_stats; False: they raise")

    # Performance
    use_half_precision: bool = Field(True, description="float16 weights on a GPU (CUDA or MPS); the CPU computes "
                                                       "in float32, so there it has no effect (a warning says so)")
    # The seed's default was True; here False, as the studio's: PyTorch 2's attention (SDPA) already keeps memory
    # low, and sliced attention's images differ from the UI's and the API's by up to 1/255 (measured on the
    # built-in), so a seed would no longer reproduce the same bits across clients.
    enable_attention_slicing: bool = Field(False, description="memory.attention_slicing: attention in slices, for "
                                                              "less memory at some speed")
    enable_vae_slicing: bool = Field(True, description="always so: the VAE decodes one image at a time (setting "
                                                       "it warns that it has no effect)")

    # Ours
    data_dir: Path = Field(Path("data"), description="history, outputs (as StudioConfig.data_dir)")
    models_dir: Path = Field(Path("models"), description="the models folder (as StudioConfig.models_dir)")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: use_half_precision decides on a GPU; any other value wins over it")
    user: str = Field("python", min_length=1, description="whose history the demo's jobs go to")

    @property
    def model(self) -> str:
        """The older name of `default_model`."""
        return self.default_model

    @model.setter
    def model(self, value: str) -> None:
        self.default_model = value

    @property
    def controlnet(self) -> str | None:
        """The older name of `controlnet_model`."""
        return self.controlnet_model

    @controlnet.setter
    def controlnet(self, value: str | None) -> None:
        self.controlnet_model = value


def studio_config(config: DemoConfig, device_type: str) -> StudioConfig:
    """The StudioConfig that does what `config` says on a `device_type` ("cpu", "cuda", "mps") machine; warns
    (NoEffectWarning) for each setting that does nothing there."""
    dtype = config.dtype
    if dtype == "auto" and device_type != "cpu":
        dtype = "float16" if config.use_half_precision else "float32"
    elif dtype == "auto" and config.use_half_precision:
        _no_effect("use_half_precision: no effect on the CPU, which computes in float32 here; float16 weights are "
                   "for a GPU (CUDA or MPS)")
    elif dtype != "auto" and "use_half_precision" in config.model_fields_set:
        _no_effect(f"use_half_precision: no effect, as dtype={dtype!r} is given and wins")
    if "enable_vae_slicing" in config.model_fields_set:
        _no_effect("enable_vae_slicing: no effect: the VAE always decodes one image at a time (so an image is the "
                   "same alone or in a batch), with nothing to switch on or off")
    return StudioConfig(data_dir=config.data_dir, models_dir=config.models_dir, device=config.device, dtype=dtype,
                        default_model=config.default_model,
                        memory=MemoryOptions(attention_slicing=config.enable_attention_slicing),
                        limits=Limits(max_batch_size=config.max_batch_size,
                                      max_prompt_chars=config.max_prompt_length))


def _no_effect(message: str) -> None:
    # stacklevel 4: the warning points at the caller's DiffusionDemo(...) line
    warnings.warn(message, NoEffectWarning, stacklevel=4)
