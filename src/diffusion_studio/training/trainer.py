"""One training loop for full (from-scratch or fine-tune), LoRA and ControlNet training of an SD-architecture model;
where the methods differ is each one's `TrainingTarget` (training/targets.py).

Controls (pause / resume / stop) come from other threads and take effect within one step. A checkpoint is a plain
dict; resuming reads the same keys and continues the same run (step, optimiser, EMA, RNG, data stream). Everything
random in the run is drawn from the trainer's own generator; torch's global RNG (which a server shares with
generation) is left as it was.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from pathlib import Path

import torch
from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel

from ..builtin.shapes import check, parse_caption
from .config import TrainConfig
from .data import LatentPool, folder_pool, shapes_pool
from .events import EventBus, StabilityMeter, TrainingEvent
from .targets import TARGETS

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class TrainingError(RuntimeError):
    """The run stopped on its own (non-finite loss, an incompatible checkpoint); the message says why."""


class Trainer:
    def __init__(self, config: TrainConfig, pipeline: StableDiffusionPipeline, bus: EventBus | None = None,
                 pool: LatentPool | None = None, controlnet: ControlNetModel | None = None,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.pipe = pipeline
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
        # The run's own RNG: batches, noise, timesteps, caption dropout (checkpointed, so a resumed run draws on).
        self.generator = torch.Generator().manual_seed(config.seed)
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.target = TARGETS[config.method](config, pipeline, controlnet)
        # peft's gaussian LoRA init and a new ControlNet's layers draw from torch's global (CPU) RNG: seed it for
        # them inside a fork, so the run starts the same every time and the global state is put back afterwards.
        # (Both initialise on the CPU; other threads' generation draws from its own generators.)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(config.seed)
            self.modules = self.target.setup()
        # Everything lives on `device` (a ControlNet outside the pipeline too); data and random draws stay on the
        # CPU (the same run on any device).
        pipeline.to(self.device)
        for module in self.modules.values():
            module.to(self.device)
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=self.target.weight_decay)
        self.ema = EMAModel(self.params, decay=config.ema_decay) if config.ema_decay else None
        self.stability = StabilityMeter()

    # -- set-up ---------------------------------------------------------------------------------------------
    def _build_pool(self) -> LatentPool:
        cfg = self.config
        if cfg.dataset == "shapes":
            pool = shapes_pool(self.pipe.vae, cfg.pool_size, cfg.resolution, cfg.seed)
        else:
            pool = folder_pool(self.pipe.vae, Path(cfg.dataset), cfg.resolution, cfg.instance_prompt, self._warn)
        self.target.prepare_pool(pool)
        return pool

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
        prediction = self.target.predict(noisy, timesteps, text, conditions, self.pool, index)
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
            components = dict(self.pipe.components)
            if not self.is_xl:
                components["requires_safety_checker"] = False
            pipe, prompts, extra = self.target.sample_pipeline(components, cfg.sample_prompts, self.pool)
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
        adherence = shapes_adherence(images, prompts) if self.target.checks_shapes else None
        if adherence is not None:
            data["adherence"] = adherence
        self.bus.publish(TrainingEvent("sample", self.step, cfg.steps, data=data))
        return paths

    @contextlib.contextmanager
    def _ema_weights(self):
        """The EMA weights in place of the trained ones, for the duration (nothing to swap without an EMA)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, dict]:
        return self.target.state_dict()

    def save_checkpoint(self) -> Path:
        path = self.output_dir / CHECKPOINT
        state = {
            "step": self.step,
            "config": self.config.model_dump(mode="json", exclude={"steps"}),
            "trainable": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": {"generator": self.generator.get_state()},  # the run's own; the global RNG isn't the run's
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
        self.target.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.device)
        # Checkpoints written before the trainer stopped touching the global RNG also carry its state under "torch";
        # it is ignored (never restored into the process): the loop draws nothing from the global RNG, so those
        # checkpoints still resume exactly.
        self.generator.set_state(state["rng"]["generator"])
        self.step = state["step"]
        self._set_state("resumed")
        return True

    # -- output ---------------------------------------------------------------------------------------------
    def export(self) -> Path:
        """The target's result (EMA weights if kept): full: a diffusers folder `model/`; LoRA: a `lora.safetensors`
        that load_lora_weights reads; ControlNet: a `controlnet/` folder."""
        with self._ema_weights():
            return self.target.export(self.output_dir)

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
