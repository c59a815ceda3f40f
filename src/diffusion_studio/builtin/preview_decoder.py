"""A tiny preview decoder for the built-ins' VAE, TAESD-style: in-loop latents -> RGB at the full image size.

The built-ins share one VAE (builtin:shapes and builtin:shapes-xl have byte-identical vae/ folders). The decoder is
distilled from that VAE's own decode on the shapes world: clean latents of shapes-world images and the latents the
denoising loop really produces at every step (noisy ones included), so mid-run previews look like what the real
decode of those latents would show. Its weights, with the VAE's fingerprint they were trained against, live in
`models/shapes/vae/preview_decoder.safetensors`; `decoder_for(vae)` loads them only for a VAE with that config and
those weights (a retrained VAE or another model's VAE gets None, whatever it is called).

    python -m diffusion_studio.builtin.preview_decoder --train [--steps 6000] [--work-dir DIR] [--resume]

trains it on one CPU thread in minutes, checkpointing to the work dir, and writes the weights file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import threading
import time
from pathlib import Path

import torch
from torch import nn

DECODER_FILE = Path(__file__).parent / "models" / "shapes" / "vae" / "preview_decoder.safetensors"
# The config keys that fix a VAE's latent space layout and decoder shape; all must match.
CONFIG_KEYS = ("latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups", "scaling_factor")
# Weight statistics that identify the trained VAE: sums survive dtype and device changes (fp16/bf16 copies, GPU),
# which a byte hash would not; another VAE, even one trained the same way, differs far beyond the tolerance.
FINGERPRINT_TENSORS = ("post_quant_conv.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
                       "decoder.conv_norm_out.weight")
FINGERPRINT_RTOL = 1e-2


class _Block(nn.Module):
    """Two 3x3 convolutions with a residual connection (TAESD's block, one conv shorter)."""

    def __init__(self, width: int):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.convs(x) + x)


class TinyPreviewDecoder(nn.Module):
    """In-loop latents (already multiplied by the VAE's scaling factor) -> images in [-1, 1], `upscale` times the
    latents' size. Stateless in forward, so one instance serves several threads at once.

    Most of the work is at latent size (two blocks), one block after each 2x upsampling, and the last 2x (or more)
    is a pixel shuffle of 3 x shuffle**2 channels: at 64 px this costs a sixth of the built-in VAE's decode
    (bench/previews.py), where a block at full size would cost a third."""

    def __init__(self, latent_channels: int = 4, widths: tuple[int, ...] = (32, 16), upscale: int = 4):
        super().__init__()
        self.latent_channels, self.widths, self.upscale = latent_channels, tuple(widths), upscale
        shuffle = upscale // 2 ** (len(widths) - 1)
        if shuffle < 1 or shuffle * 2 ** (len(widths) - 1) != upscale:
            raise ValueError(f"upscale {upscale} is not 2**{len(widths) - 1} (one per width after the first) "
                             "times a whole pixel-shuffle factor")
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, widths[0], 3, padding=1), nn.ReLU(),
                                   _Block(widths[0]), _Block(widths[0])]
        for before, after in zip(widths, widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(before, after, 3, padding=1),
                       nn.ReLU(), _Block(after)]
        layers += [nn.Conv2d(widths[-1], 3 * shuffle**2, 3, padding=1), nn.PixelShuffle(shuffle)]
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # Early in the loop latents are mostly noise of std ~100; a soft clamp (as TAESD's) keeps them in range.
        return self.layers(torch.tanh(latents / 6) * 6).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# Identifying the VAE it was trained for


def vae_config(vae) -> dict:
    """The VAE's config values that fix its latent space's layout and its decoder's shape."""
    return {key: _plain(getattr(vae.config, key, None)) for key in CONFIG_KEYS}


def vae_weight_stats(vae) -> dict[str, list[float]] | None:
    """Sum, abs sum and square sum of a few decoder weights (None if the VAE lacks one of them)."""
    state = dict(vae.named_parameters())
    if not all(name in state for name in FINGERPRINT_TENSORS):
        return None
    stats = {}
    for name in FINGERPRINT_TENSORS:
        tensor = state[name].detach().cpu().double()  # on the CPU: MPS has no float64
        stats[name] = [tensor.sum().item(), tensor.abs().sum().item(), tensor.square().sum().item()]
    return stats


