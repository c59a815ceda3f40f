"""PipelineManager: loads bases, ControlNets and the depth/pose estimators on demand, keeps them within one LRU
budget, and gives each request its own pipeline view of the mode it needs, built over the base's shared modules
(never a second copy of weights). The pipeline class follows the base's family (SD or SDXL) and the mode.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import importlib.metadata
import inspect
import logging
import sys
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from safetensors import SafetensorError

from ..config import StudioConfig
from . import import_libraries
from ..requests import Mode, ModelLoadError, RequestError
from ..samplers import SAMPLERS
from .control import Estimator, EstimatorKind, load_estimator
from .embeddings import load_into as load_embedding
from .loras import check_lora_file
from .performance import apply_load_options, fuse_unless_adapted
from .sources import ModelSource, resolve
from .invariance import make_batch_invariant, make_pipeline_batch_invariant

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline

log = logging.getLogger(__name__)

# diffusers' pipeline classes by name: diffusers is imported when the first model loads, not with this module
# (importing it takes seconds, and the studio's start needs none of it).
MODE_PIPELINES = {
    "sd": {
        Mode.txt2img: "StableDiffusionPipeline",
        Mode.img2img: "StableDiffusionImg2ImgPipeline",
        Mode.inpaint: "StableDiffusionInpaintPipeline",
        Mode.controlnet: "StableDiffusionControlNetPipeline",
    },
    "sdxl": {
        Mode.txt2img: "StableDiffusionXLPipeline",
        Mode.img2img: "StableDiffusionXLImg2ImgPipeline",
        Mode.inpaint: "StableDiffusionXLInpaintPipeline",
        Mode.controlnet: "StableDiffusionXLControlNetPipeline",
    },
}


# Inpainting with a ControlNet (an inpainting one: its control is the image with the hole marked).
CONTROLNET_INPAINT_PIPELINES = {
    "sd": "StableDiffusionControlNetInpaintPipeline",
    "sdxl": "StableDiffusionXLControlNetInpaintPipeline",
}


def mode_pipeline(family: str, mode: Mode, controlnet: bool = False):
    """diffusers' pipeline class for a family and mode (an inpainting ControlNet has its own); None: no such."""
    import diffusers

    name = CONTROLNET_INPAINT_PIPELINES[family] if mode == Mode.inpaint and controlnet else \
        MODE_PIPELINES[family].get(mode)
    return getattr(diffusers, name) if name else None


# One load at a time in a process: diffusers' low-memory loading builds modules under accelerate's empty-weights
# context, which patches torch.nn.Module for every thread, so two loads at once (two devices' managers, or a
# training run starting beside a job) leave each other's parameters on the meta device.
LOADING = threading.Lock()


def pick_device(preference: str) -> torch.device:
    import torch
    if preference != "auto":
        if preference.startswith("cuda") and not torch.cuda.is_available():
            raise RequestError("device", f"'{preference}' was asked for, but this torch sees no CUDA device here "
                                         "(use cpu or auto)")
        if preference.startswith("cuda:") and int(preference[5:]) >= torch.cuda.device_count():
            raise RequestError("device", f"'{preference}' was asked for, but this machine has "
                                         f"{torch.cuda.device_count()} CUDA devices (cuda:0 to "
                                         f"cuda:{torch.cuda.device_count() - 1})")
        if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RequestError("device", "'mps' was asked for, but this machine has no MPS device (use cpu or auto)")
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_label(preference: str) -> str:
    """The device `pick_device` gives for `preference`, by name, checked as it checks. Without importing torch
    (over a second of a server's start) where the answer needs none: "cpu", or "auto" with a CPU-only torch build
    on a machine that has no MPS; otherwise through torch."""
    if preference == "cpu":
        return "cpu"
    if preference == "auto" and sys.platform != "darwin":
        try:
            if importlib.metadata.version("torch").endswith("+cpu"):
                return "cpu"
        except importlib.metadata.PackageNotFoundError:
            pass
    return str(pick_device(preference))


