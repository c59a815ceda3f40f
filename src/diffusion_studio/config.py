"""StudioConfig: every knob in one place, read from defaults < TOML file < environment (DS_*) < CLI flags."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


class Limits(BaseModel):
    """Bounds every request is validated against; the error names the field and this range."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_width: int = Field(1024, ge=8, description="largest width in pixels")
    max_height: int = Field(1024, ge=8, description="largest height in pixels")
    max_steps: int = Field(150, ge=1)
    max_batch_size: int = Field(8, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_input_pixels: int = Field(4096 * 4096, ge=64, description="refuse input images larger than this")
    blocked_terms: tuple[str, ...] = Field((), description="prompts containing any of these words are refused")
    max_images_per_request: int = Field(16, ge=1, description="A1111 routes: most images (n_iter x batch_size) "
                                                              "one request may ask for")
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="request bodies larger than this are refused "
                                                                 "(HTTP 413) before they are read")
    max_model_upload_bytes: int = Field(20 * 10**9, ge=1024, description="POST /api/v1/models: largest model file "
                                                                         "an upload may carry (model files are GBs, "
                                                                         "so not max_body_bytes)")


class MemoryOptions(BaseModel):
    """Opt-in memory savers applied to each loaded pipeline (diffusers: speed features are explicit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attention_slicing: bool = False
    # Kept so old config files saying false still load; true is refused, as the engine has nothing to switch on.
    vae_slicing: bool = Field(False, description="not a setting any more: the VAE always decodes one image at a time")
    vae_tiling: bool = False
    model_cpu_offload: bool = False

    @field_validator("vae_slicing")
    @classmethod
    def _vae_slicing_is_always_on(cls, value: bool) -> bool:
        if value:
            raise ValueError("the VAE always decodes one image at a time (batches give each image its lone-run "
                             "bits, engine/invariance.py), so there is nothing to switch on: remove the "
                             "vae_slicing setting")
        return value


class PerformanceOptions(BaseModel):
    """The opt-in fast path applied to each loaded model (engine/performance.py; bench/speed.py measures each).
    Each may change an image's last bits; none is on unless set. Step caching is per request (`step_cache`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fuse_qkv: bool = Field(False, description="one matrix product for attention's q, k and v (LoRAs still apply: "
                                              "a run with LoRAs uses the unfused projections)")
    channels_last: bool = Field(False, description="the UNet's weights in channels-last memory (faster "
                                                   "convolutions on most GPUs; slower on this CPU)")
    compile: bool = Field(False, description="torch.compile of the UNet's repeated transformer blocks (regional: "
                                             "seconds on the first run of a size, cached in <data_dir>/"
                                             "compile-cache across restarts; needs a C++ compiler on CPU)")
    tile_when_needed: bool = Field(True, description="decode in tiles when a full-size decode would not fit in "
                                                     "free memory (instead of refusing the request); a tiled "
                                                     "decode blends its seams, so only then")
    preview_decoder: Literal["linear", "tiny"] = Field("linear", description="previews: a linear latent->RGB map, "
                                                                             "or the built-ins' tiny trained "
                                                                             "decoder (looks like the result)")


