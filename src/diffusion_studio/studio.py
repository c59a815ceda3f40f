"""The one place where the studio's services are built from config and wired together.

UI tabs, the API and the CLI receive a `Studio` and call its methods; none of them builds an engine itself.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from .config import StudioConfig
from .engine.metadata import image_request, save_png
from .engine.runner import CancelFlag, Engine, StepCallback
from .engine.sources import list_models, resolve
from .requests import GenerationRequest, GenerationResult
from .service.jobs import JobService
from .service.limits import UserLimits
from .service.store import JobStore


class Studio:
    def __init__(self, config: StudioConfig):
        self.config = config
        self.engine = Engine(config)
        self.outputs_dir = Path(config.data_dir) / "outputs"
        self.store = JobStore(Path(config.data_dir) / "studio.db")
        self.jobs = JobService(self.store, self.engine.run, self.save, max_queue=config.max_queue,
                               workers=config.workers, validate=self.validate, identify=self.weights_identity,
                               cache_entries=config.cache_entries, time_limit_s=config.job_time_limit_s,
                               limits=UserLimits(config.rate_per_minute, config.rate_burst, config.max_active_jobs))

    def validate(self, data: dict) -> GenerationRequest:
        """Build a request against this studio's limits (raises pydantic.ValidationError naming each field)."""
        return GenerationRequest.model_validate(data, context={"limits": self.config.limits})

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 cancel: CancelFlag | None = None) -> GenerationResult:
        return self.engine.run(request, on_step=on_step, cancel=cancel)

    def save(self, result: GenerationResult, folder: Path | None = None) -> list[Path]:
        """Each image as a PNG carrying the parameters that reproduce it on its own."""
        folder = Path(folder or self.outputs_dir / datetime.now().strftime("%Y-%m-%d"))
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%H%M%S")
        paths = []
        for index, (image, seed) in enumerate(zip(result.images, result.seeds)):
            path = folder / f"{stamp}-{result.request.mode.value}-{seed}-{index}.png"
            paths.append(save_png(path, image, image_request(result.request, seed), seed, result.request.model))
        return paths

    def weights_identity(self, request: GenerationRequest) -> str:
        """Which weights a request runs on (base, and ControlNet in that mode): a part of its cache key."""
        parts = [resolve(request.model, self.config).identity]
        if request.mode.value == "controlnet":
            parts.append(resolve(self.engine.controlnet_name(request), self.config).identity)
        return "+".join(parts)

    def image_paths(self, image_ids: list[str]) -> list[Path]:
        return [Path(self.store.image(image_id)["path"]) for image_id in image_ids]

    def models(self) -> list[dict]:
        return list_models(self.config)

    def base_model_names(self) -> list[str]:
        names = [row["name"] for row in self.models() if row["role"] == "base"]
        return names if self.config.default_model in names else [self.config.default_model, *names]
