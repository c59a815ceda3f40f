"""The studio from Python (notebooks, scripts), in the shape users of this kind of demo expect.

    demo = DiffusionDemo(DemoConfig())
    await demo.load_pipeline("stable_diffusion")
    image, status = await demo.generate_image("a red circle on a white background", seed=42)

Thin: every call builds a GenerationRequest and goes through the same job service as the UI and the API, so it
queues, is recorded in the history, and reproduces from its seed like every other client.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict

from .config import StudioConfig
from .requests import default_of
from .studio import Studio

GUIDANCE = default_of("guidance")

PIPELINES = {
    "stable_diffusion": "txt2img",
    "stable_diffusion_xl": "sdxl",
    "img2img": "img2img",
    "inpaint": "inpaint",
    "controlnet": "controlnet",
}


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "builtin:shapes"
    xl_model: str = "builtin:shapes-xl"
    controlnet: str | None = None  # None: the base's built-in ControlNet for the control type
    data_dir: Path = Path("data")
    device: str = "auto"
    dtype: str = "auto"
    user: str = "python"


class DiffusionDemo:
    def __init__(self, config: DemoConfig | None = None):
        self.config = config or DemoConfig()
        self.studio = Studio(StudioConfig(data_dir=self.config.data_dir, device=self.config.device,
                                          dtype=self.config.dtype))
        self.kind = "stable_diffusion"
        self._started_on: asyncio.AbstractEventLoop | None = None

    async def _service(self):
        loop = asyncio.get_running_loop()
        if self._started_on is not loop:  # the job service lives on the caller's event loop
            await self.studio.jobs.start()
            self._started_on = loop
        return self.studio.jobs

    @property
    def base_model(self) -> str:
        return self.config.xl_model if self.kind == "stable_diffusion_xl" else self.config.model

    async def load_pipeline(self, kind: str = "stable_diffusion") -> str:
        """Load the model behind `kind` (one of PIPELINES) now, so the first generation doesn't wait for it."""
        if kind not in PIPELINES:
            raise ValueError(f"kind: must be one of {', '.join(PIPELINES)} (got {kind!r})")
        self.kind = kind
        started = time.perf_counter()

        await asyncio.to_thread(self.studio.preload, self.base_model)
        return f"Loaded {self.base_model} for {kind} in {time.perf_counter() - started:.2f}s"

    async def _generate(self, **fields: Any) -> tuple[list[Image.Image], str]:
        mode = fields.pop("mode", PIPELINES["stable_diffusion_xl"] if self.kind == "stable_diffusion_xl"
                          else "txt2img")
        request = self.studio.validate({"mode": mode, "model": self.base_model,
                                        **{k: v for k, v in fields.items() if v is not None}})
        jobs = await self._service()
        started = time.perf_counter()
        async for event in jobs.follow(request, self.config.user):
            outcome = event.outcome
        elapsed = time.perf_counter() - started
        if not outcome.ok:
            reason = outcome.error.text() if outcome.error else outcome.status
            return [], f"{outcome.status.capitalize()} after {elapsed:.2f}s: {reason}"
        images = [Image.open(path) for path in self.studio.image_paths(outcome.result["image_ids"])]
        seeds = outcome.result["seeds"]
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}"
        return images, (f"Generated {len(images)} image{'s' * (len(images) > 1)} in {elapsed:.2f}s "
                        f"({seed_text}, {request.steps} steps, {request.model})")

    async def generate_image(self, prompt: str, negative_prompt: str = "", num_steps: int = 20,
                             guidance_scale: float = GUIDANCE, height: int | None = None, width: int | None = None,
                             seed: int | None = None) -> tuple[Image.Image | None, str]:
        images, status = await self._generate(prompt=prompt, negative_prompt=negative_prompt, steps=num_steps,
                                              guidance=guidance_scale, height=height, width=width, seed=seed)
        return (images[0] if images else None), status

    async def generate_batch(self, prompts: list[str], negative_prompts: list[str] | None = None,
                             num_steps: int = 20, guidance_scale: float = GUIDANCE, height: int | None = None,
                             width: int | None = None, seed: int | None = None) -> tuple[list[Image.Image], str]:
        """One job per prompt, submitted together (they queue and run like any other jobs)."""
        negatives = negative_prompts or [""] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompts: needs one per prompt ({len(prompts)}), got {len(negatives)}")
        started = time.perf_counter()
        results = await asyncio.gather(*[
            self._generate(prompt=prompt, negative_prompt=negative, steps=num_steps, guidance=guidance_scale,
                           height=height, width=width, seed=None if seed is None else seed + index)
            for index, (prompt, negative) in enumerate(zip(prompts, negatives))])
        images = [image for found, _ in results for image in found]
        failed = [status for found, status in results if not found]
        status = f"Generated {len(images)} of {len(prompts)} images in {time.perf_counter() - started:.2f}s"
        return images, status + (f"; {len(failed)} failed: {failed[0]}" if failed else "")

    async def img2img_generation(self, image: Image.Image, prompt: str, negative_prompt: str = "",
                                 num_steps: int = 20, guidance_scale: float = GUIDANCE, strength: float = 0.75,
                                 seed: int | None = None) -> tuple[Image.Image | None, str]:
        images, status = await self._generate(mode="img2img", init_image=image, prompt=prompt,
                                              negative_prompt=negative_prompt, steps=num_steps,
                                              guidance=guidance_scale, strength=strength, seed=seed)
        return (images[0] if images else None), status

    async def inpaint_generation(self, image: Image.Image, mask: Image.Image, prompt: str, negative_prompt: str = "",
                                 num_steps: int = 20, guidance_scale: float = GUIDANCE, strength: float = 1.0,
                                 seed: int | None = None) -> tuple[Image.Image | None, str]:
        images, status = await self._generate(mode="inpaint", init_image=image, mask_image=mask, prompt=prompt,
                                              negative_prompt=negative_prompt, steps=num_steps,
                                              guidance=guidance_scale, strength=strength, seed=seed)
        return (images[0] if images else None), status

    async def controlnet_generation(self, control_image: Image.Image, prompt: str, negative_prompt: str = "",
                                    num_steps: int = 20, guidance_scale: float = GUIDANCE, control_type: str = "canny",
                                    control_scale: float = 1.0, seed: int | None = None
                                    ) -> tuple[Image.Image | None, str]:
        images, status = await self._generate(mode="controlnet", control_image=control_image, prompt=prompt,
                                              negative_prompt=negative_prompt, steps=num_steps,
                                              guidance=guidance_scale, control_type=control_type,
                                              control_scale=control_scale, controlnet=self.config.controlnet,
                                              seed=seed)
        return (images[0] if images else None), status

    def create_control_image(self, image: Image.Image, control_type: str = "canny") -> Image.Image:
        return self.studio.control_preview({"mode": "controlnet", "control_image": image,
                                            "control_type": control_type})

    @property
    def generation_history(self) -> list[dict[str, Any]]:
        """This demo user's jobs, newest first: prompt, parameters, status, seeds and image paths."""
        return [{"id": job.id, "status": job.status.value, "prompt": job.request.get("prompt"),
                 "mode": job.request.get("mode"), "seeds": job.result.get("seeds", []),
                 "images": [str(p) for p in self.studio.image_paths(job.result.get("image_ids", []))],
                 "created_at": job.created_at, "error": job.error.text() if job.error else None}
                for job in self.studio.history(self.config.user)]
