"""Model names -> where the weights are: `builtin:<name>`, a configured name, a local diffusers folder or single
`.safetensors`/`.ckpt` file by path, a name in the models folders (engine/library.py: the studio's own, A1111/Forge
and ComfyUI layouts), or a Hugging Face hub id. LoRAs, VAEs and embeddings are found by name the same way.

Listed names are looked up first, so a name means the same model whoever sends it. A `NamePolicy` says what else a
caller may name: admins (and everyone while auth is off) also a server path or a hub id; other users only what the
studio lists, and anything else is refused with one message that does not depend on what the disk holds (no path
is looked at), so the refusal can't be used to probe the server's files.

Resolution reads headers and small JSON files only and never writes (built-in stand-ins are built at start-up, see
builtin/catalog.py's `ensure_standins`); loading the weights is the PipelineManager's job.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..builtin.catalog import BUILTINS, COMMITTED_DIR, builtin_folder, is_trained
from ..config import StudioConfig
from ..requests import RequestError
from .identify import FileKind, misplaced_message
from .library import KINDS, LibraryEntry, beside_config, folder_model, library_for

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
ROLES = {"checkpoint": "base", "controlnet": "controlnet"}
NAMES_SHOWN = 20  # an unknown name's error lists this many of the names that exist
NAME_SHOWN_CHARS = 80  # a refused name is echoed up to this many characters
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class NamePolicy:
    """Which names a caller may use. The default (`ANY_NAME`, an admin's): every listed name, a server path or a hub
    id. `listed_only` (a user who is not an admin): only what the studio lists (built-ins, configured models, the
    models folders' entries, and trained LoRAs other than `hidden_loras`, which are other users' own); anything
    else is refused without looking at the disk. The engine gets a policy, never a user name."""

    listed_only: bool = False
    hidden_loras: frozenset[str] = frozenset()  # names of trained LoRAs (in <data_dir>/loras) this caller can't use


ANY_NAME = NamePolicy()


@dataclass(frozen=True)
class ModelSource:
    """A resolved model. `compute_identity()` changes when the weights do (cache keys, history)."""

    name: str  # what the user typed, canonical for built-ins
    kind: Literal["builtin", "folder", "single_file", "hub"]
    location: str  # folder, file path or hub id
    role: Literal["base", "controlnet", "estimator"]  # estimator: a depth / pose model for control maps
    family: Literal["sd", "sdxl"] | None  # None: known only once loaded (hub ids)
    config_folder: Path | None = None  # single files: an explicit diffusers config folder (None: shipped configs)
    standin: bool = False
    file_kind: FileKind | None = None  # single files: what the header says they are (identify.identify_file)

    def compute_identity(self) -> str:
        """Name + a digest of the weight files' sizes and mtimes. Walks and stats the folder, so it is computed
        once per load (the PipelineManager records it on the loaded model; `Engine.weights_identity` reads that)."""
        if self.kind == "hub":
            return f"hub:{self.location}"
        path = Path(self.location)
        # A single file counts whatever its suffix (.pt/.pth LoRAs, ControlNets, upscalers); a folder its weights
        # and configs.
        files = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".ckpt", ".bin", ".json", ".pt",
                                                                  ".pth")) if path.is_dir() else [path]
        stamp = hashlib.sha256("".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files).encode())
        return f"{self.name}@{stamp.hexdigest()[:12]}"


def resolve(name: str, config: StudioConfig, field: str = "model", policy: NamePolicy = ANY_NAME) -> ModelSource:
    """Find the model (a base or a ControlNet) called `name`; unknown names get an error listing what exists (and,
    under a `listed_only` policy, so does every path and hub id, whether or not it exists)."""
    if name.startswith("builtin:"):
        short = name.removeprefix("builtin:")
        if short not in BUILTINS:
            raise RequestError(field, f"unknown built-in '{short}'; built-ins: {', '.join(BUILTINS)}")
        spec = BUILTINS[short]
        folder = builtin_folder(short, config.data_dir)
        return ModelSource(name, "builtin", str(folder), spec.kind, spec.family, standin=not is_trained(short))
    if name in config.models:
        entry = config.models[name]
        source = _resolve_location(entry.source, config, entry.config, field)
        return ModelSource(name, source.kind, source.location, source.role, source.family, source.config_folder,
                           file_kind=source.file_kind)
    return _resolve_location(name, config, None, field, policy)


def _resolve_location(text: str, config: StudioConfig, config_folder: str | None, field: str,
                      policy: NamePolicy = ANY_NAME) -> ModelSource:
    """A name in the models folders, else (unless `policy.listed_only`) a path on the server or a hub id. A
    configured model's own source is the admin's configuration: it is resolved with the default policy."""
    library = library_for(config)
    for kind in ROLES:
        entry = library.find(kind, text)
        if entry is not None:
            if entry.reason:
                raise RequestError(field, f"'{text}' ({entry.relative}) can't be used: {entry.reason}")
            return _path_source(entry.name, entry.path, config_folder, field, library)
    names = [f"builtin:{short}" for short in BUILTINS] + list(config.models) + \
        [name for kind in ROLES for name in library.names(kind)]
    if policy.listed_only:  # no path is looked at: the answer is the same whatever the disk holds
        raise not_listed(field, text, "a model", "models", names)
    path = existing_path(text)
    if path is not None:
        return _path_source(text, path, config_folder, field, library)
    if HUB_ID.match(text):
        return ModelSource(text, "hub", text, "base", None)
    raise RequestError(field, f"'{text}' is not a built-in, a configured model, a model in the models folders, a "
                              f"folder, a checkpoint file or a hub id like 'org/name'; models: {_some(names)}")


def not_listed(field: str, text: str, what: str, plural: str, names: list[str]) -> RequestError:
    """The one refusal of a name the studio doesn't list, for callers who may use listed names only: the same text
    for a path that exists, one that doesn't, `~user`, `../x` or a hub id (only the name itself differs)."""
    shown = text if len(text) <= NAME_SHOWN_CHARS else text[:NAME_SHOWN_CHARS] + "…"
    return RequestError(field, f"'{shown}' is not {what} this studio lists; {plural}: {_some(names)}")


def existing_path(text: str) -> Path | None:
    """`text` as a path on the server when something is there (`~` expanded); None otherwise, also for text that
    can't be a path (an unknown `~user`, a NUL byte, a name too long)."""
    try:
        path = Path(text).expanduser()
        return path if path.exists() else None
    except (OSError, ValueError, RuntimeError):
        return None


def _path_source(name: str, path: Path, config_folder: str | None, field: str, library) -> ModelSource:
    if path.is_dir():
        return _folder_source(name, path, field)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise RequestError(field, f"'{name}' is a file but not a .safetensors or .ckpt checkpoint")
    kind, reason = library.identify(path)  # cached by path, size and mtime: resolving again reads nothing
    configs = _config_folder_for(path, config_folder, field)
    if reason and configs is not None and (model := folder_model(configs)) is not None and model[0] in ROLES:
        # The header fits no known family, but explicit configs say what it is (as before identification).
        return ModelSource(name, "single_file", str(path), ROLES[model[0]], model[1], configs)
    if reason:
        raise RequestError(field, reason)
    if kind.kind not in ROLES:
        raise RequestError(field, misplaced_message(path, kind))
    return ModelSource(name, "single_file", str(path), ROLES[kind.kind], kind.family, configs, file_kind=kind)


def _folder_source(text: str, folder: Path, field: str = "model") -> ModelSource:
    model = folder_model(folder)
    if model is None or model[0] not in ROLES:
        raise RequestError(field, f"folder '{folder.name}' is not a diffusers pipeline (no model_index.json) or "
                                  "ControlNet")
    kind, family = model
    return ModelSource(text, "folder", str(folder), ROLES[kind], family)


def _config_folder_for(checkpoint: Path, configured: str | None, field: str) -> Path | None:
    """An explicit diffusers config folder: the configured one, or one beside the file (`<stem>/` or `config/`);
    None: the loader uses the configs shipped for the detected family."""
    if not configured:
        return beside_config(checkpoint)
    folder = Path(configured).expanduser()
    if not ((folder / "model_index.json").is_file() or (folder / "config.json").is_file()):
        raise RequestError(field, f"the config folder '{folder.name}' configured for '{checkpoint.name}' has no "
                                  "model_index.json or config.json")
    return folder


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN]) or "none"
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def list_models(config: StudioConfig, kind: str | None = None) -> list[dict]:
    """Built-ins first, then configured models, then what the models folders hold (every kind, or one). Paths are
    relative to their models folder: the server's absolute paths never leave it."""
    if kind is not None and kind not in KINDS:
        raise RequestError("kind", f"'{kind}' is not a kind; kinds: {', '.join(KINDS)}")
    rows = []
    for spec in BUILTINS.values():
        spec_kind = "checkpoint" if spec.kind == "base" else spec.kind
        rows.append({"name": f"builtin:{spec.name}", "kind": spec_kind, "role": spec.kind, "family": spec.family,
                     "variant": None, "dtype": None, "path": None, "size_bytes": None, "usable": True,
                     "reason": None, "origin": builtin_origin(spec.name), "description": spec.description})
    for name, entry in config.models.items():
        source = entry.source if HUB_ID.match(entry.source) else Path(entry.source).name
        rows.append({"name": name, "kind": "checkpoint" if entry.kind == "base" else entry.kind, "role": entry.kind,
                     "family": None, "variant": None, "dtype": None, "path": None, "size_bytes": None,
                     "usable": True, "reason": None, "origin": "configured", "description": source})
    rows += [library_row(entry) for entry in library_for(config).entries()]
    return [row for row in rows if kind is None or row["kind"] == kind]


