"""The engine: generation on diffusers (runner.py's Engine), the models it loads, lists and identifies, and what it
reads from model files. Knows nothing of HTTP or Gradio.

Its heaviest libraries (diffusers, transformers, compel: seconds to import) are imported where they are first used,
not with the engine's modules, so that a server answers before it has them; `import_libraries` imports them ahead
of need.
"""

from __future__ import annotations

from ..libraries import import_libraries  # noqa: F401 (the engine's, kept beside it)
