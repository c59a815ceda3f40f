"""Textual-inversion embeddings as A1111 users have them: found by name, used when the prompt names them.

Files: A1111 `.pt` (`string_to_param: {"*": [n, width]}`), A1111 `.safetensors` (`emb_params`), diffusers' own
(`{token: tensor}`), and SDXL files (`clip_l` [n, 768] + `clip_g` [n, 1280]). They are loaded into a base with
diffusers' `load_textual_inversion` (SDXL: once per text encoder), once, through the base's gate (the tokenizer is
shared by every run on the base). A multi-vector embedding becomes `name name_1 ...` (diffusers' convention), which
the pipelines' `maybe_convert_prompt` and the prompt encoder both expand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import re
from pathlib import Path

from safetensors import SafetensorError
from tokenizers import AddedToken

from ..config import StudioConfig
from ..requests import RequestError

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


def _folders(config: StudioConfig) -> list[Path]:
    return [Path(config.models_dir) / "embeddings", Path(config.data_dir) / "embeddings"]


def available_embeddings(config: StudioConfig) -> dict[str, Path | None]:
    """name (the word a prompt uses) -> file, or None where sources.py resolves it (`resolve_embedding`, every
    models folder); without sources.py's lister, `<models_dir>/embeddings` and `<data_dir>/embeddings`."""
    from . import sources

    lister = getattr(sources, "list_embeddings", None)
    if lister and getattr(sources, "resolve_embedding", None):
        return {Path(name).name: None for name in lister(config)}  # "sub/word" is used as "word"
    found: dict[str, Path | None] = {}
    for folder in _folders(config):
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.suffix in EMBEDDING_SUFFIXES:
                    found.setdefault(path.stem, path)
    return found


def embedding_file(name: str, found: dict[str, Path | None], config: StudioConfig) -> Path:
    from . import sources

    return found[name] or Path(sources.resolve_embedding(name, config))


def named_in(texts: list[str], names) -> list[str]:
    """The embedding names that appear in the texts as words (A1111 matches whole words, not substrings)."""
    wanted = []
    for name in names:
        pattern = re.compile(rf"(?<!\w){re.escape(name)}(?!\w)")
        if any(pattern.search(text) for text in texts):
            wanted.append(name)
    return sorted(wanted)


def read_embedding(name: str, path: Path) -> dict[str, torch.Tensor]:
    """{"clip_l": [n, width]} (SD files) or {"clip_l": ..., "clip_g": ...} (SDXL files)."""
    import torch
    from safetensors.torch import load_file
    try:
        if path.suffix == ".safetensors":
            data = load_file(str(path), device="cpu")
        else:  # weights only: a pickle that needs code to load is refused
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
        raise RequestError("prompt", f"embedding '{name}' can't be read ({type(exc).__name__}: "
                                     f"{str(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise RequestError("prompt", f"embedding '{name}' is not a textual-inversion file")
    if "clip_l" in data and "clip_g" in data:
        return {"clip_l": _matrix(data["clip_l"]), "clip_g": _matrix(data["clip_g"])}
    if "string_to_param" in data:
        params = data["string_to_param"]
        return {"clip_l": _matrix(params.get("*", next(iter(params.values()))))}
    if "emb_params" in data:
        return {"clip_l": _matrix(data["emb_params"])}
    tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
    if len(tensors) == 1:  # diffusers' {token: tensor}
        return {"clip_l": _matrix(tensors[0])}
    raise RequestError("prompt", f"embedding '{name}' is not a textual-inversion file (no string_to_param, "
                                 f"emb_params or clip_l/clip_g; keys: {', '.join(list(data)[:6])})")


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().float()
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def _width(encoder) -> int:
    return encoder.get_input_embeddings().weight.shape[1]


def load_into(pipe, name: str, path: Path, model_name: str) -> None:
    """Add embedding `name` to the pipeline's tokenizers and text encoders (call with no run in flight)."""
    vectors = read_embedding(name, path)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    widths = [_width(pipe.text_encoder)] + ([_width(pipe.text_encoder_2)] if sdxl else [])
    file_widths = [vectors["clip_l"].shape[1]] + ([vectors["clip_g"].shape[1]] if "clip_g" in vectors else [])
    if sdxl != ("clip_g" in vectors) or widths != file_widths:
        file_kind = "SDXL" if "clip_g" in vectors else "SD"
        model_kind = "SDXL" if sdxl else "SD"
        raise RequestError("prompt", f"embedding '{name}' is for {file_kind} "
                                     f"({'+'.join(map(str, file_widths))} wide); '{model_name}' is {model_kind} "
                                     f"({'+'.join(map(str, widths))} wide)")
    targets = [(vectors["clip_l"], pipe.tokenizer, pipe.text_encoder)]
    if sdxl:
        targets.append((vectors["clip_g"], pipe.tokenizer_2, pipe.text_encoder_2))
    for index, (tensor, tokenizer, encoder) in enumerate(targets):
        if index and tokenizer is targets[0][1]:
            raise RequestError("prompt", f"'{model_name}' shares one tokenizer between its text encoders; "
                                         "SDXL embeddings need one each")
        try:
            pipe.load_textual_inversion(tensor, token=name, tokenizer=tokenizer, text_encoder=encoder)
        except ValueError as exc:  # e.g. the name is already a word of the tokenizer
            raise RequestError("prompt", f"embedding '{name}' can't be added: {exc}") from None
        whole_words_only(tokenizer, name)


def whole_words_only(tokenizer, name: str) -> None:
    """An added token matches inside longer words ('style' in 'stylex'); A1111 matches whole words only, and a
    prompt that doesn't name the embedding must encode as it did before it was loaded."""
    vectors = re.compile(rf"{re.escape(name)}(_\d+)?")
    tokens = []
    for token in tokenizer.added_tokens_decoder.values():
        if vectors.fullmatch(token.content) and not token.special:
            tokens.append(AddedToken(token.content, single_word=True, lstrip=token.lstrip, rstrip=token.rstrip,
                                     normalized=token.normalized))
    tokenizer.add_tokens(tokens)
