"""What a training method trains: one `TrainingTarget` per `TrainConfig.method`, chosen in `TARGETS`.

The Trainer's loop is the same for every method; a target says where the methods differ: which modules train (and
sets them up: freezing, adapters, a new ControlNet), what the optimiser's weight decay is, what the pool needs beside
latents, how the UNet's prediction is made, which pipeline shows samples, what a checkpoint keeps of the trained
modules, and how the result is exported.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import delete_adapter_layers
from PIL import Image

from ..engine.control import canny, inpaint_condition
from ..requests import RequestError
from .config import TrainConfig
from .data import LatentPool, control_maps, inpainting_mask

ADAPTER = "studio_training"
# With train_text_encoder, LoRA adapts the text encoders' attention projections too (the UNet's: config.lora_layers).
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TrainingTarget:
    """The base: trains (some of) the pipeline's own modules and predicts with its UNet alone.

    `setup()` runs once, before the pipeline moves to its device, with torch's global RNG forked and seeded from the
    run's seed (module construction and peft's initialisation draw from it)."""

    weight_decay = 1e-2
    checks_shapes = True  # score samples with the shapes-world checker (when every prompt is a shapes caption)

    def __init__(self, config: TrainConfig, pipe: StableDiffusionPipeline, controlnet: ControlNetModel | None = None):
        self.config = config
        self.pipe = pipe
        self.is_xl = getattr(pipe, "text_encoder_2", None) is not None
        self.modules: dict[str, torch.nn.Module] = {}

    def encoders(self) -> dict[str, torch.nn.Module]:
        encoders = {"text_encoder": self.pipe.text_encoder}
        if self.is_xl:
            encoders["text_encoder_2"] = self.pipe.text_encoder_2
        return encoders

    def setup(self) -> dict[str, torch.nn.Module]:
        """Freeze what stays fixed, prepare what trains; returns the trained modules by name (also `self.modules`)."""
        raise NotImplementedError

    def prepare_pool(self, pool: LatentPool) -> None:
        """Add what this target needs to a freshly built pool (ControlNet: the control conditions)."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, conditions: dict,
                pool: LatentPool, index: list[int]) -> torch.Tensor:
        """The UNet's prediction for a batch (`index`: the batch's pool rows)."""
        return self.pipe.unet(noisy, timesteps, text, **conditions).sample

    def sample_pipeline(self, components: dict, prompts: list[str], pool: LatentPool) -> tuple[Any, list[str], dict]:
        """The pipeline that shows samples, the prompts it is given and any further inputs."""
        return type(self.pipe)(**components), prompts, {}

    def state_dict(self) -> dict[str, dict]:
        """What a checkpoint keeps of the trained modules, by module name."""
        return {name: module.state_dict() for name, module in self.modules.items()}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(states[name])

    def export(self, output_dir: Path) -> Path:
        """Write the result (the Trainer swaps EMA weights in around this); returns its path."""
        raise NotImplementedError


class FullTarget(TrainingTarget):
    """All the UNet's weights (from scratch or fine-tuning), with train_text_encoder the text encoders' too.
    Exports a diffusers pipeline folder, `model/`."""

    def setup(self):
        self.pipe.vae.requires_grad_(False)
        encoders = self.encoders()
        for encoder in encoders.values():
            encoder.requires_grad_(self.config.train_text_encoder)
        self.pipe.unet.requires_grad_(True)
        self.modules = {"unet": self.pipe.unet, **(encoders if self.config.train_text_encoder else {})}
        return self.modules

    def export(self, output_dir):
        target = output_dir / "model"
        self.pipe.save_pretrained(target, safe_serialization=True)
        return target


