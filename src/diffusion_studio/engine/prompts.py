"""The prompt as A1111 users write it -> text-encoder embeddings, for SD and SDXL.

A1111's attention syntax (`(word:1.2)`, `(word)` x1.1, `[word]` /1.1, nesting, `\\(` escapes), `BREAK` and
prompts longer than 75 tokens are parsed here into (text, weight) fragments (`parse_attention`, a small parser of
A1111's grammar); compel's `EmbeddingsProvider` then does the weighting and the chunking (75-token windows, each
wrapped in BOS/EOS, concatenated). Each BREAK segment is encoded on its own and the segments are concatenated, so
each starts a new chunk, as in A1111.

A plain prompt (no syntax, at most 75 tokens) never comes here: the pipeline encodes the string itself, exactly as
before this module existed (`needs_encoding` decides). Runs of an encoded prompt pass `prompt_embeds`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import functools
import re
from types import SimpleNamespace

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for (word) and [word]
SYNTAX = re.compile(r"[()\[\]\\]|\bBREAK\b")
TOKENS = re.compile(r"""
    \\[()\[\]\\]           # an escaped bracket or backslash: a literal
  | \(|\[                  # opening brackets
  | :\s*([+-]?[.\d]+)\s*\) # ':1.2)' closes a weighted round bracket
  | \)|\]                  # closing brackets
  | [^\\()\[\]:]+          # text
  | [\\:]                  # a lone backslash or colon: text
