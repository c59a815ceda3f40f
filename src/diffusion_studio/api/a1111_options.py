"""A1111's names for the studio's models, and its options dict.

`Catalog` lists checkpoints as A1111's sd-models does (title "name.safetensors [hash]", model_name, hashes) and
turns the names A1111 clients send (a title, with or without its hash, a model name, a file name) back into the
studio's. `options_of` is the options dict A1111 clients read (GET /sdapi/v1/options): the user's model, VAE and
CLIP skip, and the studio's truthful values for the other settings clients look at. `option_changes` checks a
posted dict: the three settable keys are validated; the rest is accepted, and keys whose value differs from what
the studio does are reported as ignored (Open WebUI posts the whole dict back).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine.hashes import autov2
from ..engine.library import TITLE_HASH
from ..engine.resources import listed_files
from ..requests import RequestError
from ..studio import Studio
from .a1111_fields import Defaults, Names

AUTOMATIC = "Automatic"
NO_VAE = ("Automatic", "None")
SETTABLE = {"sd_model_checkpoint": "model", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip"}
DERIVED = {"sd_checkpoint_hash"}  # follows sd_model_checkpoint
SHOWN_NAMES = 20  # names listed in a refusal


class OptionsBody(BaseModel):
    """A1111's options (POST the whole dict back, or just the keys to change); other keys are accepted."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(None, description="an sd-models title (or model name): this user's "
                                                              "default model")
    sd_vae: str | None = Field(None, description="'Automatic', 'None' or an sd-vae model_name")
    CLIP_stop_at_last_layers: int | None = Field(None, ge=1, le=12, description="CLIP skip (1: the last layer)")


def sd_model(row: dict, file: Path | None, sha256: str | None) -> dict[str, Any]:
    """One checkpoint as A1111's sd-models lists it. A1111's title is the file name relative to its folder plus
    the AUTOV2 hash once known; `filename` is relative to its models folder here (A1111 gives the absolute path,
    which is the server's business)."""
    name = row["name"] + file.suffix if file else row["name"]
    short = autov2(sha256) if sha256 else None
    return {"title": f"{name} [{short}]" if short else name,
            "model_name": os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0] if file else name,
            "hash": short, "sha256": sha256, "filename": row.get("path") or name, "config": None}


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "") or "none"


class Catalog:
    """The studio's checkpoints and VAEs under A1111's names, read once per request."""

    def __init__(self, studio: Studio):
        self.studio = studio
        rows = [row for row in studio.models("checkpoint") if row["usable"]]  # as A1111: the ones it can load
        files = listed_files(studio.config, "checkpoint")
        self.models: list[tuple[str, dict]] = []  # (studio name, sd-models row)
        for row in rows:
            file = files.get(("checkpoint", row["name"]))
            self.models.append((row["name"], sd_model(row, file, studio.hasher.known(file) if file else None)))
        self.vaes = [entry.name for entry in studio.model_entries("vae") if entry.usable]

    def sd_models(self) -> list[dict]:
        return [listed for _, listed in self.models]

    def row(self, name: str) -> dict | None:
        return next((listed for studio_name, listed in self.models if studio_name == name), None)

    def title(self, name: str) -> str:
        row = self.row(name)
        return row["title"] if row else name

    def checkpoint(self, value: str, field: str = "sd_model_checkpoint") -> str:
        """The studio's name for a checkpoint A1111 clients name by title, title without hash, model name, file
        name or hash; an unknown one is refused with the titles that exist."""
        wanted = value.strip()
        for exact in (True, False):
            for name, listed in self.models:
                known = {listed["title"], TITLE_HASH.sub("", listed["title"]), listed["model_name"], name,
                         listed["filename"], listed["hash"], listed["sha256"]} - {None}
                if wanted in known or not exact and wanted.lower() in {k.lower() for k in known}:
                    return name
        raise RequestError(field, f"no checkpoint '{value[:80]}'; checkpoints (GET /sdapi/v1/sd-models): "
                                  f"{_some([listed['title'] for _, listed in self.models])}")

    def vae(self, value: str, field: str = "sd_vae") -> str:
        """An A1111 sd_vae value as given ('Automatic', 'None' or a listed VAE), or refused with the VAEs."""
        wanted = value.strip()
        if wanted in NO_VAE or wanted in self.vaes:
            return wanted
        for name in self.vaes:  # A1111 lists VAEs with their suffix; "name.safetensors" finds "name"
            if os.path.splitext(wanted)[0] == name:
                return name
        raise RequestError(field, f"no VAE '{value[:80]}'; choose Automatic, None or one of (GET "
                                  f"/sdapi/v1/sd-vae): {_some(self.vaes)}")

    def names(self) -> Names:
        return Names(checkpoint=self.checkpoint, vae=self.vae)


