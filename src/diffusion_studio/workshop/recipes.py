"""How the built-in models are made: `diffusion-studio train builtin --name shapes`.

shapes: (1) autoencoder on shapes-world images, its posterior pinned to the mean, (2) its scaling factor so
latents have unit variance, (3) UNet + text encoder from scratch with the studio's Trainer, (4) the pipeline saved
to builtin/models/shapes.
Every stage checkpoints into the work folder and resumes from it, so a run killed at any point picks up where it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from ..builtin.architectures import BUILTIN_SIZE, build_sd_pipeline, build_sdxl_pipeline, builtin_scheduler
from ..builtin.catalog import COMMITTED_DIR
from ..builtin.shapes import ShapesWorld
from ..training.config import TrainConfig
from ..training.data import encode, to_tensor
from ..training.events import EventBus, JsonlLog, TrainingEvent
from ..training.trainer import Trainer, TrainingError

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = [
    "a red circle on a white background",
    "a blue square on a black background at the top left",
    "a yellow triangle on a gray background in the center",
    "a green star on a white background at the bottom right",
    "a purple circle on a gray background at the top right",
    "a orange square on a black background at the bottom left",
    "a blue star on a gray background",
    "a red triangle on a black background in the center",
]
PROGRESS_FILE = "training.json"  # how far the installed weights were trained
TOKENS = 24  # longest caption is 14 tokens; shorter padding keeps text and cross-attention cheap


def foreground_weight(pixels: torch.Tensor, weight: float = 10.0) -> torch.Tensor:
    """Per-pixel loss weight: `weight` where a pixel differs from the image's border colour, else 1. The shape
    is a tenth of the pixels; unweighted, the autoencoder spends its first thousand steps on backgrounds."""
    border = torch.cat([pixels[:, :, :2].flatten(2), pixels[:, :, -2:].flatten(2)], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    return 1 + (weight - 1) * ((pixels - background).abs().amax(dim=1, keepdim=True) > 0.2).float()


def train_vae(vae, work: Path, steps: int, bus: EventBus, batch: int = 16, lr: float = 1e-3) -> None:
    """Autoencoder stage: foreground-weighted L1 + MSE on reconstructions from the posterior mean, a whisper of
    KL (the UNet trains on means, so the decoder must be good at exactly those)."""
    path = work / "vae-checkpoint.pt"
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    world, step = ShapesWorld(seed=1), 0
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        world.rng.setstate(state["world"])
    vae.train()
    started = time.perf_counter()
    while step < steps:
        images, _ = world.batch(batch)
        pixels = to_tensor(images).to(vae.device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.mean).sample
        error = reconstruction - pixels
        loss = (foreground_weight(pixels) * (error.abs() + error.pow(2))).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        elapsed = time.perf_counter() - started
        bus.publish(TrainingEvent("step", step, steps, loss=loss.item(), message="vae", eta_s=None))
        if step % 100 == 0 or step == steps:
            scratch = path.with_suffix(".tmp")
            torch.save({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "world": world.rng.getstate()}, scratch)
            os.replace(scratch, path)
            log.info("vae step %d/%d loss %.4f (%.0fs)", step, steps, loss.item(), elapsed)
    vae.eval()


def pin_posterior(vae, log_variance: float = -30.0) -> None:
    """Make the encoder's posterior its mean. diffusers' img2img and inpainting pipelines encode their input by
    *sampling* the posterior, and an autoencoder trained with a whisper of KL keeps its std near 1 there: noise as
    large as the latents themselves, while the UNet learned from means. The log-variance half of `quant_conv` is
    set to a constant at the floor `DiagonalGaussianDistribution` clamps to (std 3e-7); the means are untouched."""
    channels = vae.quant_conv.out_channels // 2
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = log_variance


def set_scaling_factor(vae, count: int = 512) -> float:
    """SD's trick: scale latents to unit variance so the noise schedule fits them."""
    images, _ = ShapesWorld(seed=2).batch(count)
    vae.register_to_config(scaling_factor=1.0)
    latents = encode(vae, images)
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