def pick_dtype(preference: str, device: torch.device, file_dtype: str | None = None) -> torch.dtype:
    """The dtype to load weights in. `auto`: fp32 on the CPU (diffusers' safe default); on an accelerator the
    file's own dtype when it is fp16 or bf16 (`file_dtype`, a single file's), else fp16."""
    import torch
    if preference != "auto":
        return getattr(torch, preference)
    if device.type == "cpu":
        return torch.float32
    return getattr(torch, file_dtype) if file_dtype in ("float16", "bfloat16") else torch.float16


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps a dropped model's gigabytes in the process otherwise (a
    4.3 GB SD 1.5 unloaded left RSS at 4.8 GB; with this, 0.57 GB), and the next model would not fit beside them."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def estimator_source(kind: EstimatorKind, folder: str) -> ModelSource:
    """A depth / pose estimator as a model the manager loads, under a name no base or ControlNet can have."""
    return ModelSource(f"{kind}-estimator:{folder}", "folder", folder, "estimator", None)


def module_bytes(modules) -> int:
    import torch
    seen, total = set(), 0
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


class AdapterGate:
    """LoRA state lives in the shared UNet, so runs wanting different LoRA sets must not overlap. Runs with the
    same set share the gate; a different set waits until the running ones finish, then switches."""

    def __init__(self, pipeline: DiffusionPipeline):
        self._pipeline = pipeline
        self._condition = threading.Condition()
        self._active = 0
        self._current: tuple = ()
        self._loaded: set[str] = set()
        self._embeddings: set[str] = set()

    @contextmanager
    def use(self, adapters: tuple[tuple[str, str, float, float | None], ...],
            embeddings: tuple[tuple[str, str], ...] = (), model_name: str = "") -> Iterator[None]:
        """`adapters`: (adapter name, file path, UNet weight, text-encoder weight or None: the same) tuples.
        `embeddings`: (name, file path) of the textual-inversion embeddings the run's prompts name: loaded once,
        with no run in flight (they add tokens to the shared tokenizer)."""
        with self._condition:
            self._condition.wait_for(lambda: self._active == 0 or (
                self._current == adapters and all(name in self._embeddings for name, _ in embeddings)))
            if self._current != adapters:
                self._apply(adapters)
            for name, path in embeddings:
                if name not in self._embeddings:
                    load_embedding(self._pipeline, name, Path(path), model_name)
                    self._embeddings.add(name)
            self._active += 1
        try:
            yield
        finally:
            with self._condition:
                self._active -= 1
                self._condition.notify_all()

    def _apply(self, adapters) -> None:
        pipe = self._pipeline
        fuse_unless_adapted(getattr(pipe, "unet", None), adapted=bool(adapters))
        for name, path, _, _ in adapters:
            if name not in self._loaded:
                check_lora_file(Path(path).name, Path(path))
                try:
                    pipe.load_lora_weights(path, adapter_name=name)
                except (ValueError, OSError, KeyError, RuntimeError) as exc:
                    raise RequestError("loras", f"LoRA '{path}' can't be used with this model: {exc}") from None
                self._loaded.add(name)
        if adapters:
            parts = pipe.get_list_adapters()  # e.g. {"unet": [a, b], "text_encoder": [b]}
            weights = []
            for name, _, unet_weight, text_weight in adapters:
                if text_weight is None:
                    weights.append(unet_weight)
                    continue
                weights.append({part: text_weight if part.startswith("text_encoder") else unet_weight
                                for part, names in parts.items() if name in names})
            pipe.enable_lora()
            pipe.set_adapters([a[0] for a in adapters], adapter_weights=weights)
        elif self._loaded:
            pipe.disable_lora()
        self._current = adapters


