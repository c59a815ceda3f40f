"""One training loop for full (from-scratch or fine-tune) and LoRA training of an SD-architecture model.

Controls (pause / resume / stop) come from other threads and take effect within one step. A checkpoint is a plain
dict; resuming reads the same keys and continues the same run (step, optimiser, EMA, RNG, data stream).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import delete_adapter_layers
from PIL import Image

from ..builtin.shapes import check, parse_caption
from .config import TrainConfig
from ..engine.control import canny, inpaint_condition
from ..requests import RequestError
from .data import LatentPool, control_maps, folder_pool, inpainting_mask, shapes_pool
from .events import EventBus, StabilityMeter, TrainingEvent

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
ADAPTER = "studio_training"
# With train_text_encoder, LoRA adapts the text encoders' attention projections too (the UNet's: config.lora_layers).
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TrainingError(RuntimeError):
    """The run stopped on its own (non-finite loss, an incompatible checkpoint); the message says why."""


class Trainer:
    def __init__(self, config: TrainConfig, pipeline: StableDiffusionPipeline, bus: EventBus | None = None,
                 pool: LatentPool | None = None, controlnet: ControlNetModel | None = None,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.pipe = pipeline
        self.controlnet = controlnet
        self.is_xl = getattr(pipeline, "text_encoder_2", None) is not None  # SDXL: two encoders, micro-conditions
        self.bus = bus or EventBus()
        self.pool = pool
        self.step = 0
        self.warmup_from = 0  # a warm start re-warms the fresh optimiser from here
        self.state = "idle"  # idle | running | paused | stopped | done | failed
        self._resume_flag = threading.Event()
        self._resume_flag.set()
        self._stop_flag = threading.Event()
        self.output_dir = Path(config.output_dir)
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)  # batches, noise, timesteps, dropout
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.modules = self._choose_trainable()
        # Everything lives on `device`; data and random draws stay on the CPU (the same run on any device).
        pipeline.to(self.device)
        if self.controlnet is not None:  # the one trainable module outside the pipeline
            self.controlnet.to(self.device)
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate,
                                           weight_decay=0.0 if config.method == "lora" else 1e-2)
        self.ema = EMAModel(self.params, decay=config.ema_decay) if config.ema_decay else None
        self.stability = StabilityMeter()

    # -- set-up ---------------------------------------------------------------------------------------------
    def _choose_trainable(self) -> dict[str, torch.nn.Module]:
        unet, text_encoder, vae = self.pipe.unet, self.pipe.text_encoder, self.pipe.vae
        encoders = {"text_encoder": text_encoder}
        if self.is_xl:
            encoders["text_encoder_2"] = self.pipe.text_encoder_2
        vae.requires_grad_(False)
        for encoder in encoders.values():
            encoder.requires_grad_(False)
        if self.config.method == "lora":
            unet.requires_grad_(False)
            adapted = {"unet": unet, **(encoders if self.config.train_text_encoder else {})}
            for name, module in adapted.items():
                self._add_lora(name, module)
            return adapted
        if self.config.method == "controlnet":
            unet.requires_grad_(False)
            if self.controlnet is None:  # starts as a copy of the UNet's encoder, outputs zeroed (standard)
                levels = len(vae.config.block_out_channels)
                self.controlnet = ControlNetModel.from_unet(
                    unet, conditioning_embedding_out_channels=tuple(16 * 2**i for i in range(levels)))
            self.controlnet.requires_grad_(True)
            return {"controlnet": self.controlnet}
        unet.requires_grad_(True)
        if self.config.train_text_encoder:
            for encoder in encoders.values():
                encoder.requires_grad_(True)
            return {"unet": unet, **encoders}
        return {"unet": unet}

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

    def _build_pool(self) -> LatentPool:
        cfg = self.config
        if cfg.dataset == "shapes":
            pool = shapes_pool(self.pipe.vae, cfg.pool_size, cfg.resolution, cfg.seed)
        else:
            pool = folder_pool(self.pipe.vae, Path(cfg.dataset), cfg.resolution, cfg.instance_prompt, self._warn)
        if cfg.method == "controlnet" and cfg.control_type == "inpaint":
            rng = random.Random(cfg.seed)  # the same holes when a resumed run rebuilds the pool
            pool.conditions = torch.cat([inpaint_condition(image, inpainting_mask(image, rng))
                                         for image in pool.images])
        elif cfg.method == "controlnet":
            pool.conditions = control_maps(pool.images, self._control_map)
        return pool

    def _control_map(self, image):
        return canny(image, *self.config.canny_thresholds)

    def _control_sample_inputs(self, prompts: list[str]) -> tuple[type, list[str], dict]:
        """The pipeline, prompts and inputs that show a ControlNet at work: the sample prompts on canny maps of pool
        images, or pool images with their holes and their own captions (another prompt would fight the context)."""
        count = len(prompts)
        if self.config.control_type == "canny":
            family = StableDiffusionXLControlNetPipeline if self.is_xl else StableDiffusionControlNetPipeline
            return family, prompts, {"image": [self._control_map(self.pool.images[i]) for i in range(count)]}
        family = StableDiffusionXLControlNetInpaintPipeline if self.is_xl else StableDiffusionControlNetInpaintPipeline
        holes = [Image.fromarray((self.pool.conditions[i] < 0).all(0).numpy().astype(np.uint8) * 255)
                 for i in range(count)]
        return family, self.pool.captions[:count], {"image": self.pool.images[:count], "mask_image": holes,
                                                    "strength": 1.0, "control_image": self.pool.conditions[:count]}

    def _warn(self, message: str) -> None:
        self.bus.publish(TrainingEvent("warning", self.step, self.config.steps, message=message))

    # -- controls (any thread) ------------------------------------------------------------------------------
    def pause(self) -> None:
        self._resume_flag.clear()

    def resume(self) -> None:
        self._resume_flag.set()

    def stop(self) -> None:
        self._stop_flag.set()
        self._resume_flag.set()  # a paused run must wake up to stop

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to `config.steps` (resuming a checkpoint in output_dir if there is one). Returns the output."""
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.load_checkpoint()
        self.pool = self.pool or self._build_pool()
        self._set_state("running")
        for module in self.modules.values():
            module.train()
        step_times: list[float] = []
        while self.step < cfg.steps:
            started = time.perf_counter()
            lr = self._set_lr()
            latents, captions, index = self.pool.batch(cfg.batch_size, self.generator)
            loss = self._loss(latents, captions, index)
            if not torch.isfinite(loss):
                self._fail(f"loss became {loss.item()} at step {self.step}; stopped. The last good checkpoint "
                           f"(step {self._checkpoint_step()}) is kept in {self.output_dir}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            self.optimizer.step()
            if self.ema is not None:
                self.ema.step(self.params)
            self.step += 1
            step_times = (step_times + [time.perf_counter() - started])[-50:]
            self.bus.publish(TrainingEvent(
                "step", self.step, cfg.steps, loss=loss.item(), grad_norm=grad_norm, lr=lr,
                stability=self.stability.update(loss.item(), grad_norm),
                eta_s=sum(step_times) / len(step_times) * (cfg.steps - self.step)))
            if self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.sample()
            if not self._resume_flag.is_set():
                self._set_state("paused")
                self._resume_flag.wait()
                self._set_state("running")
            if self._stop_flag.is_set():
                self.save_checkpoint()
                self._set_state("stopped")
                return self.output_dir
        self.save_checkpoint()
        output = self.export()
        self._set_state("done")
        self.bus.publish(TrainingEvent("done", self.step, cfg.steps, message=str(output),
                                       data={"output": str(output)}))
        return output

    def _set_lr(self) -> float:
        cfg = self.config
        if self.step - self.warmup_from < cfg.warmup_steps:
            scale = (self.step - self.warmup_from + 1) / cfg.warmup_steps
            if self.warmup_from:  # re-warming towards where the schedule is now
                progress = (self.step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
                scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1
        elif cfg.lr_schedule == "cosine":
            progress = (self.step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            scale = 1.0
        lr = cfg.learning_rate * scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token embeddings, pooled embedding or None) exactly as the matching pipeline computes them."""
        pipe = self.pipe
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if self.is_xl:
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        hidden, pooled = [], None
        for tokenizer, encoder in pairs:
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            if not self.is_xl:
                return encoder(ids)[0], None
            output = encoder(ids, output_hidden_states=True)
            pooled = output[0]  # SDXL pools from the last (projection) encoder
            hidden.append(output.hidden_states[-2])  # and takes each encoder's penultimate layer
        return torch.cat(hidden, dim=-1), pooled

    def _loss(self, latents: torch.Tensor, captions: list[str], index: list[int]) -> torch.Tensor:
        cfg, scheduler = self.config, self.noise_scheduler
        device = self.pipe.unet.device
        latents = latents.to(device)
        # Empty captions teach the unconditional prediction that classifier-free guidance needs.
        drop = torch.rand(len(captions), generator=self.generator) < cfg.caption_dropout
        if not self.is_xl:
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        noise = torch.randn(latents.shape, generator=self.generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(captions),),
                                  generator=self.generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            text, pooled = self.encode_text(captions)
        conditions = {}
        if self.is_xl:
            # SDXL's empty prompt is all zeros (force_zeros_for_empty_prompt), so dropped captions are zeros too.
            keep = (~drop).to(device, text.dtype)
            text, pooled = text * keep[:, None, None], pooled * keep[:, None]
            size = cfg.resolution  # micro-conditioning: original size, crop (0, 0), target size
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=text.dtype, device=device)
            conditions["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(captions), 1)}
        if self.config.method == "controlnet":
            condition = self.pool.conditions[index].to(device)
            down, middle = self.controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=condition,
                                           return_dict=False, **conditions)
            prediction = self.pipe.unet(noisy, timesteps, text, down_block_additional_residuals=down,
                                        mid_block_additional_residual=middle, **conditions).sample
        else:
            prediction = self.pipe.unet(noisy, timesteps, text, **conditions).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_sample = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            alphas = scheduler.alphas_cumprod.to(device)[timesteps]
            per_sample = per_sample * snr_loss_weight(alphas / (1 - alphas), cfg.min_snr_gamma,
                                                      scheduler.config.prediction_type)
        return per_sample.mean()

    # -- samples --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self) -> list[Path]:
        cfg = self.config
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        with self._ema_weights():
            for module in self.modules.values():
                module.eval()
            components, prompts, extra = dict(self.pipe.components), cfg.sample_prompts, {}
            if not self.is_xl:
                components["requires_safety_checker"] = False
            if cfg.method == "controlnet":
                family, prompts, extra = self._control_sample_inputs(prompts)
                pipe = family(**components, controlnet=self.controlnet)
            else:
                pipe = type(self.pipe)(**components)
            pipe.set_progress_bar_config(disable=True)
            generator = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            images = pipe(prompts, num_inference_steps=cfg.sample_steps, generator=generator,
                          height=cfg.resolution, width=cfg.resolution, **extra).images
            for module in self.modules.values():
                module.train()
        paths = []
        for index, image in enumerate(images):
            path = folder / f"step{self.step:07d}-{index}.png"
            image.save(path)
            paths.append(path)
        data = {"images": [str(p) for p in paths], "prompts": prompts}
        adherence = None if cfg.method == "controlnet" else shapes_adherence(images, prompts)
        if adherence is not None:
            data["adherence"] = adherence
        self.bus.publish(TrainingEvent("sample", self.step, cfg.steps, data=data))
        return paths

    def _ema_weights(self):
        trainer = self

        class Swap:
            def __enter__(self):
                if trainer.ema is not None:
                    trainer.ema.store(trainer.params)
                    trainer.ema.copy_to(trainer.params)

            def __exit__(self, *exc):
                if trainer.ema is not None:
                    trainer.ema.restore(trainer.params)

        return Swap()

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, dict]:
        if self.config.method == "lora":
            from peft.utils import get_peft_model_state_dict

            return {name: get_peft_model_state_dict(module, adapter_name=ADAPTER)
                    for name, module in self.modules.items()}
        return {name: module.state_dict() for name, module in self.modules.items()}

    def save_checkpoint(self) -> Path:
        path = self.output_dir / CHECKPOINT
        state = {
            "step": self.step,
            "config": self.config.model_dump(mode="json", exclude={"steps"}),
            "trainable": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
        }
        scratch = path.with_suffix(".tmp")
        torch.save(state, scratch)
        os.replace(scratch, path)  # a crash mid-write never replaces the last good checkpoint
        self.bus.publish(TrainingEvent("checkpoint", self.step, self.config.steps, data={"path": str(path)}))
        return path

    def _checkpoint_step(self) -> int:
        path = self.output_dir / CHECKPOINT
        return torch.load(path, map_location="cpu", weights_only=False)["step"] if path.exists() else 0

    def warm_start(self, step: int) -> None:
        """Continue a run whose checkpoint is gone but whose weights were kept (e.g. an installed model): the
        step count and LR schedule continue; the optimiser starts fresh, so the LR is warmed up again."""
        self.step = self.warmup_from = step

    def load_checkpoint(self) -> bool:
        path = self.output_dir / CHECKPOINT
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        mine = self.config.model_dump(mode="json", exclude={"steps"})
        # A setting added to TrainConfig after the checkpoint was written counts as its default there.
        saved = {**TrainConfig.model_construct().model_dump(mode="json", exclude={"steps"}), **state["config"]}
        if saved != mine:
            changed = sorted(k for k in mine if saved.get(k) != mine[k])
            raise TrainingError(f"output_dir: '{self.output_dir}' holds a run with different settings "
                                f"({', '.join(changed)}); resume with the same settings or use another folder")
        if self.config.method == "lora":
            from peft.utils import set_peft_model_state_dict

            for name, module in self.modules.items():
                set_peft_model_state_dict(module, state["trainable"][name], adapter_name=ADAPTER)
        else:
            for name, module in self.modules.items():
                module.load_state_dict(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.device)
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        self.step = state["step"]
        self._set_state("resumed")
        return True

    # -- output ---------------------------------------------------------------------------------------------
    def export(self) -> Path:
        """Full: a diffusers folder (EMA weights if kept). LoRA: a .safetensors that load_lora_weights reads.
        ControlNet: a ControlNet folder."""
        if self.config.method == "lora":
            from peft.utils import get_peft_model_state_dict

            # unet_lora_layers, text_encoder_lora_layers, text_encoder_2_lora_layers: the loader's own names.
            layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(
                get_peft_model_state_dict(module, adapter_name=ADAPTER)) for name, module in self.modules.items()}
            type(self.pipe).save_lora_weights(self.output_dir, weight_name="lora.safetensors",
                                              safe_serialization=True, **layers)
            return self.output_dir / "lora.safetensors"
        target = self.output_dir / ("controlnet" if self.config.method == "controlnet" else "model")
        with self._ema_weights():
            saved = self.controlnet if self.config.method == "controlnet" else self.pipe
            saved.save_pretrained(target, safe_serialization=True)
        return target

    # -- state ----------------------------------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        self.state = state
        self.bus.publish(TrainingEvent("state", self.step, self.config.steps, message=state))

    def _fail(self, message: str) -> None:
        self.state = "failed"
        self.bus.publish(TrainingEvent("error", self.step, self.config.steps, message=message))
        raise TrainingError(message)


def snr_loss_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights that make the clean-image loss count min(snr, gamma) for noise prediction
    (Min-SNR, Hang et al. 2023: low-noise steps stop dominating) and min(snr + 1, gamma) for v prediction.

    The v loss is the clean-image loss times (snr + 1); capping that factor at gamma keeps weight 1 where the
    image is almost pure noise. diffusers' min(snr, gamma) / (snr + 1) weighs those steps by snr (~1e-4 there), so
    the model never learns what only the prompt can tell, such as where the shape goes."""
    if prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def shapes_adherence(images, prompts) -> float | None:
    """Share of images the shapes-world checker passes, when every prompt is a shapes-world caption."""
    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return None
    return sum(check(image, prompt).all_ok for image, prompt in zip(images, prompts)) / len(prompts)
