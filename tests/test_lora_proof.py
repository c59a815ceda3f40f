"""A short LoRA proof (bench/lora_proof.py runs the full one): fine-tuning builtin:shapes on 8 images of a shape
it has never drawn ("heart", plus 8 ordinary images for prior preservation) makes heart prompts draw hearts,
which the base model never does, and base prompts keep working."""

from diffusion_studio.builtin.quality import lora_proof


def test_a_lora_teaches_the_built_in_model_a_new_shape(tmp_path, data_dir):
    result = lora_proof(tmp_path, data_dir, steps=400, prompts=6)
    assert result["heart"] >= 2 / 6 and result["heart"] > result["heart_without_lora"], result
    assert result["base_kept"] >= 3 / 6, result