@dataclass(frozen=True)
class RecipeRun:
    """What `train builtin` was asked for: one object, so that every recipe takes the same arguments."""

    work: Path
    vae_steps: int
    unet_steps: int
    batch_size: int
    bus: EventBus
    device: torch.device
    from_scratch: bool = False
    pool_size: int | None = None  # shapes-world samples encoded once and drawn from; None: the recipe's own


def shapes_config(run: RecipeRun) -> TrainConfig:
    return TrainConfig(
        base="builtin:shapes", method="full", train_text_encoder=True, dataset="shapes", resolution=64,
        steps=run.unet_steps, batch_size=run.batch_size, learning_rate=1e-3, lr_schedule="cosine", warmup_steps=200,
        checkpoint_every=100, sample_every=500, sample_prompts=SAMPLE_PROMPTS, sample_steps=20,
        min_snr_gamma=5.0, caption_dropout=0.1, ema_decay=0.999, pool_size=run.pool_size or 20000,
        output_dir=run.work / "unet",
    )


def _fresh_pipeline(run: RecipeRun):
    torch.manual_seed(0)
    pipe = build_sd_pipeline(seed=0, size=BUILTIN_SIZE).to(run.device)
    pipe.tokenizer.model_max_length = TOKENS
    train_vae(pipe.vae, run.work, run.vae_steps, run.bus)  # 1. autoencoder (loads it when already trained)
    pin_posterior(pipe.vae)
    factor = set_scaling_factor(pipe.vae)  # 2. latent scale
    log.info("vae scaling factor %.4f", factor)
    return pipe


def _resume_or_start(name: str, config: TrainConfig, start, run: RecipeRun) -> Trainer:
    """Once a built-in is installed, its run continues from it: exactly, from the work dir's checkpoint when there
    is one (the installed autoencoder and latent scale stay those the run began with), else warm from the
    installed weights and recorded step (a run continued in a new session, whose checkpoint did not travel).
    Before anything is installed, or when asked `from_scratch`, `start()` builds the pipeline anew."""
    installed = COMMITTED_DIR / name
    if run.from_scratch or not (installed / PROGRESS_FILE).exists():
        return Trainer(config, start(), bus=run.bus, device=run.device)
    pipe = DiffusionPipeline.from_pretrained(installed)
    pipe.scheduler = builtin_scheduler()  # the recipe's noise schedule, even if the installed one is older
    trainer = Trainer(config, pipe, bus=run.bus, device=run.device)
    if not (config.output_dir / "checkpoint.pt").exists():
        trainer.warm_start(json.loads((installed / PROGRESS_FILE).read_text())["unet_step"])
    return trainer


def shapes_trainer(run: RecipeRun) -> Trainer:
    """builtin:shapes: autoencoder, latent scale, then UNet + text encoder from scratch."""
    return _resume_or_start("shapes", shapes_config(run), lambda: _fresh_pipeline(run), run)


def shapes_xl_trainer(run: RecipeRun) -> Trainer:
    """builtin:shapes-xl: SDXL architecture trained from scratch on the shapes world, reusing the autoencoder
    trained for builtin:shapes (same images, so the same latent space; no second VAE stage)."""
    shapes = _trained_shapes("shapes-xl reuses builtin:shapes' autoencoder")

    def start():
        torch.manual_seed(0)
        vae = AutoencoderKL.from_pretrained(shapes, subfolder="vae")
        pin_posterior(vae)  # already pinned when shapes was trained after the fix; idempotent
        pipe = build_sdxl_pipeline(seed=0, size=BUILTIN_SIZE, vae=vae)
        pipe.tokenizer.model_max_length = pipe.tokenizer_2.model_max_length = TOKENS
        return pipe

    config = shapes_config(run).model_copy(update={"base": "builtin:shapes-xl"})
    return _resume_or_start("shapes-xl", config, start, run)


def _trained_shapes(needed_by: str, base: str = "shapes") -> Path:
    """The installed builtin:<base> folder, which other recipes build on (`needed_by` says why, for the error)."""
    folder = COMMITTED_DIR / base
    if not folder.is_dir():
        raise TrainingError(f"name: {needed_by}; train {base} first")
    return folder


