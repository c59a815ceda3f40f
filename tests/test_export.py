"""Export to the original single-file layout, checked against diffusers' own conversion back.

Round trip on tiny models of every family (the shipped configs, shrunk: same block types, attention levels,
added embeddings, text encoder kinds): diffusers model -> our export -> diffusers' conversion functions -> the same
keys and bit-identical tensors. Detection on the full-size layouts (built on the meta device, no memory):
diffusers' `infer_diffusers_model_type` names each export's variant.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_diffusers_clip_model_from_ldm,
    infer_diffusers_model_type,
)
from full_size import checkpoint_shapes, weights_bytes
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusion_studio.engine.checkpoint import (
    controlnet_to_ldm,
    export_single_file,
    pipeline_to_ldm,
)
from diffusion_studio.engine.model_configs import config_folder

PIPELINES = ("v1", "v2", "v2_base", "inpainting", "inpainting_v2", "xl_base", "xl_inpaint", "xl_refiner")
TEXT_WIDTH = {"text_encoder": 32, "text_encoder_2": 48}  # distinct, as diffusers tells SDXL's two by width
TIME_DIM = 8


def shrink_unet(config: dict, text_dims: int, pooled: int) -> dict:
    """The same UNet/ControlNet structure at toy widths; SDXL's added embedding resized to match."""
    levels = len(config["block_out_channels"])
    layers = config.get("transformer_layers_per_block", 1)
    small = dict(config, block_out_channels=[16 * min(i + 1, 2) for i in range(levels)], norm_num_groups=8,
                 attention_head_dim=2, cross_attention_dim=text_dims, sample_size=8,
                 transformer_layers_per_block=[min(n, 2) for n in layers] if isinstance(layers, list) else min(layers, 2))
    if config.get("addition_embed_type") == "text_time":
        time_ids = (config["projection_class_embeddings_input_dim"] - 1280) // config["addition_time_embed_dim"]
        small.update(addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=time_ids * TIME_DIM + pooled)
    if "conditioning_embedding_out_channels" in config:
        small["conditioning_embedding_out_channels"] = [8, 8, 8, 16]  # 4 stages, as the original's input_hint_block
    return small