class ModelEntry(BaseModel):
    """A configured model: a name the studio lists, pointing at a source (hub id, folder or single file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    config: str | None = Field(None, description="local diffusers folder giving configs for a single-file checkpoint")
    kind: Literal["base", "controlnet"] = "base"
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="SD 2.x files: 512 (epsilon) and 768 (v_prediction) models have the same tensors; unset: "
                          "v_prediction unless the file says it is the 512 base (as diffusers decides)")
    vae: str | None = Field(None, description="the VAE this model decodes with by default (a file or folder name)")


class StudioConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DS_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Field(Path("data"), description="history, built-in stand-ins, outputs")
    models_dir: Path = Field(Path("models"), description="the studio's own models folder: scanned first, and where "
                                                          "imported models land (its layout's kind folders)")
    models_dirs: list[Path] = Field(default_factory=list, description="more models folders, scanned after models_dir "
                                                                      "in this order and never written into: an "
                                                                      "A1111/Forge or ComfyUI install, or a flat "
                                                                      "folder; a name in an earlier folder wins")
    models: dict[str, ModelEntry] = Field(default_factory=dict, description="named models beside the built-ins")
    default_model: str = "builtin:shapes"

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    memory: MemoryOptions = MemoryOptions()
    performance: PerformanceOptions = PerformanceOptions()
    max_loaded_models: int = Field(2, ge=1, description="LRU budget: loaded bases/ControlNets kept at once")
    max_loaded_bytes: int | None = Field(None, ge=1, description="LRU budget in weight bytes (None: no byte cap)")

    limits: Limits = Limits()
    preview_interval: int = Field(2, ge=0, description="decode a cheap preview every N steps (0: never)")
    depth_estimator: str | None = Field(None, description="local transformers depth-estimation model folder")
    pose_estimator: str | None = Field(None, description="local transformers VitPose model folder")

    executor: Literal["local", "ray"] = Field("local", description="where jobs run: engines in this process (one "
                                                                 "worker per device) or engine actors on a Ray "
                                                                 "cluster")
    devices: list[str] = Field(default_factory=list, description="local executor: one worker per device, each with "
                                                                 "its own loaded models, e.g. [\"cuda:0\", "
                                                                 "\"cuda:1\"] (empty: the one `device`)")
    ray_address: str | None = Field(None, description="ray executor: the cluster to join, e.g. \"head:6379\" "
                                                      "(unset: start a Ray instance on this machine)")
    ray_workers: int | None = Field(None, ge=1, le=256, description="ray executor: engine actors to run; unset: one "
                                                                     "per GPU in the cluster, or one CPU actor "
                                                                     "when it has none")
    torch_threads: int | None = Field(None, ge=1, le=256, description="CPU threads torch uses per worker (unset: "
                                                                       "torch's default; Ray actors: their CPUs)")
    max_queue: int = Field(64, ge=1, description="queued jobs beyond this are refused (HTTP 429)")
    workers: int = Field(1, ge=1, le=16, description="jobs run at once on each local device (threads sharing "
                                                        "its loaded models)")
    batch_images: int = Field(8, ge=1, le=64, description="most images in one cross-user batch (1: no batching)")
    cache_entries: int = Field(1024, ge=0, description="results kept for repeat requests with explicit seeds")
    cache_scope: Literal["user", "global"] = Field("user", description="user: a repeat hits only its own user's "
                                                                      "results; global: anyone's (a hit then tells "
                                                                      "a user that someone ran that request)")
    job_time_limit_s: float = Field(600, gt=0, description="a running job past this is stopped and failed")
    rate_per_minute: float = Field(120, gt=0, description="per-user request rate (token bucket refill)")
    rate_burst: int = Field(20, ge=1, description="per-user burst above the rate")
    max_active_jobs: int = Field(16, ge=1, description="per-user queued + running jobs")

    login_max_failures: int = Field(5, ge=1, description="wrong passwords for one user name within "
                                                         "login_window_s before that name is locked out")
    login_address_max_failures: int = Field(20, ge=1, description="failed logins (any names) from one client "
                                                                  "address within login_window_s before that "
                                                                  "address is locked out")
    login_window_s: float = Field(600, gt=0, description="how far back failed logins count")
    login_lockout_s: float = Field(300, gt=0, description="how long a locked-out name or address waits (HTTP "
                                                          "429 with Retry-After)")
    allowed_origins: list[str] = Field(default_factory=list, description="web origins besides the studio's own "
                                                                         "that browsers may call it from (CORS), "
                                                                         "e.g. [\"https://app.example.com\"]; "
                                                                         "default: none")

    retention_days: float | None = Field(None, gt=0, description="history: finished jobs older than this are "
                                                                  "deleted with their images (unset: kept)")
    retention_max_jobs: int | None = Field(None, ge=1, description="history: most finished jobs kept overall, "
                                                                   "oldest deleted first (unset: no bound)")
    retention_max_jobs_per_user: int | None = Field(None, ge=1, description="history: most finished jobs kept "
                                                                            "per user (unset: no bound)")
    retention_interval_s: float = Field(3600, gt=0, description="how often retention prunes the history")

    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: required whenever the studio listens on a non-loopback address")
    users_file: Path | None = Field(None, description="users and API tokens (default: <data_dir>/users.json)")

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)

    @field_validator("devices")
    @classmethod
    def _devices_are_torch_devices(cls, devices: list[str]) -> list[str]:
        for device in devices:
            if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
                raise ValueError(f"'{device}' is not a device: use cpu, mps, cuda or cuda:N")
        return devices

    @field_validator("allowed_origins")
    @classmethod
    def _origins_are_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
                raise ValueError(f"'{origin}' is not a web origin: use scheme://host[:port], e.g. "
                                 "https://app.example.com (no path, no trailing slash, no wildcard)")
        return origins

    def worker_devices(self) -> list[str]:
        """The local executor's devices: `devices`, or the one `device`."""
        return list(self.devices) or [self.device]

    def auth_required(self) -> bool:
        if self.auth != "auto":
            return self.auth == "on"
        return not is_loopback(self.host)

    def all_models_dirs(self) -> list[Path]:
        """Every models folder in precedence order: `models_dir` first, then `models_dirs` (duplicates once)."""
        folders: list[Path] = []
        for folder in (self.models_dir, *self.models_dirs):
            if Path(folder).expanduser() not in folders:
                folders.append(Path(folder).expanduser())
        return folders

    def users_path(self) -> Path:
        return self.users_file or Path(self.data_dir) / "users.json"

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI flags arrive as init kwargs and win; then env; then the TOML file named by DS_CONFIG_FILE.
        return (init_settings, env_settings,
                TomlConfigSettingsSource(settings_cls, toml_file=os.environ.get("DS_CONFIG_FILE")))


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: treat as reachable from outside
        return False
