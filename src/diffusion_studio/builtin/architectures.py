"""Small standard diffusers architectures: the built-in models' shapes, and the tiny models tests build.

Everything here is a stock diffusers/transformers class with a small config, so a saved model loads through
exactly the code a hub model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import build_clip_tokenizer

# The shapes-world caption vocabulary (issue: built-in models); other words still encode character by character.
SHAPES_WORDS = (
    "a an on the at in of background "
    "circle square triangle star "
    "red green blue yellow purple orange white black gray "
    "top bottom left right center"
).split()


@dataclass(frozen=True)
class TinySize:
    """Channel widths for a tiny model; `vae_levels` sets the VAE's downsampling (2**(levels-1))."""

    image_px: int = 64
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (32, 64)
    text_width: int = 32
    text_layers: int = 2
    attention_levels: tuple[int, ...] | None = None  # UNet levels with cross-attention (None: all but the last)
    # Pool the text into the time embedding too (UNet addition_embed_type="text"): every ResNet block then sees
    # the caption, which teaches global attributes (colour, background) far faster than cross-attention alone.
    global_text: bool = False
    # GroupNorm with few channels per group normalises each channel over the image, which erases the absolute
    # colour of flat regions: fatal for flat-colour shapes. The built-ins use few, wide groups.
    vae_norm_groups: int = 16
    unet_norm_groups: int = 16

    def down_blocks(self) -> tuple[str, ...]:
        levels = len(self.unet_channels)
        attention = self.attention_levels if self.attention_levels is not None else tuple(range(levels - 1))
        return tuple("CrossAttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels))

    def up_blocks(self) -> tuple[str, ...]:
        return tuple(kind.replace("Down", "Up") for kind in reversed(self.down_blocks()))

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


# The built-in models' size: ~2.6 M-parameter UNet on 16x16x4 latents of 64 px images (VAE x4), trainable on CPU.
BUILTIN_SIZE = TinySize(image_px=64, vae_channels=(16, 32, 64), unet_channels=(32, 64, 96), text_width=64,
                        text_layers=2, attention_levels=(1, 2), global_text=True, vae_norm_groups=1,
                        unet_norm_groups=8)


def builtin_scheduler() -> EulerDiscreteScheduler:
    """DDPM's linear schedule (terminal SNR 4e-5), sampled from t=999 ("trailing"), predicting v.

    Why not SD's scaled_linear: its last step keeps 6.8% of the image (terminal SNR 0.005). On 16x16 latents a
    shape still shows through that noise, so the model learns to find the shape's position *in the noise* instead
    of reading it from the prompt: trained that way to 5,900 steps, sampled positions were identical for every
    prompt and followed the seed alone (Lin et al. 2024, "Common Diffusion Noise Schedules ... are Flawed").
    Why v: where only the prompt can say where the shape goes (almost pure noise), predicting the noise teaches
    position through a tiny term of the loss, while v there is nearly the clean image itself."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        timestep_spacing="trailing", steps_offset=1, prediction_type="v_prediction",  # offset: unused by "trailing"
    )


def _vae(size: TinySize) -> AutoencoderKL:
    levels = len(size.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=size.vae_norm_groups,
        block_out_channels=size.vae_channels, sample_size=size.image_px,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
    )


def _text_config(size: TinySize, vocab_size: int, tokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=size.text_width, intermediate_size=size.text_width * 2, num_attention_heads=4,
        num_hidden_layers=size.text_layers, vocab_size=vocab_size, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_sd_pipeline(seed: int = 0, size: TinySize = TinySize()) -> StableDiffusionPipeline:
    """A randomly initialised SD-architecture pipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(list(SHAPES_WORDS))
    text_encoder = CLIPTextModel(_text_config(size, len(tokenizer), tokenizer))
    global_text = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if size.global_text else {}
    unet = UNet2DConditionModel(
        sample_size=size.image_px // size.vae_factor, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=size.unet_channels, norm_num_groups=size.unet_norm_groups,
        cross_attention_dim=size.text_width, attention_head_dim=4, down_block_types=size.down_blocks(), up_block_types=size.up_blocks(), **global_text,
    )
    return StableDiffusionPipeline(
        vae=_vae(size), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=builtin_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl_pipeline(seed: int = 0, size: TinySize = TinySize(), vae: AutoencoderKL | None = None
                        ) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL-architecture pipeline: two text encoders and text_time conditioning.
    `vae`: reuse an autoencoder (the built-ins share the one trained for the shapes world)."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(list(SHAPES_WORDS))
    text_encoder = CLIPTextModel(_text_config(size, len(tokenizer), tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(size, len(tokenizer), tokenizer, projection_dim=size.text_width)
    )
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=size.image_px // size.vae_factor, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=size.unet_channels, norm_num_groups=size.unet_norm_groups,
        cross_attention_dim=size.text_width * 2,
        attention_head_dim=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        # six micro-conditioning numbers (original size, crop, target size), each embedded, + pooled text.
        projection_class_embeddings_input_dim=6 * time_embed_dim + size.text_width,
        down_block_types=size.down_blocks(), up_block_types=size.up_blocks(),
    )
    return StableDiffusionXLPipeline(
        vae=vae if vae is not None else _vae(size), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=builtin_scheduler(), force_zeros_for_empty_prompt=True,
    )


def build_controlnet(unet: UNet2DConditionModel, vae_factor: int, seed: int = 0) -> ControlNetModel:
    """A ControlNet shaped like `unet` (SD or SDXL); its condition encoder downsamples as much as the VAE does."""
    torch.manual_seed(seed)
    levels = vae_factor.bit_length()  # factor 4 -> 3 widths -> two stride-2 convolutions
    widths = tuple(16 * 2**i for i in range(levels))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)
    # from_unet copies the UNet's weights and zero-inits the outputs; a stand-in should visibly do something.
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.02)
    return controlnet
