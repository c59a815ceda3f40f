"""A small CLIP tokenizer: whole-word tokens for a chosen vocabulary, byte-level characters for everything else.

Real CLIP vocabularies can't be downloaded here. This one is a true CLIP BPE (same pre-tokenizer, `</w>` suffix,
byte-level alphabet), so words outside the vocabulary still encode, one character at a time.
"""

from __future__ import annotations

from transformers import CLIPTokenizer
from tokenizers.pre_tokenizers import ByteLevel

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def build_clip_tokenizer(words: list[str], max_length: int = 77) -> CLIPTokenizer:
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in alphabet + [ch + "</w>" for ch in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        # Merge left to right: c+i -> ci, ci+r -> cir, ..., circl+e</w> -> circle</w>; every step is in the vocab.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = max_length  # without it, truncation overflows (FIELD-NOTES)
    return tokenizer
