"""Models folders as their owners keep them: the studio's own flat layout, an AUTOMATIC1111/Forge root, a ComfyUI
root, or the inner `models/` folder of either. Every kind the studio uses (checkpoint, controlnet, lora, vae,
embedding) is found in its kind folder, sub-folders included, and named as A1111 names it: the path relative to
the kind folder without the suffix (`anime/foo`); the file name alone (`foo`) also resolves when it is unique.

Scanning reads headers only (`identify.identify_file`) and is cached: a folder is listed again only when its mtime
changes (a file added, removed or renamed in it) or on `refresh()`, and a file is identified again only when its
size or mtime changes. A file that can't be used is listed with the reason, never dropped and never an error.

Nothing here writes into a models folder, except `import_model`, and that only into the studio's own one
(`models_dir`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import struct
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

from ..config import StudioConfig
from ..requests import RequestError
from .identify import FileKind, identify_file, load_weights_only, misplaced_message

log = logging.getLogger(__name__)

Kind = Literal["checkpoint", "controlnet", "lora", "vae", "embedding", "upscaler"]
KINDS: tuple[Kind, ...] = ("checkpoint", "controlnet", "lora", "vae", "embedding", "upscaler")

# Each layout's kind folders, relative to the configured root; the first is where an import of that kind lands.
LAYOUTS: dict[str, dict[Kind, tuple[str, ...]]] = {
    "a1111": {"checkpoint": ("models/Stable-diffusion",), "controlnet": ("models/ControlNet",),
              "lora": ("models/Lora", "models/LyCORIS"), "vae": ("models/VAE",), "embedding": ("embeddings",),
              "upscaler": ("models/ESRGAN", "models/RealESRGAN", "models/SwinIR", "models/DAT", "models/HAT")},
    "a1111-models": {"checkpoint": ("Stable-diffusion",), "controlnet": ("ControlNet",), "lora": ("Lora", "LyCORIS"),
                     "vae": ("VAE",), "embedding": ("embeddings", "../embeddings"),
                     "upscaler": ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT")},
    "comfyui": {"checkpoint": ("models/checkpoints", "models/diffusers"), "controlnet": ("models/controlnet",),
                "lora": ("models/loras",), "vae": ("models/vae",), "embedding": ("models/embeddings",),
                "upscaler": ("models/upscale_models",)},
    "comfyui-models": {"checkpoint": ("checkpoints", "diffusers"), "controlnet": ("controlnet",), "lora": ("loras",),
                       "vae": ("vae",), "embedding": ("embeddings",), "upscaler": ("upscale_models",)},
    "flat": {"checkpoint": ("",), "controlnet": ("controlnet",), "lora": ("loras",), "vae": ("vae",),
             "embedding": ("embeddings",), "upscaler": ("upscalers",)},
}
# The sub-folder that tells each layout (checked in this order; anything else is the flat layout).
LAYOUT_MARKERS = (("a1111", "models/Stable-diffusion"), ("comfyui", "models/checkpoints"),
                  ("a1111-models", "Stable-diffusion"), ("comfyui-models", "checkpoints"))
SUFFIXES: dict[Kind, tuple[str, ...]] = {
    "checkpoint": (".safetensors", ".ckpt"),
    "controlnet": (".safetensors", ".pth", ".ckpt", ".bin"),
    "lora": (".safetensors", ".pt", ".ckpt", ".bin"),
    "vae": (".safetensors", ".pt", ".ckpt", ".bin"),
    "embedding": (".pt", ".safetensors", ".bin"),
    "upscaler": (".pth", ".safetensors", ".pt"),
}
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# A1111 clients send a checkpoint's title, "anime/foo.safetensors [abcdef1234]": the hash part is not the name.
TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")
FLAT_KIND_FOLDERS = frozenset(folder for kind, (folder,) in LAYOUTS["flat"].items() if folder)
MAX_DEPTH = 4  # sub-folders walked below a kind folder (a models folder pointed at a big tree stays cheap)
SMALL_FILE_BYTES = 32 * 2**20  # embeddings are KBs: read whole for their A1111 details


@dataclass(frozen=True)
class LibraryEntry:
    """One model found in a models folder. `path` is absolute and stays on the server; the API shows `relative`."""

    kind: Kind
    name: str  # relative to the kind folder, '/'-separated, without the suffix
    path: Path
    folder: int  # which models folder: 0 is models_dir, then models_dirs in order; -1 the data dir
    relative: str  # the path relative to its models folder
    layout: str
    size_bytes: int
    family: str | None = None
    file_kind: FileKind | None = None  # None for diffusers folders
    reason: str | None = None  # why it can't be used (None: usable)
    details: dict = field(default_factory=dict, compare=False)  # LoRA metadata, embedding vectors/shape
    shadowed_by: str | None = None  # an earlier entry of the same kind and name, which is the one used

    @property
    def usable(self) -> bool:
        return self.reason is None and self.shadowed_by is None

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1]


@dataclass
class _Listing:
    """One directory as last listed: its mtime, the entries in it, its organising sub-folders."""

    mtime_ns: int
    entries: list[LibraryEntry]
    subfolders: list[Path]


def detect_layout(root: Path) -> str:
    for layout, marker in LAYOUT_MARKERS:
        if _find_folder(root, marker) is not None:
            return layout
    return "flat"


def _find_folder(root: Path, relative: str) -> Path | None:
    """`root/relative`, matching each part case-insensitively (A1111's `Lora` is `lora` on some installs)."""
    folder = root
    for part in Path(relative).parts:
        if part == "..":
            folder = folder.parent
            continue
        exact = folder / part
        if exact.is_dir():
            folder = exact
            continue
        try:
            match = next((child for child in folder.iterdir() if child.name.lower() == part.lower()
                          and child.is_dir()), None)
        except OSError:
            return None
        if match is None:
            return None
        folder = match
    return folder if folder.is_dir() else None


def folder_model(folder: Path) -> tuple[Kind, str | None] | None:
    """A diffusers folder: (kind, family), from its small JSON files; None if it is not one."""
    try:
        if (folder / "model_index.json").is_file():
            index = json.loads((folder / "model_index.json").read_text())
            return "checkpoint", "sdxl" if "XL" in index.get("_class_name", "") or "text_encoder_2" in index else "sd"
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            if config.get("_class_name") == "ControlNetModel":
                return "controlnet", "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
            if config.get("_class_name") == "AutoencoderKL":
                return "vae", None
        if (folder / "pytorch_lora_weights.safetensors").is_file():
            return "lora", None
    except (OSError, ValueError, AttributeError):
        return None
    return None


def beside_config(checkpoint: Path) -> Path | None:
    """An explicit diffusers config folder beside a single file: `<stem>/` or `config/`, else None."""
    for folder in (checkpoint.with_suffix(""), checkpoint.parent / "config"):
        if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
            return folder
    return None


def safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a .safetensors header (kohya's `ss_*` training notes), or {}."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                return {}
            header = json.loads(handle.read(length))
        metadata = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    except (OSError, ValueError, struct.error, AttributeError):
        return {}


def embedding_details(path: Path) -> dict:
    """What A1111's /sdapi/v1/embeddings reports: step, checkpoint, vector width (`shape`) and count."""
    details = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
    try:
        if path.suffix == ".safetensors":
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(min(length, 2**20)))
            shapes = {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}
        elif path.stat().st_size <= SMALL_FILE_BYTES:
            loaded = load_weights_only(path)
            details.update({key: loaded.get(key) for key in ("step", "sd_checkpoint", "sd_checkpoint_name")
                            if isinstance(loaded.get(key), (int, str))})
            params = loaded.get("string_to_param", loaded)
            shapes = {str(name): list(t.shape) for name, t in params.items() if hasattr(t, "shape")}
        else:
            return details
    except (OSError, ValueError, struct.error, AttributeError, RequestError):
        return details
    if {"clip_l", "clip_g"} <= set(shapes):  # SDXL: one vector set per text encoder
        details.update(shape=shapes["clip_l"][-1] + shapes["clip_g"][-1], vectors=shapes["clip_l"][0])
    elif shapes:
        first = next(iter(shapes.values()))
        details.update(shape=first[-1], vectors=first[0] if len(first) > 1 else 1)
    return details


class ModelLibrary:
    """The models in an ordered list of models folders (plus the data dir's trained LoRAs). Earlier folders win a
    name; the later entry is still listed, `shadowed_by` the one used."""

    def __init__(self, roots: list[Path], lora_dirs: tuple[Path, ...] = ()):
        self.roots = [Path(root) for root in roots]
        self.lora_dirs = tuple(Path(folder) for folder in lora_dirs)  # trained LoRAs: searched first
        self._listings: dict[tuple[Path, Kind], _Listing] = {}
        self._layouts: dict[Path, tuple[tuple, list[tuple]]] = {}
        self._identified: dict[tuple[Path, int, int], tuple[FileKind | None, str | None]] = {}
        self._lock = threading.RLock()
        self.scans = 0  # directories actually read (the cache's tests count them)

    # -- listing ----------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget every listing and identification: the next look reads the folders and headers again."""
        with self._lock:
            self._listings.clear()
            self._layouts.clear()
            self._identified.clear()

    def entries(self, kind: Kind | None = None) -> list[LibraryEntry]:
        """Every entry in precedence order (data-dir LoRAs, then each models folder in turn), clashes marked."""
        with self._lock:
            found: list[LibraryEntry] = []
            for kinds_folder in self._kind_folders():
                index, layout, root, each_kind, folder, flat_root = kinds_folder
                if kind is None or kind == each_kind:
                    found += self._walk(index, layout, root, each_kind, folder, folder, flat_root)
            return _mark_clashes(found)

    def kind_folder(self, kind: Kind, index: int = 0, create: bool = False) -> Path:
        """Where models of `kind` live in models folder `index` (created on demand: imports only)."""
        root = self.roots[index]
        layout = detect_layout(root) if root.is_dir() else "flat"
        relative = LAYOUTS[layout][kind][0]
        folder = _find_folder(root, relative) if relative else root
        folder = folder or root / relative
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _kind_folders(self):
        for folder in self.lora_dirs:
            if folder.is_dir():
                yield -1, "data", folder.parent, "lora", folder, False
        for index, root in enumerate(self.roots):
            yield from ((index, *found) for found in self._layout_of(root))

    def _layout_of(self, root: Path) -> list[tuple]:
        """(layout, root, kind, kind folder, is the flat root) of one models folder; told again only when the
        folders that decide it (the root, its models/, the folder above) change."""
        stamp = tuple(_mtime(folder) for folder in (root, root / "models", root.parent))
        cached = self._layouts.get(root)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        found = []
        if root.is_dir():
            layout = detect_layout(root)
            for kind, relatives in LAYOUTS[layout].items():
                for relative in relatives:
                    folder = _find_folder(root, relative) if relative else root
                    if folder is not None:
                        found.append((layout, root, kind, folder, relative == ""))
        self._layouts[root] = (stamp, found)
        return found

    def _walk(self, index: int, layout: str, root: Path, kind: Kind, base: Path, folder: Path,
              flat_root: bool) -> list[LibraryEntry]:
        try:
            mtime = folder.stat().st_mtime_ns
        except OSError:
            return []
        listing = self._listings.get((folder, kind))
        if listing is None or listing.mtime_ns != mtime:
            listing = self._list(index, layout, root, kind, base, folder, flat_root, mtime)
            self._listings[(folder, kind)] = listing
        entries = list(listing.entries)
        for sub in listing.subfolders:
            entries += self._walk(index, layout, root, kind, base, sub, flat_root)
        return entries

    def _list(self, index, layout, root, kind, base, folder, flat_root, mtime) -> _Listing:
        self.scans += 1
        entries, subfolders = [], []
        # The flat root holds checkpoints; its kind sub-folders are walked as their own kinds, not as checkpoints.
        skip = FLAT_KIND_FOLDERS if flat_root and folder == base else set()
        deep = len(folder.relative_to(base).parts) >= MAX_DEPTH
        try:
            children = sorted(os.scandir(folder), key=lambda child: child.name)
        except OSError:
            return _Listing(mtime, [], [])
        stems = {Path(child.name).stem for child in children
                 if Path(child.name).suffix.lower() in MODEL_SUFFIXES and not child.is_dir()}
        for child in children:
            if child.name.startswith(".") or child.name in skip:
                continue
            if child.name in stems and child.is_dir():  # `foo/` beside `foo.safetensors`: that file's configs
                continue
            path = Path(child.path)
            try:
                if child.is_dir():
                    model = folder_model(path)
                    if model is None:
                        if not deep:
                            subfolders.append(path)  # users organise models in sub-folders
                        continue
                    entries.append(self._folder_entry(index, layout, root, kind, base, path, model, flat_root))
                elif child.is_file() and path.suffix.lower() in SUFFIXES[kind]:
                    entries.append(self._file_entry(index, layout, root, kind, base, path, child.stat(), flat_root))
            except OSError as exc:  # a file vanishing mid-scan, a broken link: listed as unusable
                entries.append(LibraryEntry(kind, _name(base, path), path, index, _relative(root, path), layout, 0,
                                            reason=f"can't be read ({exc.strerror or type(exc).__name__})"))
        return _Listing(mtime, entries, subfolders)

    def _folder_entry(self, index, layout, root, kind, base, path, model, flat_root) -> LibraryEntry:
        found_kind, family = model
        reason = None
        if found_kind != kind and not (flat_root and found_kind == "controlnet"):
            reason = f"is a diffusers {found_kind} folder, not a {kind}: move it to the {found_kind} folder"
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in MODEL_SUFFIXES)
        entry_kind = found_kind if reason is None else kind
        return LibraryEntry(entry_kind, _name(base, path), path, index, _relative(root, path), layout, size, family,
                            reason=reason)

    def _file_entry(self, index, layout, root, kind, base, path, stat, flat_root) -> LibraryEntry:
        if kind == "upscaler":  # its architecture is spandrel's to detect, from the weights, when first used
            return LibraryEntry(kind, _name(base, path), path, index, _relative(root, path), layout, stat.st_size)
        file_kind, reason = self.identify(path, stat)
        entry_kind: Kind = kind
        family = file_kind.family if file_kind else None
        configs = beside_config(path)
        if reason is not None and configs is not None and (model := folder_model(configs)) is not None:
            (entry_kind, family), reason = model, None  # a file the header can't place, with explicit configs
        if file_kind is not None and reason is None and file_kind.kind != kind:
            if flat_root and file_kind.kind == "controlnet":  # the flat root has always held ControlNets too
                entry_kind = "controlnet"
            else:
                reason = misplaced_message(path, file_kind)
        details: dict = {}
        if reason is None and kind == "lora" and path.suffix == ".safetensors":
            details = {"metadata": safetensors_metadata(path)}
        elif reason is None and kind == "embedding":
            details = embedding_details(path)
        return LibraryEntry(entry_kind, _name(base, path), path, index, _relative(root, path), layout,
                            stat.st_size, family, file_kind, reason, details)

    def identify(self, path: Path, stat: os.stat_result | None = None) -> tuple[FileKind | None, str | None]:
        """(what the file is, None) or (None, why it can't be used); cached by path, size and mtime."""
        stat = stat or path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._identified:
                return self._identified[key]
        try:
            result: tuple[FileKind | None, str | None] = (identify_file(path), None)
        except RequestError as exc:
            result = (None, exc.message)
        except Exception as exc:  # the listing never fails on one odd file
            log.warning("can't identify %s: %s", path.name, exc)
            result = (None, f"can't be read ({type(exc).__name__})")
        with self._lock:
            self._identified[key] = result
        return result

    # -- finding by name --------------------------------------------------------------------------------------
    def find(self, kind: Kind, text: str) -> LibraryEntry | None:
        """The entry of `kind` called `text`: its name, its name with the suffix, or its file name alone when no
        other usable entry of that kind has it. Shadowed entries are never returned."""
        wanted = TITLE_HASH.sub("", text.strip()).replace("\\", "/")
        entries = [entry for entry in self.entries(kind) if entry.shadowed_by is None]
        for entry in entries:
            if wanted in (entry.name, entry.name + entry.path.suffix):
                return entry
        by_stem = [entry for entry in entries if wanted in (entry.stem, entry.stem + entry.path.suffix)]
        return by_stem[0] if len(by_stem) == 1 else None

    def names(self, kind: Kind) -> list[str]:
        return [entry.name for entry in self.entries(kind) if entry.shadowed_by is None]