""", re.VERBOSE)
BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_attention(text: str) -> list[list[tuple[str, float]]]:
    """A1111's prompt grammar -> BREAK segments, each a list of (text, weight) fragments (neighbours of equal weight
    merged). Unclosed brackets apply to the end of the text, as in A1111; unmatched closers are text."""
    fragments: list[list] = []  # [text, weight]; weight None marks a BREAK
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[1] is not None:
                fragment[1] *= factor

    for match in TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            fragments.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:  # '..' and the like: A1111 would fail; keep it as text
                fragments.append([token, 1.0])
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for index, part in enumerate(BREAK.split(token)):
                if index:
                    fragments.append(["", None])
                fragments.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)

    segments: list[list[tuple[str, float]]] = [[]]
    for fragment_text, weight in fragments:
        if weight is None:
            segments.append([])
        elif fragment_text:
            segment = segments[-1]
            if segment and segment[-1][1] == weight:
                segment[-1] = (segment[-1][0] + fragment_text, weight)
            else:
                segment.append((fragment_text, weight))
    return [segment or [("", 1.0)] for segment in segments]


def chunk_tokens(tokenizer) -> int:
    """Prompt tokens per chunk: the tokenizer's length less BOS and EOS (75 for CLIP's 77)."""
    return tokenizer.model_max_length - 2


def token_count(text: str, tokenizer, convert=None) -> int:
    """Tokens of `text` without BOS/EOS (after multi-vector embeddings are expanded by `convert`)."""
    text = convert(text, tokenizer) if convert else text
    return len(tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"])


def needs_encoding(text: str, tokenizer, convert=None) -> bool:
    """True when the pipeline's own encoding would differ from A1111's: attention syntax, BREAK, or more tokens
    than one chunk holds (the pipeline would cut them off)."""
    return bool(SYNTAX.search(text)) or token_count(text, tokenizer, convert) > chunk_tokens(tokenizer)


@functools.cache
def _compel() -> SimpleNamespace:
    """compel and our two providers on its classes, defined on first use: compel imports transformers and
    diffusers (seconds), which a studio needs only once it encodes a prompt, not to start."""
    import torch
    from compel.embeddings_provider import (
        BaseTextualInversionManager,
        EmbeddingsProvider,
        ReturnedEmbeddingsType,
        SplitLongTextMode,
    )

    class _ExpandEmbeddings(BaseTextualInversionManager):
        """A multi-vector textual-inversion token `name` is `name name_1 name_2 ...` (diffusers' convention), by id."""

        def __init__(self, tokenizer):
            self._added = tokenizer.get_added_vocab()  # str -> id
            self._names = {index: token for token, index in self._added.items()}

        def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
            expanded = []
            for token_id in token_ids:
                expanded.append(token_id)
                name, extra = self._names.get(token_id), 1
                while name is not None and f"{name}_{extra}" in self._added:
                    expanded.append(self._added[f"{name}_{extra}"])
                    extra += 1
            return expanded

    class _LayerEmbeddings(EmbeddingsProvider):
        """compel's provider, taking the hidden layer the diffusers pipeline takes for a `clip_skip` (A1111's minus
        one): SD the last layer normalised (or an earlier one through the final layer norm), SDXL the penultimate
        (or an earlier one) un-normalised. No attention mask, as the pipelines pass none to CLIP."""

        def __init__(self, *, skip: int, sdxl: bool, **kwargs):
            super().__init__(**kwargs)
            self.skip, self.sdxl = skip, sdxl

        def _encode_token_ids_to_embeddings(self, token_ids, attention_mask=None):
            output = self.text_encoder(token_ids.to(self.text_encoder.device, torch.long), output_hidden_states=True)
            if self.sdxl:
                return output.hidden_states[-(self.skip + 2)]
            if self.skip == 0:
                return output[0]
            # transformers 5's CLIPTextModel holds the norm itself (diffusers' SD clip_skip path still looks for
            # `.text_model` and fails, so SD runs with clip_skip > 1 always come through here)
            encoder = getattr(self.text_encoder, "text_model", self.text_encoder)
            return encoder.final_layer_norm(output.hidden_states[-(self.skip + 1)])

    return SimpleNamespace(ExpandEmbeddings=_ExpandEmbeddings, LayerEmbeddings=_LayerEmbeddings,
                           ReturnedEmbeddingsType=ReturnedEmbeddingsType, SplitLongTextMode=SplitLongTextMode)


class PromptEncoder:
    """Encodes per-row prompts for one pipeline (SD: one text encoder; SDXL: both, concatenated, pooled from the
    second encoder's first chunk as A1111 does). Call inside the base's adapter gate, so LoRAs on the text encoders
    are the ones the run uses."""

    def __init__(self, pipe, clip_skip: int):
        self.pipe = pipe
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        skip = clip_skip - 1
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if self.sdxl:
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        compel = _compel()
        self.providers = [
            compel.LayerEmbeddings(skip=skip, sdxl=self.sdxl, tokenizer=tokenizer, text_encoder=encoder,
                                   textual_inversion_manager=compel.ExpandEmbeddings(tokenizer), truncate=False,
                                   returned_embeddings_type=compel.ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
                                   split_long_text_mode=compel.SplitLongTextMode.BRUTAL)
            for tokenizer, encoder in pairs
        ]

    def _segment(self, provider, fragments: list[tuple[str, float]]):
        texts, weights = [text for text, _ in fragments], [weight for _, weight in fragments]
        embeds, tokens = provider.get_embeddings_for_weighted_prompt_fragments(
            text_batch=[texts], fragment_weights_batch=[weights], should_return_tokens=True,
            device=provider.text_encoder.device)
        return embeds, tokens

    def encode_one(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeddings [1, 77*n, width], pooled [1, width2] or None) for one prompt."""
        import torch
        segments = parse_attention(text)
        parts, pooled = [], None
        for index, provider in enumerate(self.providers):
            encoded = [self._segment(provider, fragments) for fragments in segments]
            parts.append(torch.cat([embeds for embeds, _ in encoded], dim=1))
            if self.sdxl and index == 1:
                first_chunk = encoded[0][1][0, :provider.max_token_count].unsqueeze(0)
                pooled = provider.text_encoder(first_chunk.to(provider.text_encoder.device))[0]
        return torch.cat(parts, dim=-1), pooled

    def _pad(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rows padded with the empty prompt's embedding to the longest one's chunk count (compel's padding)."""
        import torch
        empty = torch.cat([provider.empty_z for provider in self.providers], dim=-1)
        longest = max(row.shape[1] for row in rows)
        return [torch.cat([row, *[empty.to(row.device, row.dtype)] * ((longest - row.shape[1]) // empty.shape[1])],
                          dim=1) for row in rows]

    def encode(self, prompts: list[str], negatives: list[str], guidance: bool) -> dict:
        """The pipeline's keyword arguments for these rows: prompt_embeds, negative_prompt_embeds (SDXL: and the
        pooled ones). An empty SDXL negative with force_zeros_for_empty_prompt is left to the pipeline (zeros)."""
        import torch
        encoded = [self.encode_one(text) for text in prompts]
        zero_negative = self.sdxl and self.pipe.config.get("force_zeros_for_empty_prompt", False) and \
            not any(negatives)
        if guidance and not zero_negative:
            encoded_negatives = [self.encode_one(text) for text in negatives]
        else:
            encoded_negatives = []
        rows = self._pad([e for e, _ in encoded] + [e for e, _ in encoded_negatives])
        kwargs = {"prompt_embeds": torch.cat(rows[:len(prompts)])}
        if encoded_negatives:
            kwargs["negative_prompt_embeds"] = torch.cat(rows[len(prompts):])
        if self.sdxl:
            kwargs["pooled_prompt_embeds"] = torch.cat([p for _, p in encoded])
            if encoded_negatives:
                kwargs["negative_pooled_prompt_embeds"] = torch.cat([p for _, p in encoded_negatives])
        return kwargs