def library_row(entry: LibraryEntry) -> dict:
    file_kind = entry.file_kind
    reason = entry.reason or (f"the name is taken by {entry.shadowed_by}, which is used" if entry.shadowed_by
                              else None)
    origin = "data dir" if entry.folder < 0 else "models folder" if entry.folder == 0 else \
        f"models folder {entry.folder}"
    return {"name": entry.name, "kind": entry.kind, "role": ROLES.get(entry.kind, entry.kind),
            "family": entry.family, "variant": file_kind.variant if file_kind else None,
            "dtype": file_kind.dtype if file_kind else None, "path": entry.relative,
            "size_bytes": entry.size_bytes, "usable": entry.usable, "reason": reason,
            "origin": origin, "layout": entry.layout,
            "description": f"unusable: {reason}" if reason else
            (file_kind.describe() if file_kind else f"diffusers folder ({entry.kind})")}


def builtin_origin(short: str) -> str:
    """'built-in', or what is still missing: untrained stand-in, or trained only part of the way."""
    folder = COMMITTED_DIR / short
    if not folder.is_dir():
        return "built-in (untrained stand-in)"
    progress_file = folder / "training.json"
    if progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        if not progress.get("finished", True):
            return f"built-in (partly trained: {progress.get('unet_step', '?')} steps)"
    return "built-in"


