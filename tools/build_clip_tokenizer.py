"""Build CLIP's tokenizer files (vocab.json + merges.txt, as Hugging Face's openai/clip-vit-large-patch14 ships
them) from the BPE vocabulary in the `open_clip_torch` wheel on PyPI: never from a model hub.

    .venv/bin/python tools/build_clip_tokenizer.py [--wheel open_clip_torch-3.3.0-py3-none-any.whl] [--out DIR]

Without --wheel it runs `pip download open_clip_torch==3.3.0 --no-deps`. The vocabulary is read through open_clip's
own `SimpleTokenizer` (its tokenizer.py, imported as a lone module file, not the open_clip package, which pulls in
torchvision), so the ids are exactly the ones OpenAI's and open_clip's tokenizers give. The output is committed in
src/diffusion_studio/engine/model_configs/clip_tokenizer/; tests/test_tokenizer_files.py checks a rebuild equals it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

WHEEL = "open_clip_torch==3.3.0"
MEMBERS = ("open_clip/tokenizer.py", "open_clip/bpe_simple_vocab_16e6.txt.gz")
OUT = Path(__file__).resolve().parents[1] / "src/diffusion_studio/engine/model_configs/clip_tokenizer"
# open_clip names the special tokens <start_of_text>/<end_of_text>; Hugging Face's files use these (same ids).
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def download_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", str(folder)], check=True)
    return next(folder.glob("open_clip_torch-*.whl"))


def load_simple_tokenizer_module(wheel: Path, folder: Path) -> types.ModuleType:
    """open_clip's tokenizer.py from the wheel, with its BPE file beside it (it reads that at import)."""
    with zipfile.ZipFile(wheel) as archive:
        for member in MEMBERS:
            (folder / Path(member).name).write_bytes(archive.read(member))
    if "ftfy" not in sys.modules and importlib.util.find_spec("ftfy") is None:
        # ftfy only repairs mojibake in the text being encoded (basic_clean); building the vocabulary never calls it.
        sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda text: text)
    spec = importlib.util.spec_from_file_location("open_clip_simple_tokenizer", folder / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokenizer_files(module: types.ModuleType) -> tuple[str, str]:
    """(vocab.json, merges.txt) text: 256 byte characters, the same with </w>, each merge joined, then the two
    special tokens (49406, 49407); merges.txt is `#version: 0.2` and one merge per line, in rank order."""
    tokenizer = module.SimpleTokenizer(bpe_path=str(Path(module.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")))
    vocab = {HF_SPECIAL.get(token, token): index for token, index in tokenizer.encoder.items()}
    assert list(vocab.values()) == list(range(len(vocab))) and len(vocab) == 49408, "unexpected vocabulary"
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    vocab_text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    merges_text = "#version: 0.2\n" + "".join(f"{first} {second}\n" for first, second in merges)
    return vocab_text, merges_text


def build(out: Path, wheel: Path | None = None) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        module = load_simple_tokenizer_module(wheel or download_wheel(scratch), scratch)
        vocab_text, merges_text = tokenizer_files(module)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a downloaded open_clip_torch wheel (else pip downloads it)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    print(build(args.out, args.wheel))


if __name__ == "__main__":
    main()