def randomize(model):
    """Every weight distinct (not init's ones and zeros), so a swapped or transposed tensor shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model.eval()


def tiny_text_encoder(folder, name):
    config = CLIPTextConfig.from_pretrained(folder / name).to_dict()
    config.update(hidden_size=TEXT_WIDTH[name], intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=1000, bos_token_id=0, eos_token_id=2, projection_dim=24)  # projection != width
    config = CLIPTextConfig(**config)
    with_projection = config.architectures == ["CLIPTextModelWithProjection"]
    return randomize((CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config))


def tiny_pipeline(variant) -> dict:
    folder = config_folder(variant)
    parts = {name: tiny_text_encoder(folder, name) for name in TEXT_WIDTH if (folder / name).exists()}
    text_dims = sum(TEXT_WIDTH[name] for name in parts)  # SDXL concatenates both encoders' hidden states
    pooled = 24 if "text_encoder_2" in parts else 0
    unet_config = shrink_unet(UNet2DConditionModel.load_config(folder / "unet"), text_dims, pooled)
    parts["unet"] = randomize(UNet2DConditionModel.from_config(unet_config))
    vae_config = dict(AutoencoderKL.load_config(folder / "vae"), block_out_channels=[8, 16, 16, 16], norm_num_groups=8)
    parts["vae"] = randomize(AutoencoderKL.from_config(vae_config))
    return parts


def assert_same(converted: dict, model):
    expected = model.state_dict()
    assert sorted(converted) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("variant", PIPELINES)
def test_pipeline_round_trip(variant, tmp_path):
    parts = tiny_pipeline(variant)
    checkpoint = pipeline_to_ldm(**parts)
    assert_same(convert_ldm_unet_checkpoint(checkpoint, parts["unet"].config), parts["unet"])
    assert_same(convert_ldm_vae_checkpoint(checkpoint, parts["vae"].config), parts["vae"])
    for name in TEXT_WIDTH:
        if name in parts:  # through diffusers' own text encoder loading: its detection of which encoder is which
            parts[name].config.save_pretrained(tmp_path / name)
            loaded = create_diffusers_clip_model_from_ldm(type(parts[name]), checkpoint, subfolder=name,
                                                          config=str(tmp_path), local_files_only=True)
            assert_same(loaded.state_dict(), parts[name])


@pytest.mark.parametrize("variant", ["controlnet", "controlnet_xl"])
def test_controlnet_round_trip(variant):
    xl = variant == "controlnet_xl"
    config = shrink_unet(ControlNetModel.load_config(config_folder(variant)), 80 if xl else 32, 24 if xl else 0)
    controlnet = randomize(ControlNetModel.from_config(config))
    checkpoint = controlnet_to_ldm(controlnet)
    assert all(k.startswith("control_model.") for k in checkpoint) != xl
    assert_same(convert_controlnet_checkpoint(checkpoint, controlnet.config), controlnet)


EXPECTED_TYPE = {"v2_base": "v2", "controlnet_xl": "controlnet_xl_large"}  # diffusers' names


@pytest.mark.parametrize("variant", [*PIPELINES, "controlnet", "controlnet_xl"])
def test_full_size_export_is_detected_as_its_variant(variant):
    meta = {name: torch.empty(shape, device="meta") for name, shape in checkpoint_shapes(variant).items()}
    assert infer_diffusers_model_type(meta) == EXPECTED_TYPE.get(variant, variant)
    assert config_folder(infer_diffusers_model_type(meta)).name == (
        "v2" if variant == "v2_base" else variant)  # every detected type has its shipped configs


def test_full_size_layout_has_the_original_key_names():
    sdxl = checkpoint_shapes("xl_base")
    assert sdxl["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert sdxl["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert sdxl["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] == (768, 3072)
    assert sdxl["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    sd2 = checkpoint_shapes("v2")
    assert sd2["cond_stage_model.model.positional_embedding"] == (77, 1024)
    assert sd2["cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight"] == (4096, 1024)
    assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" in sd2  # as published, unused by SD 2
    refiner = checkpoint_shapes("xl_refiner")
    assert refiner["conditioner.embedders.0.model.ln_final.weight"] == (1280,)
    assert not any(k.startswith("conditioner.embedders.1.") for k in refiner)
    controlnet = checkpoint_shapes("controlnet")
    assert controlnet["control_model.input_hint_block.14.weight"] == (320, 256, 3, 3)
    assert controlnet["control_model.zero_convs.11.0.weight"] == (1280, 1280, 1, 1)
    assert controlnet["control_model.middle_block_out.0.bias"] == (1280,)
    v1 = checkpoint_shapes("v1")  # UNet, VAE, CLIP-L tensors (published files add CLIP's position_ids)
    assert len(v1) == 686 + 248 + 196 and v1["first_stage_model.decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)


def test_export_single_file_from_folders(tmp_path):
    parts = tiny_pipeline("xl_base")
    folder = tmp_path / "xl"
    for name, model in parts.items():
        model.save_pretrained(folder / name)
    (folder / "model_index.json").write_text((config_folder("xl_base") / "model_index.json").read_text())
    written = load_file(export_single_file(folder, tmp_path / "xl.safetensors", dtype=torch.float16))
    expected = pipeline_to_ldm(**parts)
    assert sorted(written) == sorted(expected)
    assert all(written[k].dtype == torch.float16 and torch.equal(written[k], v.half()) for k, v in expected.items())
    config = shrink_unet(ControlNetModel.load_config(config_folder("controlnet")), 32, 0)
    randomize(ControlNetModel.from_config(config)).save_pretrained(tmp_path / "cn")
    written = load_file(export_single_file(tmp_path / "cn", tmp_path / "cn.safetensors"))
    assert "control_model.input_hint_block.0.weight" in written
    assert json.loads((tmp_path / "cn" / "config.json").read_text())["_class_name"] == "ControlNetModel"


def header_as_meta(path) -> dict:
    with safe_open(path, "pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)


def test_full_size_random_checkpoint_file(full_size_checkpoints):
    path = full_size_checkpoints("v1")
    assert full_size_checkpoints("v1") == path  # built once per run
    shapes = checkpoint_shapes("v1")
    with safe_open(path, "pt") as f:
        header = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a handle, not a dict)
        assert header == shapes
        weight = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert weight.dtype == torch.float16 and 0.01 < weight.float().std() < 0.03
    assert path.stat().st_size == pytest.approx(weights_bytes("v1", torch.float16), rel=1e-3)  # + the header
    assert infer_diffusers_model_type(header_as_meta(path)) == "v1"
    with pytest.raises(ValueError, match="bench/models.py builds them"):
        full_size_checkpoints("xl_base")


def test_full_size_controlnet_loads_in_diffusers_as_a_pickle_and_bf16(full_size_checkpoints):
    pickle = full_size_checkpoints("controlnet", fmt="ckpt")
    state = torch.load(pickle, weights_only=True, mmap=True)["state_dict"]  # A1111's nesting, weights only
    assert {k: tuple(v.shape) for k, v in state.items()} == checkpoint_shapes("controlnet")
    path = full_size_checkpoints("controlnet", dtype="bfloat16")
    controlnet = ControlNetModel.from_single_file(str(path), config=str(config_folder("controlnet")),
                                                  local_files_only=True, dtype=torch.float32)
    with safe_open(path, "pt") as f:
        hint = f.get_tensor("control_model.input_hint_block.14.weight")
    assert hint.dtype == torch.bfloat16
    assert torch.equal(controlnet.controlnet_cond_embedding.conv_out.weight, hint.float())


def test_full_size_sd2_file_with_the_published_extras_loads_its_text_encoder(full_size_checkpoints):
    """SD 2 files carry a 24th OpenCLIP layer and a text projection that diffusers' 23-layer model has no place
    for; its conversion must skip them (so must any loader)."""
    path = full_size_checkpoints("v2")
    with safe_open(path, "pt") as f:
        text = {k: f.get_tensor(k) for k in f.keys() if k.startswith("cond_stage_model.")}  # noqa: SIM118
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in text
    encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, text, subfolder="text_encoder",
                                                   config=str(config_folder("v2")), local_files_only=True)
    assert encoder.config.num_hidden_layers == 23
    q, _, v = text["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].chunk(3)
    layer = encoder.encoder.layers[22].self_attn
    assert torch.equal(layer.q_proj.weight, q) and torch.equal(layer.v_proj.weight, v)
