"""diffusion-studio: an interactive studio for diffusion models (UI, API, job service, trainer) on diffusers.

The public API, imported on first use so that `import diffusion_studio` stays cheap (no torch, no gradio):
DemoConfig and DiffusionDemo (the Python API), GenerationRequest (the one request type), Studio and StudioConfig
(the services and their settings), and __version__ (the installed package's).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DemoConfig": "demo",
    "DiffusionDemo": "demo",
    "GenerationRequest": "requests",
    "Studio": "studio",
    "StudioConfig": "config",
}
__all__ = ["DemoConfig", "DiffusionDemo", "GenerationRequest", "Studio", "StudioConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("diffusion-studio")
        except PackageNotFoundError:  # a source tree on sys.path, not installed
            value = "0+unknown"
    elif name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once: later lookups don't come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