def _controlnet_trainer(name: str, run: RecipeRun, base: str = "shapes", **settings) -> Trainer:
    """A ControlNet beside the frozen builtin:<base> (`settings`: what it learns to follow)."""
    shapes = _trained_shapes(f"{name} is trained beside builtin:{base}", base)
    config = TrainConfig(
        base=f"builtin:{base}", method="controlnet", dataset="shapes", resolution=64, steps=run.unet_steps,
        batch_size=run.batch_size, learning_rate=3e-4, lr_schedule="cosine", warmup_steps=100, checkpoint_every=100,
        sample_every=500, sample_prompts=SAMPLE_PROMPTS[:4], sample_steps=20, min_snr_gamma=5.0,
        caption_dropout=0.1, ema_decay=0.999, pool_size=run.pool_size or 8000, output_dir=run.work / "controlnet",
        **settings,
    )
    return Trainer(config, DiffusionPipeline.from_pretrained(shapes), bus=run.bus, device=run.device)


def shapes_canny_trainer(run: RecipeRun) -> Trainer:
    """builtin:shapes-canny: a ControlNet on canny edges of shapes-world images."""
    # Low thresholds: at canny's usual 100/200 a third of the colour pairs (green or blue on gray, yellow on
    # white) give an empty map, and the installed 1,500-step ControlNet learned from those empty maps.
    return _controlnet_trainer("shapes-canny", run, control_type="canny", canny_thresholds=(30, 60))


def shapes_xl_canny_trainer(run: RecipeRun) -> Trainer:
    """builtin:shapes-xl-canny: the same canny ControlNet, beside the SDXL-architecture builtin:shapes-xl."""
    return _controlnet_trainer("shapes-xl-canny", run, base="shapes-xl", control_type="canny",
                               canny_thresholds=(30, 60))


def shapes_inpaint_trainer(run: RecipeRun) -> Trainer:
    """builtin:shapes-inpaint: an inpainting ControlNet (control: the image with its hole marked), which tells the
    non-inpainting UNet what surrounds the hole at every step; builtin:shapes inpaints through it."""
    return _controlnet_trainer("shapes-inpaint", run, control_type="inpaint")


TRAINERS = {"shapes": shapes_trainer, "shapes-canny": shapes_canny_trainer, "shapes-inpaint": shapes_inpaint_trainer,
            "shapes-xl": shapes_xl_trainer, "shapes-xl-canny": shapes_xl_canny_trainer}


def train_builtin(name: str, work: Path, vae_steps: int = 1500, unet_steps: int = 30000, batch_size: int = 64,
                  install: bool = True, bus: EventBus | None = None, snapshot: bool = False,
                  from_scratch: bool = False, device: torch.device | str = "cpu",
                  pool_size: int | None = None) -> Path:
    """Train (or, with `snapshot`, export the latest checkpoint of) built-in `name` on `device`; installs it
    unless told not. A run started on one device resumes on another (checkpoints load onto the CPU first)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    bus = bus or EventBus()
    if snapshot and not any((work / stage / "checkpoint.pt").exists() for stage in ("unet", "controlnet")):
        raise TrainingError(f"work: no checkpoint in '{work}' yet")  # before building: that would train a VAE
    if not snapshot:
        bus.subscribe(JsonlLog(work / "log.jsonl"))
    trainer = TRAINERS[name](RecipeRun(work, vae_steps, unet_steps, batch_size, bus, torch.device(device),
                                       from_scratch, pool_size))
    if snapshot:
        if not trainer.load_checkpoint():
            raise TrainingError(f"work: no checkpoint in '{trainer.output_dir}' yet")
        output, finished = trainer.export(), False
    else:
        output = trainer.run()
        finished = trainer.state == "done"
    if install and output.name in ("model", "controlnet"):  # 4. install as the committed built-in
        return install_builtin(name, output, {"unet_step": trainer.step, "finished": finished})
    return output


def install_builtin(name: str, folder: Path, progress: dict) -> Path:
    target = COMMITTED_DIR / name
    scratch = COMMITTED_DIR / f".{name}.new"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(folder, scratch)
    for config in scratch.rglob("*.json"):  # a pipeline re-saved from a folder records that folder's path
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (scratch / PROGRESS_FILE).write_text(json.dumps(progress) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    return target



