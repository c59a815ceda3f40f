"""identify_file: every kind of model file told from its header, with the key names and shapes real files have.

Checkpoint headers are full-size (every tensor of a published SD 1.5 / 2.x UNet, in the original layout, from
diffusers' models built on the meta device and exported with engine/checkpoint.py's renaming) but written as
sparse files: the header is real, the data is a hole, so detection runs on real layouts at no disk or memory cost.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from diffusion_studio.engine.checkpoint import unet_to_ldm, vae_to_ldm
from diffusion_studio.engine.identify import FileKind, expect_kind, identify_file
from diffusion_studio.requests import RequestError
from full_size import write_sparse_safetensors



def shapes(state: dict[str, torch.Tensor], dtype=torch.float16, prefix="") -> dict:
    return {prefix + k: (tuple(v.shape), dtype) for k, v in state.items()}


def sd_unet(**overrides) -> UNet2DConditionModel:
    config = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}  # SD 1.5's UNet
    config.update(overrides)
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.fixture(scope="module")
def vae_state():
    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return vae_to_ldm(vae)


@pytest.fixture(scope="module")
def sd15_tensors(vae_state):
    clip = {"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": ((77, 768), torch.float16),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": ((49408, 768), torch.float16)}
    return {**shapes(unet_to_ldm(sd_unet())), **shapes(vae_state), **clip}


def sd2_tensors(vae_state, in_channels=4):
    unet = sd_unet(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                   in_channels=in_channels)
    clip = {"cond_stage_model.model.token_embedding.weight": ((49408, 1024), torch.float16),
            "cond_stage_model.model.positional_embedding": ((77, 1024), torch.float16)}
    return {**shapes(unet_to_ldm(unet)), **shapes(vae_state), **clip}


def test_sd15_checkpoint(tmp_path, sd15_tensors):
    kind = identify_file(write_sparse_safetensors(tmp_path / "sd15.safetensors", sd15_tensors))
    assert kind == FileKind("checkpoint", "sd", "v1", "float16", "epsilon", False)


def test_sd15_inpainting_checkpoint(tmp_path, vae_state):
    tensors = {**shapes(unet_to_ldm(sd_unet(in_channels=9))), **shapes(vae_state)}
    kind = identify_file(write_sparse_safetensors(tmp_path / "inpaint.safetensors", tensors))
    assert (kind.kind, kind.family, kind.variant, kind.inpainting) == ("checkpoint", "sd", "inpainting", True)


def test_sd2_768_is_v_prediction_and_512_base_by_its_global_step(tmp_path, vae_state):
    tensors = sd2_tensors(vae_state)
    kind = identify_file(write_sparse_safetensors(tmp_path / "sd21.safetensors", tensors))
    assert (kind.variant, kind.prediction) == ("v2", "v_prediction")
    # diffusers' rule: Stability's 512-base checkpoints record global_step 875000 (a .ckpt's top-level key)
    small = {k: v for k, v in tensors.items() if "attn2.to_k" in k or k.endswith("input_blocks.0.0.weight")}
    base = {k: torch.zeros(s, dtype=d) for k, (s, d) in small.items()}
    torch.save({"global_step": 875000, "state_dict": base}, tmp_path / "sd2-base.ckpt")
    kind = identify_file(tmp_path / "sd2-base.ckpt")
    assert (kind.variant, kind.prediction) == ("v2_base", "epsilon")
    torch.save({"global_step": 110000, "state_dict": base}, tmp_path / "sd2-768.ckpt")
    assert identify_file(tmp_path / "sd2-768.ckpt").prediction == "v_prediction"


def test_sd2_inpainting(tmp_path, vae_state):
    kind = identify_file(write_sparse_safetensors(tmp_path / "sd2-inpaint.safetensors",
                                                  sd2_tensors(vae_state, in_channels=9)))
    assert (kind.variant, kind.inpainting) == ("inpainting_v2", True)


def test_sdxl_families_by_their_text_encoders(tmp_path):
    unet = {"model.diffusion_model.input_blocks.0.0.weight": ((320, 4, 3, 3), torch.bfloat16),
            "model.diffusion_model.label_emb.0.0.weight": ((1280, 2816), torch.bfloat16)}
    base = {**unet, "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": ((1280,), torch.bfloat16),
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight":
                ((77, 768), torch.bfloat16)}
    kind = identify_file(write_sparse_safetensors(tmp_path / "xl.safetensors", base))
    assert kind == FileKind("checkpoint", "sdxl", "xl_base", "bfloat16", "epsilon", False)
    refiner = {**unet, "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias":
               ((1280,), torch.float32)}
    kind = identify_file(write_sparse_safetensors(tmp_path / "refiner.safetensors", refiner))
    assert (kind.variant, kind.family) == ("xl_refiner", "sdxl")
    inpaint = {**base, "model.diffusion_model.input_blocks.0.0.weight": ((320, 9, 3, 3), torch.float16)}
    kind = identify_file(write_sparse_safetensors(tmp_path / "xl-inpaint.safetensors", inpaint))
    assert (kind.variant, kind.inpainting) == ("xl_inpaint", True)


def test_controlnets(tmp_path):
    sd = {"control_model.time_embed.0.weight": ((1280, 320), torch.float16),
          "control_model.input_hint_block.0.weight": ((16, 3, 3, 3), torch.float16)}
    kind = identify_file(write_sparse_safetensors(tmp_path / "cn.safetensors", sd))
    assert kind == FileKind("controlnet", "sd", "controlnet", "float16")
    # lllyasviel's .pth files carry no control_model. prefix
    bare = {k.removeprefix("control_model."): v for k, v in sd.items()}
    assert identify_file(write_sparse_safetensors(tmp_path / "cn-bare.safetensors", bare)).kind == "controlnet"
    xl = {**sd, "control_model.label_emb.0.0.weight": ((1280, 2816), torch.float16)}
    assert identify_file(write_sparse_safetensors(tmp_path / "cn-xl.safetensors", xl)).variant == "controlnet_xl"
    diffusers_xl = {"controlnet_cond_embedding.conv_in.weight": ((16, 3, 3, 3), torch.float16),
                    "add_embedding.linear_1.weight": ((1280, 2816), torch.float16),
                    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight": ((640, 640), torch.float16)}
    kind = identify_file(write_sparse_safetensors(tmp_path / "cn-xl-diffusers.safetensors", diffusers_xl))
    assert (kind.family, kind.variant) == ("sdxl", "controlnet_xl_large")


def kohya_lora(unet: UNet2DConditionModel, rank=4, te_prefix="lora_te_") -> dict[str, torch.Tensor]:
    """kohya's names: lora_unet_<module path with underscores>.lora_down/.lora_up/.alpha, for each attention
    projection of the UNet, plus one text-encoder layer."""
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in name and name.split(".")[-1] in ("to_q", "to_k", "to_v"):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, dtype=torch.float16)
            state[f"{key}.lora_up.weight"] = torch.zeros(module.out_features, rank, dtype=torch.float16)
            state[f"{key}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    te = f"{te_prefix}text_model_encoder_layers_0_self_attn_q_proj"
    state[f"{te}.lora_down.weight"] = torch.randn(rank, 768, dtype=torch.float16)
    state[f"{te}.lora_up.weight"] = torch.zeros(768, rank, dtype=torch.float16)
    return state


def test_kohya_lora_and_where_it_belongs(tmp_path):
    path = tmp_path / "styler.safetensors"
    save_file(kohya_lora(sd_unet()), path)
    kind = identify_file(path)
    assert kind == FileKind("lora", "sd", None, "float16", lora_format="kohya")
    with pytest.raises(RequestError) as refusal:
        expect_kind(path, {"checkpoint"})
    assert refusal.value.field == "model"
    assert refusal.value.message == ("'styler.safetensors' looks like a LoRA (kohya format, SD 1.x): put it in "
                                     "loras/ and use <lora:styler:1> in the prompt")


def test_lora_formats_and_sdxl_by_context_width(tmp_path):
    xl_kohya = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}
    save_file(xl_kohya, tmp_path / "xl.safetensors")
    assert identify_file(tmp_path / "xl.safetensors").family == "sdxl"
    peft = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(640, 4)}
    save_file(peft, tmp_path / "diffusers.safetensors")
    kind = identify_file(tmp_path / "diffusers.safetensors")
    assert (kind.lora_format, kind.family, kind.dtype) == ("diffusers", "sdxl", "float32")
    loha = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_a": torch.zeros(320, 4),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_b": torch.zeros(4, 768)}
    save_file(loha, tmp_path / "loha.safetensors")
    assert (identify_file(tmp_path / "loha.safetensors").lora_format, "sd") == ("loha", "sd")
    lokr = {"lora_unet_mid_block_attentions_0_proj_in.lokr_w1": torch.zeros(8, 8)}
    save_file(lokr, tmp_path / "lokr.safetensors")
    assert identify_file(tmp_path / "lokr.safetensors").lora_format == "lokr"


def test_embeddings(tmp_path):
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 768)}, "name": "tok",
             "step": 300, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}
    torch.save(a1111, tmp_path / "tok.pt")
    assert identify_file(tmp_path / "tok.pt") == FileKind("embedding", "sd", None, "float32")
    save_file({"emb_params": torch.randn(3, 1024, dtype=torch.float16)}, tmp_path / "sd2tok.safetensors")
    assert identify_file(tmp_path / "sd2tok.safetensors") == FileKind("embedding", "sd", None, "float16")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "xltok.safetensors")
    kind = identify_file(tmp_path / "xltok.safetensors")
    assert (kind.kind, kind.family) == ("embedding", "sdxl")
    with pytest.raises(RequestError, match="looks like a textual-inversion embedding.*put it in embeddings/ and "
                                           "write 'xltok' in the prompt"):
        expect_kind(tmp_path / "xltok.safetensors", {"checkpoint", "controlnet"})


def test_vae_files(tmp_path, vae_state):
    ldm = write_sparse_safetensors(tmp_path / "vae-ft-mse.safetensors", shapes(vae_state, torch.float32))
    assert identify_file(ldm) == FileKind("vae", None, None, "float32")
    bare = {k.removeprefix("first_stage_model."): v for k, v in shapes(vae_state).items()}
    assert identify_file(write_sparse_safetensors(tmp_path / "sdxl_vae.safetensors", bare)).kind == "vae"
    with pytest.raises(RequestError, match="looks like a VAE: put it in vae/"):
        expect_kind(ldm, {"checkpoint"})


def test_not_model_files(tmp_path):
    (tmp_path / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(RequestError, match="not a safetensors file"):
        identify_file(tmp_path / "random.safetensors")
    raw = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (tmp_path / "empty.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(RequestError, match=r"is not a model file \(no tensors\)"):
        identify_file(tmp_path / "empty.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(RequestError, match="too short"):
        identify_file(tmp_path / "short.safetensors")
    save_file({"x": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(RequestError, match="is not a model the studio knows"):
        identify_file(tmp_path / "other.safetensors")


def test_truncated_file(tmp_path):
    save_file(kohya_lora(sd_unet()), tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RequestError, match="'cut.safetensors' is truncated"):
        identify_file(tmp_path / "cut.safetensors")
    torch.save({"state_dict": {"a": torch.zeros(100)}}, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RequestError, match="truncated or damaged"):
        identify_file(tmp_path / "cut.ckpt")


class CustomState:  # a pickle of this needs our code to load
    def __init__(self):
        self.weights = torch.zeros(2)


def test_pickle_that_needs_code_is_refused(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "extra": CustomState()},
               tmp_path / "evil.ckpt")
    with pytest.raises(RequestError) as refusal:
        identify_file(tmp_path / "evil.ckpt")
    assert refusal.value.message == ("'evil.ckpt' is a pickle that needs code to load (only weights-only pickles "
                                     "are loaded); convert it to .safetensors")


def test_other_families_are_named(tmp_path):
    flux = {"double_blocks.0.img_attn.norm.key_norm.scale": ((128,), torch.bfloat16),
            "img_in.weight": ((3072, 64), torch.bfloat16)}
    with pytest.raises(RequestError, match="family the studio can't load \\(looks like Flux\\)"):
        identify_file(write_sparse_safetensors(tmp_path / "flux.safetensors", flux))
    sd3 = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": ((9216,), torch.float16),
           "model.diffusion_model.pos_embed": ((1, 36864, 1536), torch.float16)}
    with pytest.raises(RequestError, match="looks like SD3\\)"):
        identify_file(write_sparse_safetensors(tmp_path / "sd3.safetensors", sd3))
    with pytest.raises(RequestError, match="float8_e4m3fn weights"):
        header = {"model.diffusion_model.x": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
        raw = json.dumps(header).encode()
        (tmp_path / "fp8.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
        identify_file(tmp_path / "fp8.safetensors")


def test_a_folder_of_fifty_full_size_files_in_well_under_a_second(tmp_path, sd15_tensors):
    """~1,100 tensors each, as an SD 1.5 checkpoint has (2-8 ms of CPU a file on this machine)."""
    paths = [write_sparse_safetensors(tmp_path / f"m{i}.safetensors", sd15_tensors) for i in range(50)]
    started = time.process_time()  # this process's CPU time: the machine's other load doesn't count
    kinds = [identify_file(path) for path in paths]
    elapsed = time.process_time() - started
    assert {k.variant for k in kinds} == {"v1"}
    assert elapsed < 0.5, f"{elapsed:.2f} s of CPU for 50 files"


FULL_SIZE_EXPECTED = {  # A2's full-size exports of every shipped variant: (kind, family, variant, prediction, inpainting)
    "v1": ("checkpoint", "sd", "v1", "epsilon", False),
    "v2": ("checkpoint", "sd", "v2", "v_prediction", False),
    "v2_base": ("checkpoint", "sd", "v2", "v_prediction", False),  # same tensors as 768-v: no step, so v (diffusers)
    "inpainting": ("checkpoint", "sd", "inpainting", "epsilon", True),
    "inpainting_v2": ("checkpoint", "sd", "inpainting_v2", "epsilon", True),
    "xl_base": ("checkpoint", "sdxl", "xl_base", "epsilon", False),
    "xl_refiner": ("checkpoint", "sdxl", "xl_refiner", "epsilon", False),
    "xl_inpaint": ("checkpoint", "sdxl", "xl_inpaint", "epsilon", True),
    "controlnet": ("controlnet", "sd", "controlnet", None, False),
    "controlnet_xl": ("controlnet", "sdxl", "controlnet_xl_large", None, False),  # diffusers names, as published
}


@pytest.mark.parametrize("variant", list(FULL_SIZE_EXPECTED))
def test_full_size_exports_of_every_family(variant, tmp_path):
    """The exact header of each family's full-size original-layout file (tests/full_size.py's export on the meta
    device, SDXL's 7 GB ones included, as sparse files)."""
    from full_size import checkpoint_shapes

    tensors = {name: (shape, torch.float16) for name, shape in checkpoint_shapes(variant).items()}
    kind = identify_file(write_sparse_safetensors(tmp_path / f"{variant}.safetensors", tensors))
    assert (kind.kind, kind.family, kind.variant, kind.prediction, kind.inpainting) == FULL_SIZE_EXPECTED[variant]
    assert kind.dtype == "float16"
