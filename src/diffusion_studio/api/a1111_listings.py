"""/sdapi/v1's read-only listings, in A1111's shapes: models, samplers and schedules, upscalers (latent modes apart,
as A1111 separates them), VAEs, LoRAs, embeddings, scripts (none), command-line flags and memory."""

from __future__ import annotations

import ipaddress
import os
from importlib import metadata

import psutil
from fastapi import APIRouter, Depends, Request

from ..samplers import SAMPLERS
from ..studio import Studio
from .a1111_fields import A1111_SCHEDULES, HONOURED_SCHEDULES, SAMPLER_ALIASES
from .a1111_options import Catalog
from .access import current_user


def studio_version() -> str:
    try:
        return metadata.version("diffusion-studio")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_listings_router(studio: Studio) -> APIRouter:
    router = APIRouter()  # included by a1111.build_router, under /sdapi/v1

    @router.get("/sd-models", operation_id="a1111_sd_models")
    def sd_models() -> list[dict]:
        """Checkpoints as A1111 lists them; a file not hashed yet shows hash null and is queued (never hashed on
        the request)."""
        return Catalog(studio).sd_models()

    @router.get("/samplers", operation_id="a1111_samplers")
    def samplers() -> list[dict]:
        """The studio's samplers (a Karras schedule is its own entry here), with A1111's old aliases."""
        return [{"name": name, "aliases": [alias for alias, target in SAMPLER_ALIASES.items() if target == name],
                 "options": options} for name, (_, options) in SAMPLERS.items()]

    @router.get("/schedulers", operation_id="a1111_schedulers")
    def schedulers() -> list[dict]:
        """A1111 1.9+'s schedule types that run here (others are accepted and reported in a result's info)."""
        return [{"name": name, "label": A1111_SCHEDULES[name][0], "aliases": A1111_SCHEDULES[name][1] or None,
                 "default_rho": A1111_SCHEDULES[name][2] if A1111_SCHEDULES[name][2] is not None else -1,
                 "need_inner_model": A1111_SCHEDULES[name][3]} for name in HONOURED_SCHEDULES]

    @router.get("/upscalers", operation_id="a1111_upscalers")
    def upscalers() -> list[dict]:
        """Pixel upscalers ("None" first, as A1111) and upscaler model files; latent ones are in
        latent-upscale-modes."""
        return [{"name": row["name"], "model_name": os.path.splitext(os.path.basename(row["path"]))[0]
                 if row["path"] else None, "model_path": row["path"], "model_url": None, "scale": row["scale"]}
                for row in studio.upscalers() if row["kind"] != "latent"]

    @router.get("/latent-upscale-modes", operation_id="a1111_latent_upscale_modes")
    def latent_upscale_modes() -> list[dict]:
        return [{"name": row["name"]} for row in studio.upscalers() if row["kind"] == "latent"]

    @router.get("/sd-vae", operation_id="a1111_sd_vae")
    def sd_vae() -> list[dict]:
        return [{"model_name": entry.name, "filename": entry.relative}
                for entry in studio.model_entries("vae") if entry.usable]

    @router.get("/loras", operation_id="a1111_loras")
    def loras(user: str = Depends(current_user)) -> list[dict]:
        """LoRAs as A1111's Lora extension lists them (`metadata`: the file's kohya training notes); `path` is
        relative to its models folder. LoRAs other users trained here are left out (admins see every one)."""
        return [{"name": entry.name, "alias": entry.details.get("metadata", {}).get("ss_output_name") or entry.stem,
                 "path": entry.relative, "metadata": entry.details.get("metadata", {})}
                for entry in studio.model_entries("lora", user) if entry.usable]

    @router.get("/embeddings", operation_id="a1111_embeddings")
    def embeddings() -> dict:
        """Textual-inversion embeddings as A1111 reports them; unusable files are `skipped`."""
        found: dict[str, dict] = {"loaded": {}, "skipped": {}}
        for entry in studio.model_entries("embedding"):
            details = {key: entry.details.get(key) for key in ("step", "sd_checkpoint", "sd_checkpoint_name",
                                                                 "shape", "vectors")}
            found["loaded" if entry.usable else "skipped"][entry.name] = details
        return found

    def refresh() -> None:
        studio.refresh_models()

    for route, operation in (("/refresh-checkpoints", "a1111_refresh_checkpoints"),
                             ("/refresh-loras", "a1111_refresh_loras"), ("/refresh-vae", "a1111_refresh_vae"),
                             ("/refresh-embeddings", "a1111_refresh_embeddings")):
        router.add_api_route(route, refresh, methods=["POST"], operation_id=operation,
                             summary="Read the models folders again")

    @router.get("/scripts", operation_id="a1111_scripts")
    def scripts() -> dict:
        """No A1111 scripts here (webuiapi reads this list to see which extensions exist)."""
        return {"txt2img": [], "img2img": []}

    @router.get("/script-info", operation_id="a1111_script_info")
    def script_info() -> list:
        return []

    def nothing() -> list:
        return []

    for route, operation, what in (("/hypernetworks", "a1111_hypernetworks", "hypernetworks"),
                                   ("/face-restorers", "a1111_face_restorers", "face restorers"),
                                   ("/prompt-styles", "a1111_prompt_styles", "stored prompt styles"),
                                   ("/extensions", "a1111_extensions", "A1111 extensions")):
        router.add_api_route(route, nothing, methods=["GET"], operation_id=operation, summary=f"None here: no {what}")

    @router.get("/cmd-flags", operation_id="a1111_cmd_flags")
    def cmd_flags(request: Request) -> dict:
        """A1111's command-line flags with this studio's values: the address it serves on, the API on, no
        extensions; paths and credentials are never shown."""
        host, port = (request.scope.get("server") or (studio.config.host, studio.config.port))[:2]
        try:
            listen = not ipaddress.ip_address(host).is_loopback
        except ValueError:
            listen = host != "localhost"
        cpu = studio.device.startswith("cpu")
        return {"api": True, "nowebui": False, "listen": listen, "server_name": host, "port": port,
                "api_auth": None, "api_log": False, "gradio_auth": None, "share": False, "ngrok": None,
                "cors_allow_origins": None, "cors_allow_origins_regex": None, "enable_insecure_extension_access":
                False, "disable_extension_access": True, "disable_safe_unpickle": False, "skip_torch_cuda_test": cpu,
                "use_cpu": ["all"] if cpu else [], "device_id": None, "no_half": cpu, "no_half_vae": cpu,
                "precision": "full" if cpu else "autocast", "medvram": False, "lowvram": False,
                "xformers": False, "opt_sdp_attention": True, "ckpt": None, "ckpt_dir": None, "vae_dir": None,
                "lora_dir": None, "embeddings_dir": None, "data_dir": None, "models_dir": None,
                "hide_ui_dir_config": True, "freeze_settings": False, "theme": None, "version": studio_version()}

    @router.get("/memory", operation_id="a1111_memory")
    def memory() -> dict:
        """RAM as A1111 reports it (`used`: this process), and CUDA's figures or why there are none."""
        process = psutil.Process()
        rss = process.memory_info().rss
        total = psutil.virtual_memory().total
        ram = {"free": total - rss, "used": rss, "total": total}
        import torch

        if not torch.cuda.is_available():
            return {"ram": ram, "cuda": {"error": "no CUDA device"}}
        free, whole = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()

        def pair(name: str) -> dict:
            return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

        return {"ram": ram, "cuda": {
            "system": {"free": free, "used": whole - free, "total": whole}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}}

    return router