def list_loras(config: StudioConfig, policy: NamePolicy = ANY_NAME) -> list[str]:
    """Usable LoRA names (trained ones in <data_dir>/loras, then each models folder's LoRA folders), less the
    trained ones `policy` hides."""
    return [name for name in _usable_names(config, "lora") if name not in policy.hidden_loras]


def list_vaes(config: StudioConfig) -> list[str]:
    return _usable_names(config, "vae")


def list_embeddings(config: StudioConfig) -> list[str]:
    """Usable embedding names; the file name alone (the word a prompt uses) also resolves when unique."""
    return _usable_names(config, "embedding")


def _usable_names(config: StudioConfig, kind: str) -> list[str]:
    return [entry.name for entry in library_for(config).entries(kind) if entry.usable]


def resolve_lora(name: str, config: StudioConfig, policy: NamePolicy = ANY_NAME) -> Path:
    """A LoRA by name in `<data_dir>/loras` and every models folder's LoRA folders, or (admins) by path."""
    return _resolve_file("lora", name, config, "loras", "LoRA", policy)


def resolve_vae(name: str, config: StudioConfig, policy: NamePolicy = ANY_NAME) -> Path:
    """A VAE (a file or a diffusers AutoencoderKL folder) by name in the models folders, or (admins) by path."""
    return _resolve_file("vae", name, config, "vae", "VAE", policy)


def resolve_embedding(name: str, config: StudioConfig, field: str = "prompt") -> Path:
    """A textual-inversion embedding by path or by name in the models folders' embeddings folders."""
    return _resolve_file("embedding", name, config, field, "embedding")


def _resolve_file(kind: str, name: str, config: StudioConfig, field: str, label: str,
                  policy: NamePolicy = ANY_NAME) -> Path:
    library = library_for(config)
    entry = library.find(kind, name)
    if entry is not None and entry.folder < 0 and entry.name in policy.hidden_loras:
        entry = None  # another user's trained LoRA: as if it weren't there
    if entry is not None:
        if entry.reason:
            raise RequestError(field, f"{label} '{name}' ({entry.relative}) can't be used: {entry.reason}")
        return entry.path
    names = [each for each in _usable_names(config, kind) if kind != "lora" or each not in policy.hidden_loras]
    if policy.listed_only:  # no path is looked at: the answer is the same whatever the disk holds
        raise not_listed(field, name, f"a {label}", f"{label}s", names)
    path = existing_path(name)
    if path is not None and (path.is_file() or (path.is_dir() and folder_model(path) is not None)):
        return path
    raise RequestError(field, f"{label} '{name}' not found; {label}s: {_some(names)}")