def defaults_of(preferences: dict[str, Any], studio: Studio) -> Defaults:
    return Defaults(model=preferences.get("model") or studio.config.default_model, vae=preferences.get("vae"),
                    clip_skip=preferences.get("clip_skip") or 1)


def options_of(defaults: Defaults, catalog: Catalog, studio: Studio) -> dict[str, Any]:
    """A1111's options as this user's requests run: their model, VAE and CLIP skip, and the studio's own
    behaviour for the other settings A1111 clients read (no grid, PNG with parameters, previews, ...)."""
    config = studio.config
    row = catalog.row(defaults.model)
    return {
        "sd_model_checkpoint": catalog.title(defaults.model),
        "sd_checkpoint_hash": row["sha256"] if row else None,
        "sd_vae": defaults.vae or AUTOMATIC,
        "CLIP_stop_at_last_layers": defaults.clip_skip,
        "sd_unet": AUTOMATIC, "sd_lora": "None", "sd_hypernetwork": "None", "sd_model_refiner": "None",
        "sd_checkpoints_limit": config.max_loaded_models, "sd_checkpoints_keep_in_cpu": False,
        "sd_vae_overrides_per_model_preferences": False, "sd_vae_decode_method": "Tiled" if
        config.memory.vae_tiling else "Full",
        "samples_save": True, "samples_format": "png", "grid_save": False, "grid_format": "png",
        "return_grid": False, "enable_pnginfo": True, "save_txt": False, "save_images_add_number": True,
        "samples_filename_pattern": "", "directories_filename_pattern": "[date]",
        "img2img_fix_steps": False, "use_old_hires_fix_behaviour": False, "upscaler_for_img2img": None,
        "live_previews_enable": config.preview_interval > 0, "show_progress_every_n_steps": config.preview_interval,
        "show_progressbar": True, "eta_noise_seed_delta": 0, "eta_ancestral": 1.0, "eta_ddim": 0.0,
        "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "s_min_uncond": 0.0,
        "token_merging_ratio": 0.0, "token_merging_ratio_hr": 0.0, "hide_samplers": [],
        "quicksettings_list": list(SETTABLE),
    }


def option_changes(body: OptionsBody, raw: dict[str, Any], current: dict[str, Any],
                   catalog: Catalog) -> tuple[dict[str, Any], dict[str, str]]:
    """(preference changes, ignored key -> why) for a posted options dict. The settable keys are checked against
    what exists; a key the studio has with another value, or a key it doesn't have, is accepted and ignored."""
    changes: dict[str, Any] = {}
    if body.sd_model_checkpoint is not None:
        changes["model"] = catalog.checkpoint(body.sd_model_checkpoint)
    if body.sd_vae is not None:
        vae = catalog.vae(body.sd_vae)
        changes["vae"] = None if vae == AUTOMATIC else vae
    if body.CLIP_stop_at_last_layers is not None:
        changes["clip_skip"] = body.CLIP_stop_at_last_layers
    ignored = {}
    for key, value in raw.items():
        if key in SETTABLE or key in DERIVED:
            continue
        if key not in current:
            ignored[key] = "not a setting this studio has"
        elif current[key] != value:
            ignored[key] = f"fixed here: {current[key]!r}"
    return changes, ignored