class LoraTarget(TrainingTarget):
    """A fresh LoRA adapter on the UNet's `lora_layers` (with train_text_encoder also on the text encoders'
    attention), everything else frozen. Checkpoints keep only the adapters; the export is `lora.safetensors`, which
    diffusers' load_lora_weights reads."""

    weight_decay = 0.0

    def setup(self):
        self.pipe.vae.requires_grad_(False)
        self.pipe.unet.requires_grad_(False)
        encoders = self.encoders()
        for encoder in encoders.values():
            encoder.requires_grad_(False)
        self.modules = {"unet": self.pipe.unet, **(encoders if self.config.train_text_encoder else {})}
        for name, module in self.modules.items():
            self._add_lora(name, module)
        return self.modules

    def _add_lora(self, name: str, module: torch.nn.Module) -> None:
        """A fresh LoRA adapter on the UNet's `lora_layers` or a text encoder's attention projections (replacing one
        that a reused pipeline still has)."""
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_alpha, init_lora_weights="gaussian",
                            target_modules=self.config.lora_layers if name == "unet" else TEXT_LORA_TARGETS)
        if name == "unet":
            if ADAPTER in getattr(module, "peft_config", {}):
                module.delete_adapters(ADAPTER)
            try:
                module.add_adapter(adapter_name=ADAPTER, adapter_config=config)
            except ValueError as exc:  # no module matched
                raise RequestError("lora_layers", f"{exc} (this UNet's attention layers end in to_q, to_k, to_v, "
                                                  "to_out.0, under attn1 (self) and attn2 (cross))") from None
            module.set_adapters(ADAPTER)
            return
        # transformers' own add_adapter wants peft >= 0.22 (0.21 is the newest); peft's injection is what it calls.
        if ADAPTER in getattr(module, "peft_config", {}):
            delete_adapter_layers(module, ADAPTER)  # may drop the whole peft_config itself
            getattr(module, "peft_config", {}).pop(ADAPTER, None)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)  # only the new adapter is trainable

    def state_dict(self):
        from peft.utils import get_peft_model_state_dict

        return {name: get_peft_model_state_dict(module, adapter_name=ADAPTER) for name, module in self.modules.items()}

    def load_state_dict(self, states):
        from peft.utils import set_peft_model_state_dict

        for name, module in self.modules.items():
            set_peft_model_state_dict(module, states[name], adapter_name=ADAPTER)

    def export(self, output_dir):
        # unet_lora_layers, text_encoder_lora_layers, text_encoder_2_lora_layers: the loader's own names.
        layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(adapter)
                  for name, adapter in self.state_dict().items()}
        type(self.pipe).save_lora_weights(output_dir, weight_name="lora.safetensors", safe_serialization=True,
                                          **layers)
        return output_dir / "lora.safetensors"


class ControlNetTarget(TrainingTarget):
    """A ControlNet (canny or inpainting) beside the frozen base: the given one, or a new copy of the UNet's encoder
    with zeroed outputs (the standard start). Its pool carries a control condition per image; exports `controlnet/`."""

    checks_shapes = False  # canny samples draw on other images' edges, inpainting ones keep their images' context

    def __init__(self, config, pipe, controlnet=None):
        super().__init__(config, pipe)
        self.controlnet = controlnet

    def setup(self):
        self.pipe.vae.requires_grad_(False)
        for encoder in self.encoders().values():
            encoder.requires_grad_(False)
        self.pipe.unet.requires_grad_(False)
        if self.controlnet is None:
            levels = len(self.pipe.vae.config.block_out_channels)
            self.controlnet = ControlNetModel.from_unet(
                self.pipe.unet, conditioning_embedding_out_channels=tuple(16 * 2**i for i in range(levels)))
        self.controlnet.requires_grad_(True)
        self.modules = {"controlnet": self.controlnet}
        return self.modules

    def control_map(self, image: Image.Image) -> Image.Image:
        return canny(image, *self.config.canny_thresholds)

    def prepare_pool(self, pool):
        if self.config.control_type == "inpaint":
            rng = random.Random(self.config.seed)  # the same holes when a resumed run rebuilds the pool
            pool.conditions = torch.cat([inpaint_condition(image, inpainting_mask(image, rng))
                                         for image in pool.images])
        else:
            pool.conditions = control_maps(pool.images, self.control_map)

    def predict(self, noisy, timesteps, text, conditions, pool, index):
        condition = pool.conditions[index].to(noisy.device)
        down, middle = self.controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=condition,
                                       return_dict=False, **conditions)
        return self.pipe.unet(noisy, timesteps, text, down_block_additional_residuals=down,
                              mid_block_additional_residual=middle, **conditions).sample

    def sample_pipeline(self, components, prompts, pool):
        """The sample prompts on canny maps of pool images, or pool images with their holes and their own captions
        (another prompt would fight the context)."""
        count = len(prompts)
        if self.config.control_type == "canny":
            family = StableDiffusionXLControlNetPipeline if self.is_xl else StableDiffusionControlNetPipeline
            extra = {"image": [self.control_map(pool.images[i]) for i in range(count)]}
        else:
            family = (StableDiffusionXLControlNetInpaintPipeline if self.is_xl
                      else StableDiffusionControlNetInpaintPipeline)
            holes = [Image.fromarray((pool.conditions[i] < 0).all(0).numpy().astype(np.uint8) * 255)
                     for i in range(count)]
            prompts = pool.captions[:count]
            extra = {"image": pool.images[:count], "mask_image": holes, "strength": 1.0,
                     "control_image": pool.conditions[:count]}
        return family(**components, controlnet=self.controlnet), prompts, extra

    def export(self, output_dir):
        target = output_dir / "controlnet"
        self.controlnet.save_pretrained(target, safe_serialization=True)
        return target


# The one place a method name picks its target.
TARGETS: dict[str, type[TrainingTarget]] = {"full": FullTarget, "lora": LoraTarget, "controlnet": ControlNetTarget}