@dataclass
class LoadedModel:
    source: ModelSource
    pipeline: DiffusionPipeline | None = None  # bases
    controlnet: ControlNetModel | None = None  # ControlNets
    estimator: Estimator | None = None  # depth / pose estimators
    vae: AutoencoderKL | None = None  # a request's own VAE
    identity: str = ""  # the weights' identity when they were loaded (ModelSource.compute_identity)
    weight_bytes: int = 0
    load_s: float = 0.0
    users: int = 0
    adapters: AdapterGate | None = None
    extras: dict = field(default_factory=dict)  # per-model caches (e.g. the fitted preview map)

    @property
    def family(self) -> str:
        return self.source.family


class PipelineManager:
    """One loaded copy per model; an LRU budget (count and bytes) unloads the least recently used idle model.
    Bases, ControlNets and depth/pose estimators all count in that budget."""

    def __init__(self, config: StudioConfig):
        self.config = config
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self.load_count = 0  # weights actually read from disk; tests use it to prove sharing

    # Picked on first use, not at construction: picking imports torch (over a second), which the server's start
    # does not need.
    @functools.cached_property
    def device(self) -> torch.device:
        return pick_device(self.config.device)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        return pick_dtype(self.config.dtype, self.device)

    # -- loading --------------------------------------------------------------------------------------------
    @contextmanager
    def use(self, model: str | ModelSource, role: str = "base") -> Iterator[tuple[LoadedModel, float]]:
        """Load (or reuse) a model, by name or already resolved, and keep it from being unloaded while in use.
        Yields (model, load seconds)."""
        source = model if isinstance(model, ModelSource) else resolve(model, self.config)
        if source.role != role:
            field_name = "model" if role == "base" else "controlnet"
            raise RequestError(field_name, f"'{source.name}' is a {source.role}, not a {role}")
        with self._hold(source) as held:
            yield held

    @contextmanager
    def use_estimator(self, kind: EstimatorKind, folder: str) -> Iterator[Estimator]:
        """Load (or reuse) the depth or pose estimator in `folder` and hold it while a control map is made."""
        source = estimator_source(kind, folder)
        with self._hold(source, lambda source: self._load_estimator(kind, source)) as (entry, _):
            yield entry.estimator

    @contextmanager
    def use_vae(self, source: ModelSource) -> Iterator[AutoencoderKL]:
        """Load (or reuse) a request's VAE (role "vae": a file or an AutoencoderKL folder), held while used."""
        with self._hold(source, self._load_vae) as (entry, _):
            yield entry.vae

    def _load_vae(self, source: ModelSource) -> LoadedModel:
        import torch
        import_libraries()  # diffusers and transformers: imported by the first load, not the start
        from . import single_file

        try:  # a file (original or diffusers key names) or an AutoencoderKL folder, offline
            file_dtype = source.file_kind.dtype if source.file_kind else None
            vae = single_file.load_vae(source.location, source.family,
                                       pick_dtype(self.config.dtype, self.device, file_dtype))
        except (torch.OutOfMemoryError, RequestError, ModelLoadError):
            raise
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
            raise ModelLoadError(f"can't load VAE '{Path(source.location).name}': {type(exc).__name__}: "
                                 f"{str(exc)[:200]}") from None
        vae.to(self.device)
        make_pipeline_batch_invariant({"vae": vae})  # decodes image by image, as the bases' VAEs do
        return LoadedModel(source, vae=vae, weight_bytes=module_bytes([vae]))

    @contextmanager
    def _hold(self, source: ModelSource, load=None) -> Iterator[tuple[LoadedModel, float]]:
        with self._lock:
            entry, load_s = self._get(source, load or self._load)
            entry.users += 1
        try:
            yield entry, load_s
        finally:
            with self._lock:
                entry.users -= 1

    def identity(self, model: str | ModelSource) -> str:
        """The identity of a model's weights: the one recorded when it was loaded if it is loaded (no disk walk),
        else computed from its files now."""
        source = model if isinstance(model, ModelSource) else resolve(model, self.config)
        with self._lock:
            entry = self._entries.get(source.name)
            if entry is not None:
                return entry.identity
        return source.compute_identity()

    def _get(self, source: ModelSource, load) -> tuple[LoadedModel, float]:
        key = source.name
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key], 0.0
        started = time.perf_counter()
        with LOADING:
            entry = load(source)
        entry.identity = entry.source.compute_identity()  # once per load, here in the loading thread
        entry.load_s = time.perf_counter() - started
        self.load_count += 1
        self._entries[key] = entry
        self._enforce_budget(keep=key)
        log.info("loaded %s (%s, %.1f MB) in %.2fs", key, source.kind, entry.weight_bytes / 1e6, entry.load_s)
        return entry, entry.load_s

    def _load(self, source: ModelSource) -> LoadedModel:
        import torch
        import_libraries()
        from diffusers import ControlNetModel, DiffusionPipeline

        from . import single_file

        kwargs = {"dtype": self.dtype}
        try:
            if source.kind == "single_file":
                # offline, component by component (engine/single_file.py); fp16/bf16 files stay so on a GPU
                file_kind = source.file_kind or single_file.configured_kind(Path(source.location), source.role,
                                                                            source.family)
                kwargs["dtype"] = pick_dtype(self.config.dtype, self.device, file_kind.dtype)
            if source.role == "controlnet":
                if source.kind == "single_file":
                    model = single_file.load_controlnet(Path(source.location), file_kind, kwargs["dtype"],
                                                        source.config_folder)
                else:
                    model = ControlNetModel.from_pretrained(source.location, **kwargs)
                model.to(self.device)
                make_batch_invariant(model)
                return LoadedModel(source, controlnet=model, weight_bytes=module_bytes([model]))
            if source.kind == "single_file":
                pipe = single_file.load_base(Path(source.location), file_kind, kwargs["dtype"], source.config_folder,
                                             prediction_type=self._configured_prediction(source))
            else:
                pipe = DiffusionPipeline.from_pretrained(source.location, **kwargs)
        except OSError as exc:
            if source.kind == "hub":
                raise RequestError(
                    "model",
                    f"'{source.location}' is not in the local Hugging Face cache and the hub can't be reached "
                    "(offline). Download it where there is network (`hf download "
                    f"{source.location}`) or point the studio at a local folder.",
                ) from None
            raise ModelLoadError(f"can't load '{source.name}': {exc}") from None
        except (torch.OutOfMemoryError, RequestError):
            raise
        except (ValueError, RuntimeError, KeyError, SafetensorError) as exc:  # corrupt or mismatched weights
            raise ModelLoadError(f"can't load '{source.name}': {type(exc).__name__}: {exc}") from None
        family = "sdxl" if "XL" in type(pipe).__name__ else "sd"
        if source.family is None:  # hub ids: known only now
            source = ModelSource(source.name, source.kind, source.location, "base", family)
        self._apply_memory_options(pipe)
        make_pipeline_batch_invariant(pipe.components)  # so cross-user batches give each job its lone-run bits
        apply_load_options(pipe, self.config.performance, self.config.data_dir,
                           sliced=self.config.memory.attention_slicing)
        return LoadedModel(source, pipeline=pipe, weight_bytes=module_bytes(pipe.components.values()),
                           adapters=AdapterGate(pipe))

    def _configured_prediction(self, source: ModelSource) -> str | None:
        """A configured model's `prediction_type` (SD 2.x 512-ε and 768-v files have the same tensors), if set."""
        entry = self.config.models.get(source.name)
        return getattr(entry, "prediction_type", None)

    @staticmethod
    def _load_estimator(kind: EstimatorKind, source: ModelSource) -> LoadedModel:
        estimator = load_estimator(kind, source.location)  # on the CPU, as transformers loads it
        return LoadedModel(source, estimator=estimator, weight_bytes=module_bytes([estimator.model]))

    def _apply_memory_options(self, pipe: DiffusionPipeline) -> None:
        memory = self.config.memory
        if memory.model_cpu_offload:
            if self.device.type == "cpu":
                raise RequestError("memory.model_cpu_offload", "needs a CUDA or MPS device; this machine has none")
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        if memory.attention_slicing:
            pipe.enable_attention_slicing()
        if memory.vae_tiling:
            pipe.vae.enable_tiling()

    # -- budget ---------------------------------------------------------------------------------------------
    def _enforce_budget(self, keep: str) -> None:
        def over_budget() -> bool:
            max_bytes = self.config.max_loaded_bytes
            total = sum(e.weight_bytes for e in self._entries.values())
            return len(self._entries) > self.config.max_loaded_models or (max_bytes is not None and total > max_bytes)

        while over_budget():
            idle = [k for k, e in self._entries.items() if k != keep and e.users == 0]
            if not idle:
                log.warning("memory budget exceeded but every other model is in use; keeping all loaded")
                return
            self.unload(idle[0])  # OrderedDict order: least recently used first

    def unload(self, name: str) -> bool:
        import torch
        with self._lock:
            key = name if name in self._entries else None
            if key is None:
                try:
                    key = resolve(name, self.config).name
                except RequestError:
                    return False
            entry = self._entries.get(key)
            if entry is None or entry.users:
                return False
            del self._entries[key]
        del entry
        gc.collect()
        release_freed_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("unloaded %s", key)
        return True

    def loaded(self) -> list[dict]:
        with self._lock:
            return [
                {"name": k, "role": e.source.role, "family": e.family, "weight_bytes": e.weight_bytes,
                 "load_s": round(e.load_s, 3), "in_use": e.users, "standin": e.source.standin}
                for k, e in self._entries.items()
            ]

    # -- per-request views ----------------------------------------------------------------------------------
    def view(self, base: LoadedModel, mode: Mode, scheduler: str,
             controlnet: ControlNetModel | None = None, vae: AutoencoderKL | None = None) -> DiffusionPipeline:
        """The pipeline for `mode` over the base's own modules, with its own scheduler instance (the scheduler
        carries per-run state, so sharing one across concurrent requests would corrupt both).

        This is what diffusers' `from_pipe` does, minus its `.to(dtype)` over every module on each call (12 ms
        on a tiny model, more on a real one): the modules already have the right dtype and device. `vae`: a
        request's own VAE, in this view only (the base keeps its own)."""
        cls = mode_pipeline(base.family, mode, controlnet is not None)
        if cls is None:
            raise RequestError("mode", f"mode '{mode.value}' has no {base.family.upper()} pipeline")
        if base.pipeline.components.get("text_encoder", False) is None and mode in (Mode.txt2img, Mode.controlnet):
            # The SDXL refiner has only the OpenCLIP encoder: it refines images, it doesn't start them.
            raise RequestError("mode", f"'{base.source.name}' is an SDXL refiner: it refines an image (img2img or "
                                       f"inpaint, strength about 0.3); it can't run {mode.value}")
        shared = {**base.pipeline.components, "controlnet": controlnet,
                  "scheduler": make_scheduler(scheduler, base.pipeline.scheduler.config)}
        if vae is not None:
            shared["vae"] = vae
        settings = base.pipeline.config  # e.g. requires_safety_checker, force_zeros_for_empty_prompt
        arguments = {}
        for name in inspect.signature(cls.__init__).parameters:
            if name in shared:
                arguments[name] = shared[name]
            elif name in settings and not name.startswith("_"):
                arguments[name] = settings[name]
        view = cls(**arguments)
        view.set_progress_bar_config(disable=True)
        return view


def make_scheduler(name: str, base_config):
    import diffusers

    class_name, options = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **options)
