"""The engine's heaviest libraries (diffusers, transformers, compel: seconds to import), imported once and by one
thread at a time. At the bottom of the layers so that the built-ins' catalog and the engine can both call it."""

from __future__ import annotations

import sys
import threading
from types import ModuleType

_imported = threading.Lock()


def import_libraries() -> None:
    """Import what a first model load and prompt encoding use: diffusers' SD pipelines (with transformers' CLIP)
    and compel. Blocking, seconds: the server runs it in a background thread once it answers, so that neither its
    start nor its first job waits for them. Every first use calls it too, under one lock: transformers' lazy
    module is not safe to import from two threads at once (a job beside the background import failed with
    "cannot import name 'AutoModel'")."""
    with _imported:
        import compel  # noqa: F401
        import diffusers

        diffusers.StableDiffusionPipeline  # noqa: B018 (a lazy attribute: reading it imports the pipeline's modules)


def loaded(name: str) -> ModuleType | None:
    """A module if it is imported and done importing, else None, importing nothing: for code that only needs it
    once something else has loaded it (is this a torch error? how much CUDA memory is held?). A module still being
    imported, by the background import, is in sys.modules half made: that counts as not loaded."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return None if module is None or getattr(spec, "_initializing", False) else module