def vae_fingerprint(vae) -> dict:
    return {"config": vae_config(vae), "weights": vae_weight_stats(vae)}


def is_vae_of(vae, fingerprint: dict) -> bool:
    """Whether `vae` is the VAE `fingerprint` was taken of: the same config, and weights within FINGERPRINT_RTOL."""
    if vae_config(vae) != fingerprint["config"]:  # first, as it is cheap: a real SD VAE stops here
        return False
    found = vae_weight_stats(vae)
    return found is not None and all(
        math.isclose(a, b, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-3)
        for name, values in fingerprint["weights"].items() for a, b in zip(found[name], values))


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return round(value, 6) if isinstance(value, float) else value


# ---------------------------------------------------------------------------------------------------------------
# Loading

_loaded: dict[tuple[str, str], tuple[TinyPreviewDecoder, dict]] = {}
_load_lock = threading.Lock()


def load_decoder(path: Path = DECODER_FILE, device: str | torch.device = "cpu") -> tuple[TinyPreviewDecoder, dict]:
    """The decoder in `path` (eval mode, no gradients, float32 on `device`) and its metadata; loaded once each."""
    from safetensors import safe_open

    key = (str(path), str(device))
    with _load_lock:
        if key not in _loaded:
            with safe_open(str(path), framework="pt") as file:
                metadata = json.loads(file.metadata()["preview_decoder"])
                weights = {name: file.get_tensor(name).float() for name in file.keys()}
            decoder = TinyPreviewDecoder(metadata["latent_channels"], tuple(metadata["widths"]), metadata["upscale"])
            decoder.load_state_dict(weights)
            decoder.requires_grad_(False).eval().to(device)
            _loaded[key] = (decoder, metadata)
        return _loaded[key]


