"""The files a request runs on (checkpoint, VAE, LoRAs, embeddings) and their A1111 hashes, both ways: queued
for hashing when a run starts and collected for its PNGs, and looked up by hash when an A1111 PNG is read.

Built-ins and diffusers folders are no single file, so they have no `Model hash` (A1111 would show none either).
Names are found as the engine finds them (sources.py's resolvers, the models library, embeddings.py's word match).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from ..config import StudioConfig
from ..requests import GenerationRequest, RequestError
from .embeddings import available_embeddings, embedding_file, named_in
from .hashes import SHA256, Hasher, Scheme, autov2, lora_scheme, short12
from .library import library_for
from .metadata import HashLookup, ResourceHashes, ResourceKind
from .sources import resolve, resolve_lora, resolve_vae

log = logging.getLogger(__name__)


def scheme_for(kind: str, path: Path) -> Scheme:
    return lora_scheme(path) if kind == "lora" else SHA256


def short_hash(kind: str, digest: str) -> str:
    return short12(digest) if kind in ("lora", "embedding") else autov2(digest)


@dataclass(frozen=True)
class RunFiles:
    """The hashable files one request uses, by the names the request gives them."""

    model: Path | None = None
    vae: Path | None = None
    loras: dict[str, Path] = field(default_factory=dict)
    embeddings: dict[str, Path] = field(default_factory=dict)

    def items(self) -> list[tuple[ResourceKind, str, Path]]:
        found: list[tuple[ResourceKind, str, Path]] = []
        if self.model:
            found.append(("checkpoint", "", self.model))
        if self.vae:
            found.append(("vae", "", self.vae))
        found += [("lora", name, path) for name, path in self.loras.items()]
        found += [("embedding", name, path) for name, path in self.embeddings.items()]
        return found


def run_files(request: GenerationRequest, config: StudioConfig) -> RunFiles:
    """Which files `request` uses. A name that doesn't resolve is left out: reporting it is the engine's job."""
    model = vae = None
    try:
        source = resolve(request.model, config)
        if source.kind == "single_file":
            model = Path(source.location)
    except RequestError:
        pass
    if request.vae:
        try:
            vae = _single_file(resolve_vae(request.vae, config))
        except RequestError:
            pass
    loras = {}
    for lora in request.loras:
        try:
            path = _single_file(resolve_lora(lora.name, config))
        except RequestError:
            continue
        if path:
            loras[lora.name] = path
    available = available_embeddings(config)
    embeddings = {}
    for name in named_in([request.prompt, request.negative_prompt], available):
        try:
            embeddings[name] = embedding_file(name, available, config)
        except RequestError:
            continue
    return RunFiles(model, vae, loras, embeddings)


def _single_file(path: Path) -> Path | None:
    """A folder counts as its one weights file (diffusers saves a LoRA so); a folder of several has no hash."""
    if path.is_file():
        return path
    files = sorted(path.glob("*.safetensors"))
    preferred = [file for file in files if file.name.startswith("pytorch_lora_weights")]
    return preferred[0] if preferred else files[0] if len(files) == 1 else None


def listed_files(config: StudioConfig, kind: ResourceKind | None = None) -> dict[tuple[str, str], Path]:
    """(kind, name) -> file for every usable single-file model in the models folders (folders have no hash)."""
    return {(entry.kind, entry.name): entry.path for entry in library_for(config).entries(kind)
            if entry.usable and entry.path.is_file()}


def queue_hashes(hasher: Hasher, files: RunFiles) -> dict[tuple[ResourceKind, str], Future]:
    """Ask for every file's hash now (the hasher works while the model loads); cached ones are done at once."""
    return {(kind, name): hasher.request(path, scheme_for(kind, path)) for kind, name, path in files.items()}


def collect_hashes(hasher: Hasher, files: RunFiles, wait_s: float) -> ResourceHashes:
    """The files' short hashes, waiting at most `wait_s` in all; a hash not ready by then is left out (logged)."""
    deadline = time.monotonic() + wait_s
    model = vae = None
    loras, embeddings = {}, {}
    for (kind, name), future in queue_hashes(hasher, files).items():
        try:
            digest = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            log.warning("the PNG goes without the %s hash of %s: not hashed within %.0f s (it still is; later "
                        "images will carry it)", kind, name or kind, wait_s)
            continue
        except Exception as exc:  # noqa: BLE001 (unreadable file: the image is still worth saving)
            log.warning("the PNG goes without the %s hash of %s: %s", kind, name or kind, exc)
            continue
        short = short_hash(kind, digest)
        if kind == "checkpoint":
            model = short
        elif kind == "vae":
            vae = short
        elif kind == "lora":
            loras[name] = short
        else:
            embeddings[name] = short
    return ResourceHashes(model=model, vae=vae, loras=loras, embeddings=embeddings)


def queue_listed(hasher: Hasher, config: StudioConfig) -> None:
    """Every listed file not hashed yet, behind all run-time requests (the listing's backlog)."""
    for (kind, _), path in listed_files(config).items():
        hasher.request(path, scheme_for(kind, path), background=True)


def hash_lookup(hasher: Hasher, config: StudioConfig) -> HashLookup:
    """A lookup for `metadata.png_parameters`: a short hash -> the name of the listed model of that kind whose
    known hash (the cache: nothing is hashed here) starts with it. Only listed models are named, so no server path
    leaks. Reads the models folders: call off the event loop."""
    names: dict[str, tuple[str, str]] | None = None

    def lookup(kind: ResourceKind, short: str) -> str | None:
        nonlocal names
        if names is None:
            names = {os.path.abspath(path): key for key, path in listed_files(config).items()}
        schemes: tuple[Scheme, ...] = ("addnet", SHA256) if kind == "lora" else (SHA256,)
        for scheme in schemes:
            for path in hasher.matches(short, scheme):
                listed_kind, name = names.get(str(path), ("", ""))
                if listed_kind == kind:
                    return name
        return None

    return lookup
