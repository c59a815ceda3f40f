"""TrainConfig: every knob of a training run, validated like a generation request (errors name the field)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# LoRA targets (UNet module-name endings): every attention projection, or only what the prompt writes into the
# image, the cross-attention keys and values (Custom Diffusion's choice), which disturbs other prompts least.
LORA_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
LORA_CROSS_ATTENTION_KV = ("attn2.to_k", "attn2.to_v")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field("builtin:shapes", description="model whose weights start the run (or give the architecture)")
    method: Literal["full", "lora", "controlnet"] = Field(
        "lora", description="full: UNet (+ text encoder); lora: adapters on the UNet's lora_layers (+ text "
                            "encoder); controlnet: a canny or inpainting ControlNet beside a frozen base")
    train_text_encoder: bool = Field(False, description="also train the text encoder(s): all their weights (full) "
                                                         "or LoRA adapters on their attention (lora)")
    dataset: str = Field("shapes", description="'shapes' (shapes world) or a folder of images")
    instance_prompt: str | None = Field(None, description="caption for images without a .txt caption file")
    resolution: int = Field(64, ge=8, le=2048, multiple_of=8)
    steps: int = Field(500, ge=1, le=10_000_000)
    batch_size: int = Field(8, ge=1, le=1024)
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    lora_rank: int = Field(8, ge=1, le=256)
    lora_alpha: float = Field(8.0, gt=0)
    lora_layers: list[str] = Field(
        default_factory=lambda: list(LORA_ATTENTION), min_length=1,
        description="UNet modules the LoRA adapts (names or name endings, as diffusers' --lora_layers), e.g. "
                    "LORA_ATTENTION or LORA_CROSS_ATTENTION_KV")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    checkpoint_every: int = Field(100, ge=1)
    sample_every: int = Field(0, ge=0, description="0: no samples while training")
    sample_prompts: list[str] = Field(default_factory=lambda: ["a red circle on a white background"])
    sample_steps: int = Field(20, ge=1, le=150)
    min_snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR loss weighting (None: plain MSE)")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of empty captions, for guidance")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the weights (not for LoRA)")
    max_grad_norm: float = Field(1.0, gt=0)
    pool_size: int = Field(4096, ge=1, description="shapes world: samples encoded once and drawn from")
    control_type: Literal["canny", "inpaint"] = Field(
        "canny", description="controlnet: what it learns to follow: canny edges, or the masked image (inpainting)")
    canny_thresholds: tuple[int, int] = Field((100, 200), description="controlnet: the canny thresholds (low, "
                                              "high) that make the training control maps")
    output_dir: Path = Path("data/training/run")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps: must be smaller than steps ({self.steps})")
        if self.method == "controlnet" and self.train_text_encoder:
            raise ValueError("train_text_encoder: not with method 'controlnet' (it trains beside a frozen base)")
        low, high = self.canny_thresholds
        if not 0 <= low <= high <= 255:
            raise ValueError("canny_thresholds: need 0 <= low <= high <= 255")
        if self.ema_decay is not None and self.method == "lora":
            raise ValueError("ema_decay: only with method 'full' or 'controlnet'")
        return self
