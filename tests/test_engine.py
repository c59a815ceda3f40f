"""The engine end to end on tiny models: every mode, sharing, LRU, cancel, reproducibility, LoRA, schedulers."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_studio.engine import runner
from diffusion_studio.engine.runner import Engine, prepare_mask
from diffusion_studio.requests import GenerationRequest, Mode, RequestError
from diffusion_studio.samplers import SAMPLERS

PROMPT = "a red circle on a white background"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def run(engine, **fields):
    return engine.run(GenerationRequest(**{"prompt": PROMPT, "steps": 3, "seed": 11, **fields}))


def test_txt2img_reports_seed_timings_memory_and_steps(engine):
    events = []
    result = engine.run(GenerationRequest(prompt=PROMPT, steps=4, seed=None), on_step=events.append)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)  # the built-in's native size
    assert isinstance(result.seed, int) and 0 <= result.seed < 2**32  # random seed is chosen and returned
    assert [e.step for e in events] == [1, 2, 3, 4] and all(e.total == 4 for e in events)
    assert events[-1].eta_s == 0 and all(e.eta_s >= 0 for e in events)
    assert all(e.preview is not None and e.preview.size == (16, 16) for e in events)  # latent-size previews
    assert len(result.timings.step_s) == 4 and result.timings.it_per_s > 0
    assert result.timings.total_s >= sum(result.timings.step_s)
    assert result.peak_memory_bytes > 10_000_000 and result.device == "cpu"
    assert not result.cancelled


def test_same_request_and_seed_is_bit_identical(engine):
    first, second = run(engine, scheduler="Euler a"), run(engine, scheduler="Euler a")
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    other = engine.run(GenerationRequest(prompt=PROMPT, steps=3, seed=12, scheduler="Euler a"))
    assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))


def test_batch_gives_consecutive_seeds_and_each_image_reproduces(engine):
    batch = run(engine, batch_size=3, seed=100)
    assert batch.seeds == [100, 101, 102]
    alone = engine.run(GenerationRequest(prompt=PROMPT, steps=3, seed=101))
    # One generator per image: image 1 of the batch is image 0 of a run with its seed (up to batched-matmul noise).
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 2
    assert not np.array_equal(pixels(batch.images[0]), pixels(batch.images[1]))


def test_explicit_size(engine):
    result = run(engine, width=32, height=48)
    assert result.images[0].size == (32, 48)


def test_img2img_starts_from_the_image(engine, shape_image):
    other = "a blue square on a black background"  # far from the source: strength decides how far we go
    low = run(engine, mode="img2img", init_image=shape_image, strength=0.1, steps=10, prompt=other)
    high = run(engine, mode="img2img", init_image=shape_image, strength=1.0, steps=10, prompt=other)
    distance = lambda r: np.abs(pixels(r.images[0]) - pixels(shape_image)).mean()
    assert distance(low) < distance(high)
    assert len(low.timings.step_s) == 1  # strength 0.1 of 10 steps runs one step


# Through the inpainting ControlNet asked for by name, and by latent blending alone (with no trained inpainting
# ControlNet the base's default is none; the patch makes that so even where builtin:shapes-inpaint is committed).
@pytest.mark.parametrize("controlnet", ["builtin:shapes-inpaint", None])
def test_inpaint_keeps_pixels_outside_the_mask(engine, shape_image, center_mask, controlnet, monkeypatch):
    monkeypatch.setattr(runner, "is_trained", lambda name: False)
    result = run(engine, mode="inpaint", init_image=shape_image, mask_image=center_mask, mask_blur=0, strength=1.0,
                 prompt="a blue square on a black background", controlnet=controlnet)
    assert engine.controlnet_name(result.request) == controlnet
    out, original = pixels(result.images[0]), pixels(shape_image)
    outside = np.asarray(center_mask) == 0
    assert np.array_equal(out[outside], original[outside])
    assert np.abs(out[~outside] - original[~outside]).mean() > 5  # and the masked part was repainted


def test_inpainting_uses_the_bases_trained_inpainting_controlnet_or_none(engine, monkeypatch):
    inpaint = GenerationRequest(mode="inpaint", init_image=Image.new("RGB", (8, 8)),
                                mask_image=Image.new("L", (8, 8)))
    monkeypatch.setattr(runner, "is_trained", lambda name: True)
    assert engine.controlnet_name(inpaint) == "builtin:shapes-inpaint"
    assert engine.controlnet_name(inpaint.model_copy(update={"controlnet": "mine"})) == "mine"  # asked for: used
    assert engine.controlnet_name(GenerationRequest()) is None  # txt2img runs without one
    monkeypatch.setattr(runner, "is_trained", lambda name: False)  # a stand-in would steer with noise
    assert engine.controlnet_name(inpaint) is None


def test_mask_is_resized_grown_and_blurred():
    mask = Image.new("L", (8, 8), 0)
    mask.putpixel((4, 4), 255)
    sharp = np.asarray(prepare_mask(mask, (64, 64), blur=0, grow=0))
    assert sharp.shape == (64, 64) and set(np.unique(sharp)) == {0, 255} and (sharp == 255).sum() == 64
    grown = np.asarray(prepare_mask(mask, (64, 64), blur=0, grow=4))
    assert (grown == 255).sum() > (sharp == 255).sum()
    blurred = np.asarray(prepare_mask(mask, (64, 64), blur=3, grow=0))
    assert len(np.unique(blurred)) > 2  # a feathered edge


def test_controlnet_follows_control_image(engine, shape_image):
    result = run(engine, mode="controlnet", control_image=shape_image)
    assert result.control_image is not None
    edges = np.asarray(result.control_image)
    assert edges.max() == 255 and (edges > 0).mean() < 0.2  # canny edges of the circle
    no_control = run(engine, mode="controlnet", control_image=shape_image, control_scale=0.0)
    assert not np.array_equal(pixels(result.images[0]), pixels(no_control.images[0]))
    preview = engine.control_preview(GenerationRequest(mode="controlnet", control_image=shape_image,
                                                       canny_low=10, canny_high=20))
    assert np.array_equal(np.asarray(preview), edges)


def test_sdxl_modes(engine, shape_image, center_mask, monkeypatch):
    """Every mode on an SDXL base runs the family's pipeline: the family is the model's, not a mode."""
    classes = {}
    original_view = engine.manager.view

    def spy(base, mode, scheduler, controlnet=None, vae=None):
        view = original_view(base, mode, scheduler, controlnet, vae=vae)
        classes[mode.value] = type(view).__name__
        return view

    monkeypatch.setattr(engine.manager, "view", spy)
    for mode, extra in [("txt2img", {}), ("img2img", {"init_image": shape_image}),
                        ("inpaint", {"init_image": shape_image, "mask_image": center_mask}),
                        ("controlnet", {"control_image": shape_image})]:
        result = run(engine, model="builtin:shapes-xl", mode=mode, **extra)
        assert result.images[0].size == (64, 64), mode
    assert classes["txt2img"] == "StableDiffusionXLPipeline"
    assert all("XL" in name for name in classes.values()), classes


def test_sdxl_is_an_alias_of_txt2img(engine):
    request = GenerationRequest(mode="sdxl", model="builtin:shapes-xl", prompt=PROMPT, steps=2, seed=3)
    assert request.mode == Mode.txt2img and "sdxl" not in [m.value for m in Mode]
    assert request.batch_key() == request.model_copy(update={"mode": Mode.txt2img}).batch_key()
    assert GenerationRequest.model_validate_json('{"mode": "sdxl"}').mode == Mode.txt2img  # stored requests
    alias = engine.run(request)
    plain = run(engine, model="builtin:shapes-xl", steps=2, seed=3)
    assert np.array_equal(pixels(alias.images[0]), pixels(plain.images[0]))
    assert run(engine, mode="sdxl", steps=1).images[0].size == (64, 64)  # an SD base: its own txt2img


def test_all_modes_share_one_base(make_config, shape_image, center_mask):
    engine = Engine(make_config())
    unet_storage = {}
    original_view = engine.manager.view

    def spy(base, mode, scheduler, controlnet=None, vae=None):
        view = original_view(base, mode, scheduler, controlnet, vae=vae)
        unet_storage[mode.value] = [p.data_ptr() for p in view.unet.parameters()]
        return view

    engine.manager.view = spy
    for mode, extra in [("txt2img", {}), ("img2img", {"init_image": shape_image}),
                        ("inpaint", {"init_image": shape_image, "mask_image": center_mask}),
                        ("controlnet", {"control_image": shape_image})]:
        run(engine, mode=mode, **extra)
    # The base once and each ControlNet once (inpainting's and canny's); no mode loaded the base's weights again.
    assert engine.manager.load_count == 3
    storages = list(unet_storage.values())
    assert len(storages) == 4 and all(s == storages[0] for s in storages)


def test_lru_unloads_least_recently_used(make_config, sd_folder):
    engine = Engine(make_config(max_loaded_models=2))
    run(engine, model="builtin:shapes")
    run(engine, model=str(sd_folder))
    run(engine, model="builtin:shapes")  # touch: now the folder model is least recently used
    run(engine, model="builtin:shapes-xl")
    assert [m["name"] for m in engine.manager.loaded()] == ["builtin:shapes", "builtin:shapes-xl"]
    assert engine.manager.load_count == 3


def test_byte_budget_unloads(make_config, sd_folder):
    engine = Engine(make_config(max_loaded_models=10, max_loaded_bytes=1))
    run(engine, model="builtin:shapes")
    run(engine, model=str(sd_folder))
    assert [m["name"] for m in engine.manager.loaded()] == [str(sd_folder)]  # only the newest stays
    assert engine.manager.unload(str(sd_folder)) and engine.manager.loaded() == []


def test_cancel_stops_within_one_step(engine):
    cancel = threading.Event()
    seen = []

    def on_step(event):
        seen.append(event.step)
        if event.step == 2:
            cancel.set()

    result = engine.run(GenerationRequest(prompt=PROMPT, steps=20, seed=1), on_step=on_step, cancel=cancel)
    assert result.cancelled and seen == [1, 2]
    assert len(result.timings.step_s) == 2


@pytest.mark.parametrize("scheduler", list(SAMPLERS))
def test_every_scheduler_runs(engine, scheduler):
    result = engine.run(GenerationRequest(prompt=PROMPT, steps=2, seed=3, scheduler=scheduler, guidance=1.5))
    array = pixels(result.images[0])
    assert array.shape == (64, 64, 3) and array.std() > 0


def test_ddim_does_not_clip_latents():
    """DDIM's default clips its x0 estimate to [-1, 1]; unit-variance latents go past that, and inpainting on
    builtin:shapes came out as colour noise. Switching to DDIM must turn the clipping off."""
    from diffusion_studio.builtin.architectures import builtin_scheduler
    from diffusion_studio.engine.pipelines import make_scheduler

    assert make_scheduler("DDIM", builtin_scheduler().config).config.clip_sample is False


def test_unknown_model_and_wrong_role(engine):
    with pytest.raises(RequestError, match="model: 'nowhere' is not a built-in"):
        run(engine, model="nowhere")
    with pytest.raises(RequestError, match="model: 'builtin:shapes-canny' is a controlnet, not a base"):
        run(engine, model="builtin:shapes-canny")
    with pytest.raises(RequestError, match="controlnet: 'builtin:shapes-xl-canny' is for SDXL bases"):
        engine.run(GenerationRequest(mode="controlnet", control_image=Image.new("RGB", (8, 8)), steps=1,
                                     controlnet="builtin:shapes-xl-canny"))


def test_depth_and_pose_need_local_estimators(engine, shape_image):
    for kind in ("depth", "pose"):
        with pytest.raises(RequestError, match=f"control_type: {kind} needs a local"):
            run(engine, mode="controlnet", control_image=shape_image, control_type=kind,
                controlnet="builtin:shapes-canny")


def _save_random_lora(pipe_folder, target):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(pipe_folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():  # large enough to see
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(target, unet_lora_layers=layers, safe_serialization=True)
    return target / "pytorch_lora_weights.safetensors"


def test_lora_applies_at_its_weight_and_switches_off(engine, data_dir, tmp_path):
    from diffusion_studio.builtin.catalog import builtin_folder

    lora = _save_random_lora(builtin_folder("shapes", data_dir), tmp_path)
    plain = run(engine)
    full = run(engine, loras=[{"name": str(lora), "weight": 1.0}])
    zero = run(engine, loras=[{"name": str(lora), "weight": 0.0}])
    after = run(engine)
    assert not np.array_equal(pixels(plain.images[0]), pixels(full.images[0]))
    assert np.abs(pixels(plain.images[0]) - pixels(zero.images[0])).max() <= 1
    assert np.array_equal(pixels(plain.images[0]), pixels(after.images[0]))  # LoRA off again
    with pytest.raises(RequestError, match="loras: LoRA 'missing' not found"):
        run(engine, loras=[{"name": "missing"}])


def test_memory_options_apply_and_keep_results(make_config):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    def applied(engine) -> tuple[bool, bool]:
        with engine.manager.use("builtin:shapes") as (base, _):
            processors = base.pipeline.unet.attn_processors.values()
            return (bool(processors) and all(isinstance(p, SlicedAttnProcessor) for p in processors),
                    base.pipeline.vae.use_tiling)

    plain = Engine(make_config())
    saving = Engine(make_config(memory={"attention_slicing": True, "vae_tiling": True}))
    a, b = run(plain, batch_size=2), run(saving, batch_size=2)
    assert applied(plain) == (False, False)
    assert applied(saving) == (True, True)
    assert np.abs(pixels(a.images[1]) - pixels(b.images[1])).max() <= 2


def test_vae_slicing_is_refused_with_a_reason(make_config):
    from pydantic import ValidationError

    assert make_config(memory={"vae_slicing": False}).memory.vae_slicing is False  # old files saying false load
    with pytest.raises(ValidationError, match="VAE always decodes one image at a time.*remove the vae_slicing"):
        make_config(memory={"vae_slicing": True})


def test_cpu_offload_needs_an_accelerator(make_config):
    engine = Engine(make_config(memory={"model_cpu_offload": True}))
    with pytest.raises(RequestError, match="memory.model_cpu_offload: needs a CUDA or MPS device"):
        run(engine)


def test_safety_checker_flags_become_visible_notices():
    from diffusion_studio.engine.runner import apply_safety_notices

    images = [Image.new("RGB", (64, 64), "black"), Image.new("RGB", (64, 64), "red")]
    shown, blocked = apply_safety_notices(images, [True, False])
    assert blocked == [0] and np.asarray(shown[0]).max() > 200  # text on the notice, not a black square
    assert np.asarray(shown[1]).tolist() == np.asarray(Image.new("RGB", (64, 64), "red")).tolist()
    assert apply_safety_notices(images, None)[1] == []


def test_memory_guard_refuses_what_would_not_fit(engine, monkeypatch):
    from diffusion_studio.engine import memory

    with engine.manager.use("builtin:shapes") as (base, _):
        small = memory.estimate_run_bytes(base.pipeline, 64, 64, 1, 7.0)
        assert memory.estimate_run_bytes(base.pipeline, 128, 128, 1, 7.0) > small
        assert memory.estimate_run_bytes(base.pipeline, 64, 64, 4, 7.0) > small
    monkeypatch.setattr(memory, "available_bytes", lambda device: small - 1)
    with pytest.raises(RequestError, match=r"batch_size: 2 image\(s\) of 64x64 need about .* GiB free"):
        engine.run(GenerationRequest(prompt="x", steps=2, batch_size=2, seed=1))
    monkeypatch.setattr(memory, "available_bytes", lambda device: small * 2)
    assert len(engine.run(GenerationRequest(prompt="x", steps=2, seed=1)).images) == 1


def test_weights_identity_is_computed_once_per_load(make_config, sd_folder, monkeypatch):
    from diffusion_studio.engine import sources

    engine = Engine(make_config())
    request = GenerationRequest(model=str(sd_folder), prompt=PROMPT, steps=1, seed=1)
    before = engine.weights_identity(request)  # not loaded: computed from the files
    assert before.startswith(f"{sd_folder}@")
    walks = []
    original = sources.ModelSource.compute_identity
    monkeypatch.setattr(sources.ModelSource, "compute_identity",
                        lambda self: walks.append(self.name) or original(self))
    assert engine.run(request).model_id == before
    assert walks == [str(sd_folder)]  # once, by the load
    assert engine.weights_identity(request) == before and engine.run(request).model_id == before
    assert walks == [str(sd_folder)]  # loaded: the recorded identity, no walk of the folder


def test_weights_identity_names_the_controlnet_it_runs_with(engine, shape_image):
    controlled = engine.weights_identity(GenerationRequest(mode="controlnet", control_image=shape_image))
    base, controlnet = controlled.split("+")
    assert base.startswith("builtin:shapes@") and controlnet.startswith("builtin:shapes-canny@")
    assert engine.weights_identity(GenerationRequest()) == base


def test_peak_memory_is_each_runs_own_without_resetting_the_process_counter(monkeypatch):
    from types import SimpleNamespace

    from diffusion_studio.engine import memory

    counters = {"allocated": 100, "high_water": 900}  # 900: an earlier (or a concurrent) run's peak

    def reset(device):
        raise AssertionError("reset CUDA's process-wide peak counter: other workers' runs lose their peaks")

    monkeypatch.setattr(torch, "cuda", SimpleNamespace(
        memory_allocated=lambda device: counters["allocated"],
        max_memory_allocated=lambda device: counters["high_water"], reset_peak_memory_stats=reset))
    sampler = memory.MemorySampler(torch.device("cuda"))
    counters["allocated"] = 300
    sampler.sample()  # a step
    counters["allocated"] = 200
    assert sampler.result() == 300  # its own samples, not the 900 left from before it started
    sampler = memory.MemorySampler(torch.device("cuda"))
    counters["high_water"] = 1500  # a new process-wide maximum, reached within one of this run's steps
    assert sampler.result() == 1500