def decoder_for(vae, path: Path = DECODER_FILE) -> TinyPreviewDecoder | None:
    """The trained decoder when `vae` is the VAE it was distilled from (by config and weights), else None.
    The decoder is placed on the VAE's device."""
    if not path.is_file():
        return None
    try:
        device = next(vae.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return None
    _, metadata = load_decoder(path)  # the CPU copy's metadata: nothing goes to the VAE's device unless it matches
    return load_decoder(path, device)[0] if is_vae_of(vae, metadata["vae"]) else None


# ---------------------------------------------------------------------------------------------------------------
# Training (distillation of the built-in VAE's decode)


def _images_tensor(images) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def build_dataset(pipe, clean: int, trajectories: int, seed: int = 0, log=print) -> dict[str, torch.Tensor]:
    """Latents (as in the loop) and the real VAE's decode of each (uint8): `clean` encoded shapes-world images,
    and every step's latents of `trajectories` generations at mixed step counts and guidance."""
    from .shapes import ShapesWorld

    vae, factor = pipe.vae, pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    world = ShapesWorld(seed=seed + 1)
    latents = []
    started = time.perf_counter()
    for start in range(0, clean, 64):
        images, _ = world.batch(min(64, clean - start))
        dist = vae.encode(_images_tensor(images)).latent_dist
        # Half the posterior's mean, half samples from it: the UNet's results lie near both.
        latents += [dist.mean * factor, dist.sample(generator) * factor]
    log(f"encoded {clean} shapes-world images ({time.perf_counter() - started:.0f} s)")
    rng = random.Random(seed)
    steps_choices = (4, 6, 8, 12, 20, 30)
    for index in range(0, trajectories, 8):
        _, captions = world.batch(8)
        collected = []

        def keep(pipeline, step, timestep, kwargs):
            collected.append(kwargs["latents"].clone())
            return kwargs

        pipe(captions, height=64, width=64, num_inference_steps=rng.choice(steps_choices),
             guidance_scale=rng.uniform(3.0, 8.0), generator=torch.Generator().manual_seed(seed + index),
             callback_on_step_end=keep, output_type="latent")
        latents += collected
        log(f"trajectories {index + 8}/{trajectories} ({time.perf_counter() - started:.0f} s)")
    latents = torch.cat(latents)
    targets = torch.cat([vae.decode(chunk / factor).sample for chunk in latents.split(64)])
    log(f"decoded {len(latents)} latents ({time.perf_counter() - started:.0f} s)")
    return {"latents": latents, "targets": ((targets.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)}


def train(work_dir: Path, steps: int, resume: bool, out: Path, clean: int, trajectories: int,
          batch: int = 32, learning_rate: float = 2e-3, eval_every: int = 250, log=print) -> dict:
    """Distil the built-in VAE's decode into a TinyPreviewDecoder; checkpoint in `work_dir`; write `out`."""
    from diffusers import StableDiffusionPipeline

    from .catalog import COMMITTED_DIR

    work_dir.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(COMMITTED_DIR / "shapes")
    pipe.set_progress_bar_config(disable=True)
    data_file, checkpoint_file = work_dir / "dataset.pt", work_dir / "checkpoint.pt"
    if data_file.is_file():
        data = torch.load(data_file)
    else:
        data = build_dataset(pipe, clean, trajectories, log=log)
        torch.save(data, data_file)
    count = len(data["latents"])
    held_out = torch.arange(0, count, 10)  # every tenth sample, to watch for over-fitting
    training = torch.tensor([i for i in range(count) if i % 10])

    torch.manual_seed(0)
    decoder = TinyPreviewDecoder(pipe.vae.config.latent_channels, widths=(32, 16),
                                 upscale=2 ** (len(pipe.vae.config.block_out_channels) - 1))
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=learning_rate, weight_decay=0.0)
    step, best = 0, float("inf")
    if resume and checkpoint_file.is_file():
        checkpoint = torch.load(checkpoint_file)
        decoder.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, best = checkpoint["step"], checkpoint["best"]
        log(f"resumed at step {step} (best held-out L1 {best:.4f})")

    def held_out_l1() -> float:
        with torch.no_grad():
            errors = [(decoder(data["latents"][chunk]) - data["targets"][chunk].float() / 127.5 + 1).abs().mean()
                      for chunk in held_out.split(256)]
        return float(torch.stack(errors).mean())

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(step)
    while step < steps:
        # Cosine from learning_rate to 5% of it.
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        if step % eval_every == 0 or step == steps - 1:
            error = held_out_l1()
            best = min(best, error)
            torch.save({"model": decoder.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "best": best, "config": {"steps": steps, "batch": batch, "lr": learning_rate}},
                       checkpoint_file)
            log(f"step {step}: held-out L1 {error:.4f} ({time.perf_counter() - started:.0f} s)")
        chosen = training[torch.randint(len(training), (batch,), generator=generator)]
        target = data["targets"][chosen].float() / 127.5 - 1
        loss = (decoder(data["latents"][chosen]) - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    error = held_out_l1()
    save_decoder(decoder, pipe.vae, out, {"steps": steps, "held_out_l1": round(error, 5), "samples": count,
                                          "train_s": round(time.perf_counter() - started, 1)})
    log(f"done: held-out L1 {error:.4f} (in [-1, 1]); wrote {out} ({out.stat().st_size} bytes)")
    return {"held_out_l1": error}


def save_decoder(decoder: TinyPreviewDecoder, vae, out: Path, training: dict) -> None:
    from safetensors.torch import save_file

    metadata = {"latent_channels": decoder.latent_channels, "widths": list(decoder.widths), "upscale": decoder.upscale,
                "vae": vae_fingerprint(vae), "training": training}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in decoder.state_dict().items()}, str(out),
              metadata={"preview_decoder": json.dumps(metadata)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="train and write the weights file")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--clean", type=int, default=1536, help="shapes-world images to encode")
    parser.add_argument("--trajectories", type=int, default=192, help="generations whose every step is kept")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/preview-decoder"))
    parser.add_argument("--resume", action="store_true", help="continue from the work dir's checkpoint")
    parser.add_argument("--out", type=Path, default=DECODER_FILE)
    args = parser.parse_args(argv)
    if not args.train:
        parser.print_help()
        return 2
    torch.set_num_threads(1)  # a background job on a shared machine: one core
    train(args.work_dir, args.steps, args.resume, args.out, args.clean, args.trajectories)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
