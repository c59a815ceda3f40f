"""DiffusionDemo: the seed's methods, each a GenerationRequest through the studio's job service (queued, recorded
in the history, reproducible from its seed, like the UI's and the API's jobs)."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from PIL import Image
from pydantic import ValidationError

from ..engine.pipelines import pick_device
from ..requests import MAX_SEED, GenerationRequest, describe_validation_error
from ..service.compare import draw_grid
from ..service.outcomes import Outcome
from ..service.training import TrainingService
from ..studio import Studio
from .comparison import (
    PARAMETER_FIELDS,
    ParameterComparison,
    base_fields,
    cell_fields,
    label,
    parameter_field,
)
from .config import DemoConfig, studio_config
from .figures import SERIES, STEPS_KEY, training_figure, training_series
from .history import history_entry

PIPELINES = {  # the seed's pipeline types; the mode comes from the method, the model from the type
    "stable_diffusion": "default_model",
    "stable_diffusion_xl": "xl_model",
    "img2img": "default_model",
    "inpaint": "default_model",
    "controlnet": "default_model",
}
# request field -> the seed's parameter name, for messages
SEED_NAMES = {"steps": "num_steps", "guidance": "guidance_scale", "init_image": "image", "mask_image": "mask"}
# request field -> the DemoConfig field behind its limit, for messages
LIMITED_BY = {"prompt": "max_prompt_length", "negative_prompt": "max_prompt_length", "batch_size": "max_batch_size"}


class DiffusionDemo:
    def __init__(self, config: DemoConfig | None = None):
        self.config = config or DemoConfig()
        # NoEffectWarning here for each setting that does nothing on this device
        self.studio = Studio(studio_config(self.config, pick_device(self.config.device).type))
        self.pipeline_type = "stable_diffusion"
        self.model_name: str | None = None  # load_pipeline's model_name: the model until the next load_pipeline
        self._since = time.time()  # generation_history: this demo's jobs
        self._started_on: asyncio.AbstractEventLoop | None = None

    async def _service(self):
        loop = asyncio.get_running_loop()
        if self._started_on is not loop:  # the job service lives on the caller's event loop
            await self.studio.jobs.start()
            self._started_on = loop
        return self.studio.jobs

    @property
    def base_model(self) -> str:
        """The model the next generation runs on: load_pipeline's model_name, else the pipeline type's."""
        return self.model_name or getattr(self.config, PIPELINES[self.pipeline_type])

    async def load_pipeline(self, pipeline_type: str = "stable_diffusion", model_name: str | None = None) -> str:
        """Load the model behind `pipeline_type` (one of PIPELINES; `model_name` instead of the config's) now, so
        the first generation doesn't wait for it. The generate methods work without it, loading on first use."""
        if pipeline_type not in PIPELINES:
            raise ValueError(f"pipeline_type: must be one of {', '.join(PIPELINES)} (got {pipeline_type!r})")
        self.pipeline_type, self.model_name = pipeline_type, model_name
        started = time.perf_counter()
        await asyncio.to_thread(self.studio.preload, self.base_model)
        return f"Loaded {self.base_model} for {pipeline_type} in {time.perf_counter() - started:.2f}s"

    # -- requests ---------------------------------------------------------------------------------------------
    def _request(self, mode: str, given: dict[str, Any], advanced: dict[str, Any]) -> GenerationRequest:
        """The request for one call: the method's arguments, the advanced keywords, then the config's defaults
        for whatever neither gave."""
        if advanced and not self.config.enable_advanced_controls:
            raise ValueError(f"{next(iter(advanced))}: advanced controls are off "
                             "(DemoConfig.enable_advanced_controls=False): the seed's parameters only")
        if "mode" in advanced:
            raise ValueError("mode: each method has its own (generate_image: txt2img, img2img_generation: img2img, "
                             "inpaint_generation: inpaint, controlnet_generation: controlnet)")
        fields = {name: value for name, value in given.items() if value is not None}
        twice = sorted(fields.keys() & advanced.keys())
        if twice:
            raise ValueError(f"{twice[0]}: given twice (also as {SEED_NAMES.get(twice[0], twice[0])})")
        return self._validate({"mode": mode, **fields, **advanced})

    def _validate(self, fields: dict[str, Any]) -> GenerationRequest:
        config = self.config
        fields = {"model": self.base_model, **fields}
        for name, default in (("steps", config.default_steps), ("guidance", config.default_guidance_scale),
                              ("height", config.default_height), ("width", config.default_width)):
            if fields.get(name) is None and default is not None:
                fields[name] = default
        mode = getattr(fields.get("mode"), "value", fields.get("mode"))
        if mode == "controlnet" and fields.get("controlnet") is None:
            fields["controlnet"] = config.controlnet_model  # None: the base's built-in for the control type
        try:
            return self.studio.validate(fields)
        except ValidationError as exc:
            raise ValueError(_with_config_fields(describe_validation_error(exc))) from None

    async def _run(self, requests: list[GenerationRequest]) -> list[Outcome]:
        """Submit together (compatible ones share batches), each job's outcome in submission order."""
        jobs = await self._service()
        return await jobs.outcomes(requests, self.config.user)

    def _images(self, outcome: Outcome) -> list[Image.Image]:
        return [Image.open(path) for path in self.studio.image_paths(outcome.result.get("image_ids", []))]

    async def _generate(self, request: GenerationRequest) -> tuple[Image.Image | None, str]:
        started = time.perf_counter()
        [outcome] = await self._run([request])
        elapsed = time.perf_counter() - started
        if not outcome.ok:
            return None, _failed(outcome, elapsed)
        images = self._images(outcome)
        seeds = outcome.result["seeds"]
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}–{seeds[-1]}"
        return images[0], (f"Generated {len(images)} image{'s' * (len(images) > 1)} in {elapsed:.2f}s "
                           f"({seed_text}, {request.steps} steps, {request.model})")

    # -- the seed's methods -------------------------------------------------------------------------------------
    # Unset steps / guidance / size: the config's defaults. Any other GenerationRequest field may follow as a
    # keyword (scheduler, clip_skip, loras, hires, vae, model, ...) while enable_advanced_controls is on.

    async def generate_image(self, prompt: str, negative_prompt: str = "", num_steps: int | None = None,
                             guidance_scale: float | None = None, height: int | None = None,
                             width: int | None = None, seed: int | None = None,
                             **advanced: Any) -> tuple[Image.Image | None, str]:
        return await self._generate(self._request("txt2img", {
            "prompt": prompt, "negative_prompt": negative_prompt, "steps": num_steps, "guidance": guidance_scale,
            "height": height, "width": width, "seed": seed}, advanced))

    async def generate_batch(self, prompts: list[str], negative_prompts: list[str] | None = None,
                             num_steps: int | None = None, guidance_scale: float | None = None,
                             height: int | None = None, width: int | None = None, seed: int | None = None,
                             **advanced: Any) -> tuple[list[Image.Image], str]:
        """One job per prompt, submitted together (they share pipeline calls where they can); prompt i gets
        seed + i. At most DemoConfig.max_batch_size prompts."""
        if not prompts:
            raise ValueError("prompts: give at least one prompt")
        if len(prompts) > self.config.max_batch_size:
            raise ValueError(f"prompts: at most {self.config.max_batch_size} in one batch "
                             f"(DemoConfig.max_batch_size; got {len(prompts)})")
        negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompts: needs one per prompt ({len(prompts)}), got {len(negatives)}")
        requests = [self._request("txt2img", {
            "prompt": prompt, "negative_prompt": negative, "steps": num_steps, "guidance": guidance_scale,
            "height": height, "width": width, "seed": None if seed is None else seed + index}, advanced)
            for index, (prompt, negative) in enumerate(zip(prompts, negatives))]
        started = time.perf_counter()
        outcomes = await self._run(requests)
        images = [image for outcome in outcomes if outcome.ok for image in self._images(outcome)]
        failed = [outcome for outcome in outcomes if not outcome.ok]
        elapsed = time.perf_counter() - started
        status = f"Generated {len(images)} of {len(prompts)} images in {elapsed:.2f}s"
        return images, status + (f"; {len(failed)} failed: {_failed(failed[0], elapsed)}" if failed else "")

    async def img2img_generation(self, image: Image.Image, prompt: str, negative_prompt: str = "",
                                 strength: float = 0.8, num_steps: int | None = None,
                                 guidance_scale: float | None = None, seed: int | None = None,
                                 **advanced: Any) -> tuple[Image.Image | None, str]:
        return await self._generate(self._request("img2img", {
            "init_image": image, "prompt": prompt, "negative_prompt": negative_prompt, "strength": strength,
            "steps": num_steps, "guidance": guidance_scale, "seed": seed}, advanced))

    async def inpaint_generation(self, image: Image.Image, mask: Image.Image, prompt: str, negative_prompt: str = "",
                                 num_steps: int | None = None, guidance_scale: float | None = None,
                                 strength: float = 1.0, seed: int | None = None,
                                 **advanced: Any) -> tuple[Image.Image | None, str]:
        """`mask`: white = repaint, black = keep."""
        return await self._generate(self._request("inpaint", {
            "init_image": image, "mask_image": mask, "prompt": prompt, "negative_prompt": negative_prompt,
            "steps": num_steps, "guidance": guidance_scale, "strength": strength, "seed": seed}, advanced))

    async def controlnet_generation(self, control_image: Image.Image, prompt: str, negative_prompt: str = "",
                                    control_type: str = "canny", control_scale: float = 1.0,
                                    num_steps: int | None = None, guidance_scale: float | None = None,
                                    seed: int | None = None, **advanced: Any) -> tuple[Image.Image | None, str]:
        """`control_image`: a picture, made into the control map here (create_control_image shows that map);
        with control_preprocess=False it is the map already."""
        return await self._generate(self._request("controlnet", {
            "control_image": control_image, "prompt": prompt, "negative_prompt": negative_prompt,
            "control_type": control_type, "control_scale": control_scale, "steps": num_steps,
            "guidance": guidance_scale, "seed": seed}, advanced))

    def create_control_image(self, image: Image.Image, control_type: str = "canny") -> Image.Image:
        """The control map controlnet_generation makes of `image` (canny edges, depth or pose)."""
        return self.studio.control_preview({"mode": "controlnet", "control_image": image,
                                            "control_type": control_type})

    async def create_parameter_comparison(self, base_image: Image.Image | GenerationRequest | dict,
                                          parameter_name: str, values: list, prompt: str | None = None,
                                          **advanced: Any) -> ParameterComparison:
        """One real generation per value of `parameter_name` (the seed's names num_steps, guidance_scale,
        strength, control_scale, seed, height, width, or any request field or Compare axis such as scheduler or
        'prompt S/R'), all with one seed unless the seed is compared. What is compared: an image this studio made
        (its own request again), another image (image to image from it, with `prompt`), or a request.
        Returns the images in the order of `values`, with `.grid`: one labelled image (the Compare tab's)."""
        if advanced and not self.config.enable_advanced_controls:
            raise ValueError(f"{next(iter(advanced))}: advanced controls are off "
                             "(DemoConfig.enable_advanced_controls=False)")
        advanced = {PARAMETER_FIELDS.get(name, name): value for name, value in advanced.items()}  # num_steps too
        field = parameter_field(parameter_name)
        limit = self.studio.config.limits.max_images_per_request
        if len(values) > limit:
            raise ValueError(f"values: at most {limit} in one comparison (limits.max_images_per_request)")
        fields = {"mode": "txt2img", **base_fields(base_image, prompt), **advanced, "batch_size": 1}
        if fields.get("seed") is None and field != "seed":  # one seed for every cell, or it compares noise
            fields["seed"] = secrets.randbelow(MAX_SEED)
        requests = [self._validate(cell) for cell in cell_fields(fields, parameter_name, field, list(values))]
        started = time.perf_counter()
        outcomes = await self._run(requests)
        elapsed = time.perf_counter() - started
        failed = [outcome for outcome in outcomes if not outcome.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(outcomes)} comparison images failed: "
                               f"{_failed(failed[0], elapsed)}")
        images = [self._images(outcome)[0] for outcome in outcomes]
        labels = [label(parameter_name, field, value) for value in values]
        grid = draw_grid([[image.convert("RGB") for image in images]], labels, [""],
                         [[f"{outcome.result['timings']['total_s']:.2f}s" for outcome in outcomes]])
        seed = fields.get("seed")
        status = (f"Compared {len(images)} values of {parameter_name} in {elapsed:.2f}s"
                  + (f" (seed {seed})" if field != "seed" else ""))
        return ParameterComparison(images, grid, parameter_name, list(values), seed if field != "seed" else None,
                                   status)

    # -- history and training ---------------------------------------------------------------------------------
    @property
    def generation_history(self) -> list[dict[str, Any]]:
        """This demo's jobs, oldest first (as the seed appended them), each in the seed's shape: prompt,
        negative_prompt, parameters {steps, guidance_scale, height, width, seed}, generation_time (seconds it
        ran), timestamp (when it finished); and ours: id, status, mode, model, seeds, images (paths), error,
        created_at. Every session's jobs, kept across restarts: `demo.studio.history(config.user)`."""
        records = self.studio.history(self.config.user, since=self._since, limit=100_000)
        return [history_entry(record, self.studio.image_paths(record.result.get("image_ids", [])))
                for record in reversed(records)]

    @property
    def training(self) -> TrainingService:
        """The seed's training demo: the studio's LoRA trainer (`start(name, TrainConfig)`, `pause`, `resume`,
        `stop`, `current` run with its step events). Needs DemoConfig.enable_training_demo."""
        if not self.config.enable_training_demo:
            raise RuntimeError("enable_training_demo: the training demo is off (DemoConfig.enable_training_demo="
                               "False); turn it on to train or to read training_stats")
        return self.studio.training

    @property
    def training_stats(self) -> dict[str, list[float]]:
        """The current training run's figures in the seed's shape ({} before a run): steps, losses, grad_norms,
        learning_rates, stability_scores (each with its step in the list of the same index)."""
        run = self.training.current
        if run is None or not run.events:
            return {}
        series = training_series(run.events)
        stats: dict[str, list[float]] = {}
        for seed_key, _, _, _ in SERIES:
            steps, values = series[seed_key]
            stats[seed_key] = values
            stats.setdefault(STEPS_KEY, steps)
        return stats

    def create_training_visualization(self, training_stats: Any = None) -> Image.Image:
        """The 2x2 figure (training loss, gradient norm, learning rate, stability score) as a 1200x800 image.
        `training_stats`: a dict of lists (the seed's losses, grad_norms, learning_rates, stability_scores) or a
        list of per-step dicts (the studio's training events: step, loss, grad_norm, lr, stability); None: the
        current training run's (enable_training_demo)."""
        if training_stats is None:
            training_stats = self.training_stats
            if not training_stats:
                raise ValueError("training_stats: no training run has reported a step yet; give stats or start "
                                 "a run (demo.training.start)")
        return training_figure(training_series(training_stats))


def _failed(outcome: Outcome, elapsed: float) -> str:
    reason = outcome.error.text() if outcome.error else outcome.status
    return f"{outcome.status.capitalize()} after {elapsed:.2f}s: {reason}"


def _with_config_fields(text: str) -> str:
    """Name the DemoConfig field behind a limit in its message ('prompt: must be at most 500 characters
    (DemoConfig.max_prompt_length)')."""
    lines = []
    for line in text.split("; "):
        field = line.split(":", 1)[0]
        if field in LIMITED_BY and ("at most" in line or "between" in line):
            line += f" (DemoConfig.{LIMITED_BY[field]})"
        lines.append(line)
    return "; ".join(lines)