def _mtime(folder: Path) -> int | None:
    try:
        return folder.stat().st_mtime_ns
    except OSError:
        return None


def _name(base: Path, path: Path) -> str:
    relative = path.relative_to(base).as_posix()
    return relative.removesuffix(path.suffix) if path.is_file() else relative


def _relative(root: Path, path: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _mark_clashes(entries: list[LibraryEntry]) -> list[LibraryEntry]:
    """The first entry of each (kind, name) is used; later ones are kept in the list, marked with the winner."""
    first: dict[tuple[str, str], LibraryEntry] = {}
    marked = []
    for entry in entries:
        winner = first.setdefault((entry.kind, entry.name), entry)
        if winner is not entry:
            where = "the data dir" if winner.folder < 0 else f"models folder {winner.folder}"
            entry = replace(entry, shadowed_by=f"{winner.relative} in {where}")
        marked.append(entry)
    return marked


# -- one library per configuration ----------------------------------------------------------------------------
_LIBRARIES: dict[tuple, ModelLibrary] = {}
_LIBRARIES_LOCK = threading.Lock()


def library_for(config: StudioConfig) -> ModelLibrary:
    """The (cached) library of this configuration's models folders: the same folders share one cache."""
    roots = tuple(Path(folder).expanduser().absolute() for folder in config.all_models_dirs())
    lora_dirs = (Path(config.data_dir).expanduser().absolute() / "loras",)
    with _LIBRARIES_LOCK:
        if (roots, lora_dirs) not in _LIBRARIES:
            _LIBRARIES[(roots, lora_dirs)] = ModelLibrary(list(roots), lora_dirs)
        return _LIBRARIES[(roots, lora_dirs)]


# -- importing ------------------------------------------------------------------------------------------------
class ModelConflict(RequestError):
    """The name is taken (or the model it names is loaded or in use): HTTP 409, not 422."""


IMPORT_NAME = re.compile(r"^[\w][\w.\- ]*(/[\w][\w.\- ]*)*$")


def check_model_start(prefix: bytes, file_name: str, field_name: str = "file") -> None:
    """Refuse an upload from its first bytes: a .safetensors file starts with its header's length (sane, then a
    JSON object); a .ckpt/.pt/.bin is a torch zip archive or a pickle. Needs at least 9 bytes (fewer: too short)."""
    suffix = Path(file_name).suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise RequestError(field_name, f"'{Path(file_name).name}' is not a model file: send a .safetensors (or a "
                                       "weights-only .ckpt/.pt/.pth/.bin)")
    if len(prefix) < 9:
        raise RequestError(field_name, f"'{Path(file_name).name}' is not a model file (empty or too short)")
    if suffix == ".safetensors":
        (length,) = struct.unpack("<Q", prefix[:8])
        if length < 2 or length > 100 * 2**20 or prefix[8:9] != b"{":
            raise RequestError(field_name, f"'{Path(file_name).name}' is not a safetensors file (no valid header)")
    elif not (prefix.startswith(b"PK\x03\x04") or prefix[:1] == b"\x80"):
        raise RequestError(field_name, f"'{Path(file_name).name}' is not a torch weights file (neither a zip archive "
                                       "nor a pickle)")


def import_model(config: StudioConfig, source: Path, *, file_name: str | None = None, name: str | None = None,
                 kind: str | None = None, replace_existing: bool = False, move: bool = False,
                 busy: Callable[[Path], str | None] = lambda path: None, field_name: str = "file") -> LibraryEntry:
    """Identify `source` from its header, then put it in the studio's own models folder (its kind folder), under
    `name` (default: the file's stem). Atomic: written to a temporary name in the target folder, then renamed.
    `move`: the source is ours to take (an upload's temporary file); else it is hard-linked when on the same disk
    (the source folder is not written), copied otherwise. `busy(path)` says why an
    existing file must not be replaced ("loaded", "in use by a running job"), or None. Returns the new entry."""
    source = Path(source)
    file_name = file_name or source.name
    suffix = source.suffix.lower()
    with source.open("rb") as handle:
        check_model_start(handle.read(16), file_name, field_name)
    try:
        found = identify_file(source)
    except RequestError as exc:  # A1's message, about the name the user knows
        raise RequestError(field_name, exc.message.replace(source.name, Path(file_name).name)) from None
    if kind is not None and kind not in KINDS:
        raise RequestError("kind", f"'{kind}' is not a kind; kinds: {', '.join(KINDS)}")
    if kind is not None and found.kind != kind:
        raise RequestError("kind", f"the file is {found.describe()}, not a {kind}: import it as kind "
                                   f"'{found.kind}' (or leave kind out)")
    name = (name or Path(file_name).stem).strip().replace("\\", "/")
    if not IMPORT_NAME.match(name) or ".." in name.split("/"):
        raise RequestError("name", f"'{name}' is not a usable name: letters, digits, '_', '-', '.', spaces, and '/' "
                                   "for a sub-folder")
    library = library_for(config)
    folder = library.kind_folder(found.kind, 0, create=False)
    target = folder / f"{name}{suffix}"
    existing = library.find(found.kind, name)
    existing = existing if existing is not None and existing.name == name else None
    # Ours to replace: the entry of that name in the studio's own folder, and the target file.
    previous = [path for path in ([existing.path] if existing is not None and existing.folder == 0 else [])
                + ([target] if target.exists() else [])]
    if (existing is not None or target.exists()) and not replace_existing:
        where = f" ({existing.relative})" if existing is not None else ""
        raise ModelConflict("name", f"a {found.kind} called '{name}' exists{where}; send replace=true to replace it")
    if existing is not None and existing.folder < 0:
        raise ModelConflict("name", f"'{name}' is a LoRA trained here ({existing.relative} in the data dir), which is "
                                    "found before any models folder: import it under another name")
    for path in {*previous, *([existing.path] if existing is not None else [])}:  # shadowing a loaded one too
        reason = busy(path)
        if reason:
            raise ModelConflict("name", f"'{name}' is {reason}: it is not replaced under it; unload it (or wait for "
                                        "the job) and import again")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".import-{secrets.token_hex(6)}{suffix}.part"
    try:
        if move and _same_device(source, target.parent):
            os.replace(source, temporary)
        elif _same_device(source, target.parent) and _linked(source, temporary):
            pass  # a file on the same disk: a second name for it, instant and no second copy of GBs
        else:
            with source.open("rb") as reader, temporary.open("wb") as writer:
                shutil.copyfileobj(reader, writer, 16 * 2**20)
                writer.flush()
                os.fsync(writer.fileno())
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    for path in previous:  # the same name with another suffix: replaced, so it goes
        if path != target and path.is_file():
            path.unlink()
    library.refresh()
    entry = library.find(found.kind, name)
    if entry is None or entry.path != target:  # cannot happen unless the folder changed under us
        raise RequestError("name", f"'{name}' was imported but another model of that name is listed first")
    return entry


def _linked(source: Path, link: Path) -> bool:
    try:
        os.link(source, link)
        return True
    except OSError:  # a file system without hard links: copied instead
        return False


def _same_device(path: Path, folder: Path) -> bool:
    try:
        return os.stat(path).st_dev == os.stat(folder).st_dev
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
