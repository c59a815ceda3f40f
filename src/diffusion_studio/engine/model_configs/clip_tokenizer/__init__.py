"""CLIP's BPE tokenizer files, shipped once for every family (built by tools/build_clip_tokenizer.py from the
vocabulary in the open_clip_torch wheel on PyPI), and the two settings the SD families use them with."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from transformers import CLIPTokenizer

FOLDER = Path(__file__).parent
MAX_LENGTH = 77

# CLIP ViT-L/14 (SD 1.x, SDXL's first encoder) pads with <|endoftext|>; OpenCLIP ViT-H/bigG (SD 2.x, SDXL's second
# encoder) pads with "!" (id 0), as open_clip itself pads with zeros.
PAD_TOKENS = {"clip_l": "<|endoftext|>", "open_clip": "!"}


def clip_tokenizer(kind: Literal["clip_l", "open_clip"]) -> CLIPTokenizer:
    """A new tokenizer each call: textual-inversion embeddings add tokens to the one a pipeline holds."""
    tokenizer = CLIPTokenizer(vocab=str(FOLDER / "vocab.json"), merges=str(FOLDER / "merges.txt"),
                              pad_token=PAD_TOKENS[kind], model_max_length=MAX_LENGTH)
    tokenizer.model_max_length = MAX_LENGTH  # without it truncation overflows (FIELD-NOTES)
    return tokenizer
