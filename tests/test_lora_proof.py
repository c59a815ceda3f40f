"""A short LoRA proof (bench/lora_proof.py runs the full one): fine-tuning builtin:shapes on 8 images of a shape
it has never drawn ("heart", beside ordinary images for prior preservation) makes heart prompts draw hearts,
which the base model never does, and base prompts keep working."""

from diffusion_studio.workshop.quality import lora_proof


def test_a_lora_teaches_the_built_in_model_a_new_shape(tmp_path, data_dir):
    result = lora_proof(tmp_path, data_dir, steps=400, prompts=6, weights=(0.0, 1.0))
    base, with_lora = result[0.0], result[1.0]
    assert with_lora["heart"] >= 2 / 6 and with_lora["heart"] > base["heart"], result
    assert with_lora["base_kept"] >= 3 / 6, result
