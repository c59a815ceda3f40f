"""A short LoRA proof (bench/lora_proof.py runs the full one): fine-tuning builtin:shapes on 8 images of a shape
it has never drawn ("heart", plus 8 ordinary images for prior preservation) makes heart prompts draw hearts,
which the base model never does, and base prompts keep working."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "lora_proof.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("lora_proof", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_lora_teaches_the_built_in_model_a_new_shape(tmp_path, data_dir):
    result = load_bench().prove(tmp_path, data_dir, steps=400, prompts=6)
    assert result["heart"] >= 2 / 6 and result["heart"] > result["heart_without_lora"], result
    assert result["base_kept"] >= 3 / 6, result
