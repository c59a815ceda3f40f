"""Engine.run(request, on_step, cancel) -> GenerationResult: one function for every mode.

Knows nothing about Gradio or HTTP. Safe to call from several threads: each run gets its own pipeline view and
scheduler over the shared modules; LoRA changes are serialised by the base's AdapterGate.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Protocol

from PIL import Image, ImageDraw

from ..builtin.catalog import builtin_controlnet_for, ensure_standins, is_trained
from ..config import StudioConfig
from ..requests import (
    GenerationRequest,
    GenerationResult,
    Mode,
    RequestError,
    StepEvent,
    Timings,
)
from .control import estimator_folder, inpaint_condition, make_control_image
from .embeddings import available_embeddings, embedding_file, named_in
from .inpaint_area import InpaintPlan, paste_outside_mask, plan_inpaint, prepare_mask  # noqa: F401 (re-exported)
from .loras import check_lora_file
from .memory import MemorySampler, check_fits
from .performance import decode_tiled, step_caching
from .pipelines import LoadedModel, PipelineManager, estimator_source
from .preview import latents_to_image, latents_to_preview, preview_decoder, preview_map
from .prompts import SYNTAX, PromptEncoder, needs_encoding
from .sources import ANY_NAME, ModelSource, NamePolicy, resolve, resolve_lora, resolve_vae
from .upscale import is_latent, resize_latents, resolve_upscaler, upscale_image

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


StepCallback = Callable[[StepEvent], None]


@dataclass(frozen=True)
class WorkItem:
    """One request of a batch with its own step callback and cancel flag (the job service's unit of work)."""

    request: GenerationRequest
    on_step: StepCallback | None = None
    cancel: CancelFlag = field(default_factory=threading.Event)


def is_inpainting_model(base: LoadedModel) -> bool:
    """A 9-channel UNet (SD 1.5 / SDXL inpainting checkpoints): it also sees the mask and the masked image."""
    return base.pipeline.unet.config.in_channels == 9


def whole_image_inpaint(request: GenerationRequest, inputs: dict, width: int, height: int) -> dict:
    """txt2img, img2img and ControlNet on an inpainting model, as A1111 runs them: the inpainting pipeline with the
    whole image masked. txt2img starts from a mid-gray image at strength 1 (A1111's 0.5 "masked image"); img2img
    from its own image at its strength; a ControlNet keeps its control map."""
    size = (width, height)
    if request.mode == Mode.img2img:
        image, strength = inputs["image"], request.strength
    else:
        image, strength = Image.new("RGB", size, (127, 127, 127)), 1.0
    control = {"control_image": inputs["image"]} if request.mode == Mode.controlnet else {}
    kept = {k: v for k, v in inputs.items() if k.startswith("control")}
    return {**kept, **control, "image": image, "mask_image": Image.new("L", size, 255), "strength": strength,
            "width": width, "height": height}


def apply_safety_notices(images: list[Image.Image], flags: list[bool] | None) -> tuple[list[Image.Image], list[int]]:
    """Where the model's safety checker flagged an image, show a notice saying so (never a silent black image)."""
    blocked = [index for index, flag in enumerate(flags or []) if flag]
    for index in blocked:
        notice = Image.new("RGB", images[index].size, (40, 40, 48))
        ImageDraw.Draw(notice).text((4, 4), "blocked by the\nmodel's safety\nchecker", fill=(240, 240, 240))
        images[index] = notice
    return images, blocked


def decode_latents(vae, image_processor, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (in the diffusion's scale) decoded by `vae` to PIL images, as the pipelines' own decode does."""
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return image_processor.postprocess(pixels, output_type="pil")


def second_pass_steps(hires, steps: int) -> int:
    """How many steps hires fix's img2img pass runs (diffusers skips the first steps by its strength)."""
    total = hires.steps or steps
    return total - int(max(total - total * hires.denoising_strength, 0))


class Engine:
    def __init__(self, config: StudioConfig):
        self.config = config
        # The built-ins' untrained stand-ins are built here, once per data dir, so resolving a name never writes.
        ensure_standins(config.data_dir)
        self.manager = PipelineManager(config)

    @property
    def device(self) -> torch.device:
        return self.manager.device

    def control_preview(self, request: GenerationRequest) -> Image.Image:
        """The control image a controlnet request will use, for showing before generating."""
        if request.control_image is None:
            raise RequestError("control_image", "is required to preview a control map")
        if not request.control_preprocess:
            return request.control_image
        kind = request.control_type
        if kind in ("depth", "pose"):  # a loaded model like the others, held through the PipelineManager
            folder = estimator_folder(kind, getattr(self.config, f"{kind}_estimator"))
            with self.manager.use_estimator(kind, folder) as estimator:
                return make_control_image(request.control_image, kind, estimator=estimator)
        return make_control_image(request.control_image, request.control_type, request.canny_low,
                                  request.canny_high)

    def weights_identity(self, request: GenerationRequest) -> str:
        """Which weights a request runs on (the base, the ControlNet it runs with, and the depth/pose estimator
        that makes its control map): a part of its cache key. A loaded model's identity is the one recorded when
        it was loaded; others are computed from their files (a walk of the folder: call off the event loop)."""
        base = resolve(request.model, self.config)
        parts = [self.manager.identity(base)]
        for lora in request.loras:  # a changed LoRA file is other weights; an unknown name fails here, at submit
            path = resolve_lora(lora.name, self.config)
            check_lora_file(lora.name, path)
            parts.append(ModelSource(f"lora:{lora.name}", "single_file", str(path), "base", None).compute_identity())
        vae = self.vae_source(request, base)
        if vae is not None:
            parts.append(self.manager.identity(vae))
        upscaler = resolve_upscaler(request.hires.upscaler, self.config) if request.hires else None
        if upscaler is not None:  # hires fix through an upscaler model: its file is weights of the result too
            parts.append(ModelSource(f"upscaler:{upscaler.name}", "single_file", str(upscaler), "base",
                                     None).compute_identity())
        controlnet = self.controlnet_name(request, base)
        if controlnet:
            parts.append(self.manager.identity(controlnet))
        kind = request.control_type
        folder = getattr(self.config, f"{kind}_estimator", None)
        if request.mode == Mode.controlnet and request.control_preprocess and kind in ("depth", "pose") and folder:
            parts.append(self.manager.identity(estimator_source(kind, folder)))
        return "+".join(parts)

    def check(self, request: GenerationRequest, policy: NamePolicy = ANY_NAME) -> None:
        """What can be refused before a request is queued, from names and file headers only: its model, its
        ControlNet, its LoRAs (an unknown name lists those that exist; a LyCORIS LoHa/LoKr file is named as such),
        its VAE and its hires upscaler. `policy`: which names the caller may use (a path or hub id only if it says
        so); the run itself resolves the same names, which this check has let through."""
        resolve(request.model, self.config, policy=policy)
        if request.controlnet and request.mode in (Mode.controlnet, Mode.inpaint):  # the modes that use one
            resolve(request.controlnet, self.config, "controlnet", policy)
        for lora in request.loras:
            check_lora_file(lora.name, resolve_lora(lora.name, self.config, policy))
        if request.vae:
            resolve_vae(request.vae, self.config, policy)
        if request.hires is not None:
            resolve_upscaler(request.hires.upscaler, self.config)

    def vae_source(self, request: GenerationRequest, base: ModelSource | None = None) -> ModelSource | None:
        """The VAE a request decodes with: its own `vae`, else its configured model's (`models.<name>.vae`), else
        None (the base's own)."""
        name = request.vae
        if name is None and request.model in self.config.models:
            name = getattr(self.config.models[request.model], "vae", None)
        if name is None:
            return None
        path = resolve_vae(name, self.config)
        return ModelSource(f"vae:{path}", "folder" if path.is_dir() else "single_file", str(path), "vae",
                           base.family if base else None)

    def run(self, request: GenerationRequest, on_step: StepCallback | None = None,
            cancel: CancelFlag | None = None) -> GenerationResult:
        return self.run_batch([WorkItem(request, on_step, cancel or threading.Event())])[0]

    def run_batch(self, items: list[WorkItem]) -> list[GenerationResult]:
        """Several requests with one `batch_key()` as one pipeline call: each keeps its prompts, seeds, step events
        and cancel flag, and gets the bits it would get alone (see invariance.py). The call stops early only when
        every request in it is cancelled; a request cancelled alone is reported cancelled at the end."""
        started = time.perf_counter()
        requests = [item.request for item in items]
        on_steps = [item.on_step for item in items]
        cancels = [item.cancel for item in items]
        request = requests[0]  # the shared parameters
        if len(requests) > 1 and (request.batch_key() is None or
                                  any(other.batch_key() != request.batch_key() for other in requests[1:])):
            raise RequestError("mode", "only txt2img requests with equal parameters can share a batch")
        source = resolve(request.model, self.config)  # once per run: the manager and the ControlNet choice share it
        with self.manager.use(source, "base") as (base, load_s):
            # 1. Find the ControlNet (the pipeline class follows the base's family and the mode: PipelineManager).
            controlnet_name = self.controlnet_name(request, source)
            if controlnet_name:
                with self.manager.use(controlnet_name, "controlnet") as (control_model, control_load_s):
                    if control_model.family != base.family:
                        raise RequestError("controlnet", f"'{controlnet_name}' is for {control_model.family.upper()}"
                                                         f" bases; '{request.model}' is {base.family.upper()}")
                    return self._run_on(base, control_model, requests, on_steps, cancels, started,
                                        load_s + control_load_s)
            return self._run_on(base, None, requests, on_steps, cancels, started, load_s)

    def controlnet_name(self, request: GenerationRequest, base: ModelSource | None = None) -> str | None:
        """The ControlNet a request runs with. controlnet mode: its own, or the base's built-in for the control
        type (an error when there is none). inpaint mode: its own (an inpainting ControlNet), or the base's trained
        built-in inpainting ControlNet when it has one, else none (plain latent-blending inpainting). Other modes:
        none. `base`: the request's model already resolved, if the caller has it."""
        if request.mode not in (Mode.controlnet, Mode.inpaint):
            return None
        if request.controlnet:
            return request.controlnet
        inpainting = request.mode == Mode.inpaint
        base = base or resolve(request.model, self.config)
        if base.kind == "builtin":
            name = builtin_controlnet_for(base.name.removeprefix("builtin:"), "inpaint" if inpainting
                                          else request.control_type)
            # An untrained stand-in would steer inpainting with noise; only a trained one is used unasked.
            if name and (is_trained(name) or not inpainting):
                return f"builtin:{name}"
        if inpainting:
            return None
        raise RequestError("controlnet", f"no default {request.control_type} ControlNet for '{request.model}'; "
                                         "name one in controlnet")

    def _run_on(self, base: LoadedModel, control_model: LoadedModel | None, requests: list[GenerationRequest],
                on_steps: list[StepCallback | None], cancels: list[CancelFlag], started: float,
                load_s: float) -> list[GenerationResult]:
        request = requests[0]
        # 1b. Requests whose prompts this engine encodes (A1111 syntax, long prompts, clip skip, embeddings) run
        # alone: their embeddings may be longer than 77 tokens, and a lone run is what each of them is owed.
        if len(requests) > 1 and any(self._encodes_itself(base, each) for each in requests):
            return self._run_apart(base, control_model, requests, on_steps, cancels, started, load_s)
        with self._vae(request, base) as vae:
            return self._run_with(base, control_model, vae, requests, on_steps, cancels, started, load_s)

    def _run_apart(self, base, control_model, requests, on_steps, cancels, started, load_s):
        """Plain-prompt requests as one call, each other request alone; results in the requests' order."""
        alone = [i for i, each in enumerate(requests) if self._encodes_itself(base, each)]
        groups = [[i for i in range(len(requests)) if i not in alone]] + [[i] for i in alone]
        results: list[GenerationResult | None] = [None] * len(requests)
        for group in filter(None, groups):
            outputs = self._run_on(base, control_model, [requests[i] for i in group], [on_steps[i] for i in group],
                                   [cancels[i] for i in group], started, load_s)
            for index, output in zip(group, outputs):
                results[index] = output
        return results

    def _encodes_itself(self, base: LoadedModel, request: GenerationRequest) -> bool:
        """A first look, from the text alone (embeddings not yet loaded): could this request's prompts need more
        than the pipeline's own encoding?"""
        texts = [request.prompt, request.negative_prompt]
        return request.clip_skip > 1 or any(SYNTAX.search(text) for text in texts) or any(
            needs_encoding(text, base.pipeline.tokenizer) for text in texts) or bool(self._embeddings_in(texts))

    def _embeddings_in(self, texts: list[str]) -> tuple[tuple[str, str], ...]:
        if not any(texts):
            return ()
        found = available_embeddings(self.config)
        return tuple((name, str(embedding_file(name, found, self.config))) for name in named_in(texts, found))

    @contextmanager
    def _vae(self, request: GenerationRequest, base: LoadedModel):
        """The request's own VAE, held in the manager's LRU while the run decodes with it; None: the base's."""
        source = self.vae_source(request, base.source)
        if source is None:
            with nullcontext(None) as vae:
                yield vae
            return
        with self.manager.use_vae(source) as vae:
            yield vae

    def _run_with(self, base: LoadedModel, control_model: LoadedModel | None, vae,
                  requests: list[GenerationRequest], on_steps: list[StepCallback | None], cancels: list[CancelFlag],
                  started: float, load_s: float) -> list[GenerationResult]:
        import torch
        request = requests[0]
        # 2. Resolve size and seeds; one CPU generator per image, so each image reproduces on its own.
        width, height = self._size(base, request)
        seeds = [self._seeds(each) for each in requests]
        generators = [torch.Generator("cpu").manual_seed(seed) for batch in seeds for seed in batch]
        rows, first = [], 0  # each request's slice of the batch
        for each in requests:
            rows.append(slice(first, first + each.batch_size))
            first += each.batch_size

        # 3. Inpainting's plan (outpainting's canvas, the "only masked" crop, the fill); refuse what would not fit
        # in memory; mode inputs, at the output size.
        plan = None
        if request.mode == Mode.inpaint:
            limits = self.config.limits
            plan = plan_inpaint(request, (width, height), (limits.max_width, limits.max_height),
                                self._latent_decoder(base, vae, seeds[0][0]), seeds[0][0])
            width, height = plan.size
        hires_size = self._hires_size(request, width, height)
        # Not for an fp16 VAE that must decode upcast (SDXL's): the pipeline's own decode upcasts it, ours would not.
        vae_in_use = vae if vae is not None else base.pipeline.vae
        tile_when_needed = self.config.performance.tile_when_needed and not (
            getattr(vae_in_use.config, "force_upcast", False) and next(vae_in_use.parameters()).dtype.itemsize < 4)
        tiled = check_fits(base.pipeline, self.device, width, height, len(generators), request.guidance,
                           tile_when_needed)
        hires_tiled = hires_size is not None and check_fits(base.pipeline, self.device, *hires_size,
                                                            len(generators), request.guidance, tile_when_needed)
        inputs, control_image = self._mode_inputs(request, width, height, control_model is not None, plan)
        pipeline_mode = request.mode
        if is_inpainting_model(base) and request.mode != Mode.inpaint:
            pipeline_mode, inputs = Mode.inpaint, whole_image_inpaint(request, inputs, width, height)

        # 4. A pipeline view with its own scheduler; LoRAs through the base's gate.
        pipe = self.manager.view(base, pipeline_mode, request.scheduler,
                                 control_model.controlnet if control_model else None, vae=vae)
        lora_paths = [resolve_lora(lora.name, self.config) for lora in request.loras]
        adapters = tuple((self._adapter_name(lora.name, path), str(path), lora.weight, lora.text_encoder_weight)
                         for lora, path in zip(request.loras, lora_paths))

        # 5. The step callback: timing, memory, cancel, previews (each request sees its own images).
        timings = Timings(load_s=load_s)
        memory = MemorySampler(self.device)
        interval = self.config.preview_interval
        previewer = self._previewer(base) if interval else None
        loop_started = [time.perf_counter()]
        # Hires fix's two passes count as one run of steps: the first pass's total includes the second's.
        phase = {"offset": 0, "extra": second_pass_steps(request.hires, request.steps) if hires_size else 0}

        def step_end(pipeline, step_index, timestep, callback_kwargs):
            now = time.perf_counter()
            timings.step_s.append(now - loop_started[0])
            loop_started[0] = now
            memory.sample()
            total = phase["offset"] + pipeline.num_timesteps + phase["extra"]
            done = phase["offset"] + step_index + 1
            mean_step = sum(timings.step_s) / len(timings.step_s)
            for on_step, own in zip(on_steps, rows):
                if on_step is None:
                    continue
                preview = None
                if interval and (done % interval == 0 or done == total):
                    preview = previewer(callback_kwargs["latents"][own])
                on_step(StepEvent(done, total, now - started, mean_step * (total - done), preview))
            if all(cancel.is_set() for cancel in cancels):
                pipeline._interrupt = True  # remaining steps are skipped; diffusers still decodes
            return callback_kwargs

        # 6. Run.
        prompts = [each.prompt for each in requests for _ in range(each.batch_size)]
        negatives = [each.negative_prompt for each in requests for _ in range(each.batch_size)]
        embeddings = self._embeddings_in(prompts + negatives)
        with base.adapters.use(adapters, embeddings, request.model), torch.inference_mode():
            # Plain prompts: the pipeline encodes the strings, exactly as it always has. Others: prompts.py.
            convert = pipe.maybe_convert_prompt
            if request.clip_skip > 1 or any(needs_encoding(text, pipe.tokenizer, convert)
                                            for text in prompts + negatives):
                text = PromptEncoder(pipe, request.clip_skip).encode(prompts, negatives, request.guidance > 1)
            else:
                text = {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}
            loop_started[0] = time.perf_counter()
            # Hires fix with a latent upscaler: the first pass stays latents (they are resized, not decoded).
            latent_first = hires_size is not None and is_latent(request.hires.upscaler) and \
                not is_inpainting_model(base)
            with step_caching(pipe.unet, request.step_cache):
                output = pipe(
                    **text,
                    num_inference_steps=request.steps, guidance_scale=request.guidance, generator=generators,
                    output_type="latent" if latent_first or tiled else "pil", callback_on_step_end=step_end,
                    callback_on_step_end_tensor_inputs=["latents"], **inputs,
                )
            if tiled and not latent_first:
                output = self._decoded(pipe, output.images, tiled=True)
            if hires_size is not None:
                phase.update(offset=pipe.num_timesteps, extra=0)
                if all(cancel.is_set() for cancel in cancels):  # no second pass: what the first made
                    output = output if not latent_first else self._decoded(pipe, output.images, tiled=tiled)
                else:
                    output = self._hires_pass(base, vae, request, text, output.images, hires_size,
                                              [seed for batch in seeds for seed in batch], step_end, hires_tiled)
        images, blocked = apply_safety_notices(list(output.images), getattr(output, "nsfw_content_detected", None))

        # 7. Inpainting keeps the unmasked pixels exactly (and an "only masked" crop goes back into its picture).
        if plan is not None:
            images = [plan.finish(image) for image in images]

        # 8. One result per request.
        timings.total_s = time.perf_counter() - started
        peak = memory.result()
        return [GenerationResult(
            request=each, images=images[own], seeds=own_seeds, model_id=base.identity,
            timings=Timings(timings.load_s, list(timings.step_s), timings.total_s), peak_memory_bytes=peak,
            device=str(self.device), cancelled=cancel.is_set(), control_image=control_image,
            blocked=[index - own.start for index in blocked if own.start <= index < own.stop],
            batched_with=len(requests),
        ) for each, own, own_seeds, cancel in zip(requests, rows, seeds, cancels)]

    def _previewer(self, base: LoadedModel):
        """latents -> preview image: the built-ins' tiny decoder where chosen (performance.preview_decoder) and
        made for this VAE, else the linear map; each found once per loaded model."""
        if self.config.performance.preview_decoder == "tiny":
            if "preview_decoder" not in base.extras:
                base.extras["preview_decoder"] = preview_decoder(base.pipeline.vae)
            if (decoder := base.extras["preview_decoder"]) is not None:
                return lambda latents: latents_to_image(latents, decoder)
        if "preview_map" not in base.extras:
            base.extras["preview_map"] = preview_map(base.pipeline.vae)
        return lambda latents: latents_to_preview(latents, base.extras["preview_map"])

    @staticmethod
    def _seeds(request: GenerationRequest) -> list[int]:
        first_seed = request.seed if request.seed is not None else secrets.randbelow(2**32 - request.batch_size)
        return [first_seed + i for i in range(request.batch_size)]

    def _size(self, base: LoadedModel, request: GenerationRequest) -> tuple[int, int]:
        native = base.pipeline.unet.config.sample_size * base.pipeline.vae_scale_factor
        return request.width or native, request.height or native

    def _mode_inputs(self, request: GenerationRequest, width: int, height: int, controlled: bool,
                     plan: InpaintPlan | None):
        """Pipeline keyword arguments for the mode, plus the control image (for the result)."""
        size = (width, height)
        if request.mode == Mode.txt2img:
            return {"width": width, "height": height}, None
        if request.mode == Mode.img2img:
            return {"image": request.init_image.resize(size, Image.LANCZOS), "strength": request.strength}, None
        control = {"controlnet_conditioning_scale": request.control_scale,
                   "control_guidance_start": request.control_start, "control_guidance_end": request.control_end}
        if request.mode == Mode.inpaint:
            inputs = {"image": plan.image, "mask_image": plan.mask, "strength": request.strength, "width": width,
                      "height": height}
            if controlled:  # an inpainting ControlNet sees the image with its hole marked
                inputs |= {"control_image": inpaint_condition(plan.image, plan.mask), **control}
            return inputs, None
        control_image = self.control_preview(request).resize(size, Image.BILINEAR)
        return {"image": control_image, **control, "width": width, "height": height}, control_image

    # -- hires fix ----------------------------------------------------------------------------------------------
    def _hires_size(self, request: GenerationRequest, width: int, height: int) -> tuple[int, int] | None:
        """Hires fix's final size (None: no hires fix); refused when it passes the configured maximum."""
        if request.hires is None:
            return None
        target = request.hires.target_size(width, height)
        limits = self.config.limits
        if target[0] > limits.max_width or target[1] > limits.max_height:
            raise RequestError("hires.scale", f"the final size {target[0]}x{target[1]} is more than the allowed "
                                              f"{limits.max_width}x{limits.max_height}; lower hires.scale")
        return target

    def _hires_pass(self, base: LoadedModel, vae, request: GenerationRequest, text: dict, first, size: tuple[int, int],
                    seeds: list[int], step_end, tiled: bool = False) -> object:
        """Hires fix's second pass: the first pass's latents (latent upscalers) or images (pixel upscalers and
        upscaler models) resized to `size`, then img2img over them at the hires strength, with the same prompts,
        LoRAs and seeds. A ControlNet steers only the first pass. On a 9-channel inpainting base the second pass is
        its inpainting pipeline with the whole image masked (a latent upscaler then resizes the decoded image)."""
        import torch
        hires = request.hires
        inpainting = is_inpainting_model(base)
        if isinstance(first, torch.Tensor):
            scale = base.pipeline.vae_scale_factor
            image = resize_latents(first, hires.upscaler, (size[0] // scale, size[1] // scale))
        else:
            name = "None" if is_latent(hires.upscaler) else hires.upscaler
            image = [upscale_image(each, name, size, self.config, self.device, "hires.upscaler") for each in first]
        extra = {"mask_image": Image.new("L", size, 255), "width": size[0], "height": size[1]} if inpainting else {}
        pipe = self.manager.view(base, Mode.inpaint if inpainting else Mode.img2img, request.scheduler, None, vae=vae)
        with step_caching(pipe.unet, request.step_cache):
            output = pipe(
                **text, image=image, strength=hires.denoising_strength,
                num_inference_steps=hires.steps or request.steps, guidance_scale=request.guidance,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                output_type="latent" if tiled else "pil", callback_on_step_end=step_end,
                callback_on_step_end_tensor_inputs=["latents"], **extra,
            )
        return self._decoded(pipe, output.images, tiled=True) if tiled else output

    @staticmethod
    def _decoded(pipe, latents: torch.Tensor, tiled: bool = False):
        """Latents decoded to images by the pipeline's VAE (a hires run cancelled after its first pass, or a decode
        too big for memory, then in tiles), through the model's safety checker as the pipeline's own decode."""
        import torch
        if not tiled:
            return SimpleNamespace(images=decode_latents(pipe.vae, pipe.image_processor, latents))
        vae = pipe.vae
        pixels = torch.cat([decode_tiled(vae, one.to(vae.device, vae.dtype) / vae.config.scaling_factor)
                            for one in latents.split(1)])  # one image at a time, as every decode here
        flags = None
        if getattr(pipe, "safety_checker", None) is not None:
            pixels, flags = pipe.run_safety_checker(pixels, vae.device, vae.dtype)
        return SimpleNamespace(images=pipe.image_processor.postprocess(pixels, output_type="pil"),
                               nsfw_content_detected=flags)

    def _latent_decoder(self, base: LoadedModel, vae, seed: int):
        """For inpaint_fill 'latent noise' / 'latent nothing': what noise or zero latents decode to, at a size."""
        import torch
        def decode(kind: str, size: tuple[int, int]) -> Image.Image:
            decoder = vae if vae is not None else base.pipeline.vae
            scale = base.pipeline.vae_scale_factor
            shape = (1, decoder.config.latent_channels, -(-size[1] // scale), -(-size[0] // scale))
            latents = torch.zeros(shape) if kind == "zeros" else \
                torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
            with torch.inference_mode():
                [image] = decode_latents(decoder, base.pipeline.image_processor, latents)
            return image.crop((0, 0, *size))
        return decode

    @staticmethod
    def _adapter_name(name: str, path: Path) -> str:
        """peft adapter names become module attribute names: no dots or slashes. The file's size and mtime are in
        it, so a LoRA file replaced on disk (an import with replace) loads anew instead of keeping the old weights."""
        stat = path.stat()
        stamp = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
        return "lora_" + "".join(ch if ch.isalnum() else "_" for ch in name)[-40:] + "_" + stamp
