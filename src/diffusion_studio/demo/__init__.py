"""The studio from Python (notebooks, scripts), as the seed demo's users call it:

    demo = DiffusionDemo(DemoConfig())
    await demo.load_pipeline("stable_diffusion")
    image, status = await demo.generate_image("a red circle on a white background", seed=42)

Thin: every call builds a GenerationRequest and goes through the same job service as the UI and the API, so it
queues, is recorded in the history, and reproduces from its seed like every other client. DemoConfig's settings
each act on the studio underneath (config.py); one that can't act on this machine warns (NoEffectWarning).
"""

from .api import PIPELINES, DiffusionDemo
from .comparison import ParameterComparison
from .config import DemoConfig, NoEffectWarning

__all__ = ["PIPELINES", "DemoConfig", "DiffusionDemo", "NoEffectWarning", "ParameterComparison"]
