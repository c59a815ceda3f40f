"""The trainer on a tiny model: events, controls from another thread, exact resume, NaN stop, datasets, outputs."""

import random
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from diffusion_studio.builtin.shapes import ShapesWorld, blob_mask
from diffusion_studio.engine.runner import Engine
from diffusion_studio.requests import GenerationRequest, RequestError
from diffusion_studio.training.config import TrainConfig
from diffusion_studio.training.data import DatasetError, inpainting_mask
from diffusion_studio.training.events import EventBus
from diffusion_studio.training.trainer import Trainer, TrainingError


@pytest.fixture
def pipe(sd_folder):
    return StableDiffusionPipeline.from_pretrained(sd_folder)


def config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(dataset="shapes", resolution=32, steps=6, batch_size=4, pool_size=16, checkpoint_every=2,
                    learning_rate=1e-3, output_dir=tmp_path / "run", method="lora", lora_rank=4)
    settings.update(overrides)
    return TrainConfig(**settings)


def collect(bus: EventBus) -> list:
    events = []
    bus.subscribe(events.append)
    return events


def test_lora_run_publishes_metrics_and_gives_a_usable_lora(pipe, tmp_path, make_config, sd_folder):
    bus = EventBus()
    events = collect(bus)
    output = Trainer(config(tmp_path, sample_every=3, sample_steps=2), pipe, bus=bus).run()
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(e.loss) and e.grad_norm > 0 and e.lr == 1e-3 and 0 <= e.stability <= 100
               for e in steps)
    assert steps[-1].eta_s == 0
    samples = [e for e in events if e.kind == "sample"]
    assert [e.step for e in samples] == [3, 6] and "adherence" in samples[0].data
    assert [e.message for e in events if e.kind == "state"] == ["running", "done"]
    assert output.name == "lora.safetensors" and output.exists()
    # The LoRA loads into generation at a chosen weight.
    engine = Engine(make_config())
    plain = engine.run(GenerationRequest(model=str(sd_folder), prompt="a red circle", steps=2, seed=1))
    with_lora = engine.run(GenerationRequest(model=str(sd_folder), prompt="a red circle", steps=2, seed=1,
                                             loras=[{"name": str(output), "weight": 1.0}]))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(with_lora.images[0]))


def test_lora_on_the_text_encoder_too_resumes_exactly_and_loads_into_generation(sd_folder, tmp_path, make_config):
    def lora_trainer(folder):
        return Trainer(config(folder, steps=4, train_text_encoder=True),
                       StableDiffusionPipeline.from_pretrained(sd_folder))

    straight = lora_trainer(tmp_path / "a")
    encoder_before = {k: v.clone() for k, v in straight.pipe.text_encoder.state_dict().items()}
    output = straight.run()
    # Only the adapters trained: the encoder's own weights are untouched, its adapter moved.
    trained = straight.pipe.text_encoder.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in encoder_before.items() if "lora_" not in k)
    assert any("lora_B" in k and not torch.equal(trained[k], v) for k, v in encoder_before.items())
    # A run stopped at step 2 and resumed ends with the same adapters as one that ran straight through.
    interrupted = lora_trainer(tmp_path / "b")
    interrupted.bus.subscribe(lambda e: e.kind == "step" and e.step == 2 and interrupted.stop())
    interrupted.run()
    resumed = lora_trainer(tmp_path / "b")
    resumed.run()
    for name in ("unet", "text_encoder"):
        a, b = straight._trainable_state()[name], resumed._trainable_state()[name]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The exported file carries both parts, and generation loads the text encoder's part too.
    assert {key.split(".")[0] for key in load_file(output)} == {"unet", "text_encoder"}
    engine = Engine(make_config())
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in load_file(output).items() if k.startswith("unet.")}, unet_only)
    request = dict(model=str(sd_folder), prompt="a red circle", steps=2, seed=1)
    both = engine.run(GenerationRequest(**request, loras=[{"name": str(output), "weight": 1.0}]))
    unet_part = engine.run(GenerationRequest(**request, loras=[{"name": str(unet_only), "weight": 1.0}]))
    assert not np.array_equal(np.asarray(both.images[0]), np.asarray(unet_part.images[0]))


def test_lora_layers_choose_what_the_lora_adapts(pipe, sd_folder, tmp_path):
    trainer = Trainer(config(tmp_path, steps=1, lora_layers=["attn2.to_k", "attn2.to_v"]), pipe)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, p in pipe.unet.named_parameters()
               if p.requires_grad and ".lora_A" in name}
    assert adapted and all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in adapted)
    assert len(trainer.params) == 2 * len(adapted)  # lora_A and lora_B of those modules, and nothing else
    with pytest.raises(RequestError, match="lora_layers: .*not found"):
        Trainer(config(tmp_path, lora_layers=["to_nothing"]), StableDiffusionPipeline.from_pretrained(sd_folder))


def test_pause_resume_stop_from_another_thread(pipe, tmp_path):
    bus = EventBus()
    events = collect(bus)
    trainer = Trainer(config(tmp_path, steps=1000), pipe, bus=bus)
    thread = threading.Thread(target=trainer.run)
    thread.start()
    deadline = time.time() + 60
    while not any(e.kind == "step" and e.step >= 2 for e in events):
        assert time.time() < deadline
        time.sleep(0.01)
    trainer.pause()
    while trainer.state != "paused":
        assert time.time() < deadline
        time.sleep(0.01)
    paused_at = trainer.step
    time.sleep(0.5)
    assert trainer.step == paused_at  # nothing trains while paused
    trainer.resume()
    while trainer.step < paused_at + 2:
        assert time.time() < deadline
        time.sleep(0.01)
    trainer.stop()
    thread.join(timeout=30)
    assert trainer.state == "stopped" and trainer.step < 1000
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == trainer.step  # stop writes a final checkpoint


def _weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.pipe.unet.state_dict().items()}


def test_resume_continues_the_same_run(sd_folder, tmp_path):
    straight = Trainer(config(tmp_path / "a", method="full", steps=6, ema_decay=0.9),
                       StableDiffusionPipeline.from_pretrained(sd_folder))
    straight.run()
    first = Trainer(config(tmp_path / "b", method="full", steps=6, ema_decay=0.9),
                    StableDiffusionPipeline.from_pretrained(sd_folder))
    stop_after = first.bus.subscribe(lambda e: e.kind == "step" and e.step == 4 and first.stop())
    first.run()
    stop_after()
    assert first.state == "stopped" and first.step == 4
    again = Trainer(config(tmp_path / "b", method="full", steps=6, ema_decay=0.9),
                    StableDiffusionPipeline.from_pretrained(sd_folder))
    events = collect(again.bus)
    global_rng = torch.get_rng_state()
    again.run()
    assert torch.equal(torch.get_rng_state(), global_rng)  # resuming restores the run's generator, not the global
    assert [e.step for e in events if e.kind == "step"] == [5, 6]
    a, b = _weights(straight), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["lora", "controlnet"])
def test_training_leaves_torchs_global_rng_alone(sd_folder, tmp_path, method):
    """Generation runs beside training in the server: a run (set-up, steps, samples, checkpoints) draws only from
    its own generator, so it neither moves the global RNG nor depends on it."""
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        trainer = Trainer(config(tmp_path / str(global_seed), method=method, steps=2, sample_every=2, sample_steps=2),
                          StableDiffusionPipeline.from_pretrained(sd_folder))
        trainer.run()
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(trainer._trainable_state())
        saved = torch.load(tmp_path / str(global_seed) / "run" / "checkpoint.pt", weights_only=False)
        assert set(saved["rng"]) == {"generator"}
    first, second = runs  # the same start (LoRA init, a new ControlNet) and the same steps whatever the global seed
    assert all(torch.equal(first[name][key], second[name][key]) for name in first for key in first[name])


def test_resume_with_other_settings_is_refused(pipe, sd_folder, tmp_path):
    Trainer(config(tmp_path, steps=2), pipe).run()
    other = Trainer(config(tmp_path, steps=4, lora_rank=8), StableDiffusionPipeline.from_pretrained(sd_folder))
    with pytest.raises(TrainingError, match=r"output_dir: .* different settings \(lora_rank\)"):
        other.run()


def test_a_checkpoint_older_than_a_new_setting_still_resumes(pipe, sd_folder, tmp_path):
    """A checkpoint written before a TrainConfig field existed resumes when the run uses that field's default."""
    Trainer(config(tmp_path, steps=2), pipe).run()
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    del state["config"]["caption_dropout"]  # as if the field were added after this checkpoint
    state["rng"]["torch"] = torch.Generator().manual_seed(123).get_state()  # older ones kept the global RNG too
    torch.save(state, path)
    global_rng = torch.get_rng_state()
    assert Trainer(config(tmp_path, steps=3), StableDiffusionPipeline.from_pretrained(sd_folder)).load_checkpoint()
    assert torch.equal(torch.get_rng_state(), global_rng)  # which resuming ignores (the loop never draws from it)
    state["config"]["caption_dropout"] = 0.5  # but a value other than the default is a different run
    torch.save(state, path)
    with pytest.raises(TrainingError, match=r"different settings \(caption_dropout\)"):
        Trainer(config(tmp_path, steps=3), StableDiffusionPipeline.from_pretrained(sd_folder)).load_checkpoint()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(pipe, tmp_path):
    trainer = Trainer(config(tmp_path, steps=10, checkpoint_every=1), pipe)
    real_loss = trainer._loss
    trainer._loss = lambda *a: real_loss(*a) * (float("nan") if trainer.step == 3 else 1.0)
    events = collect(trainer.bus)
    with pytest.raises(TrainingError, match="loss became nan at step 3.*checkpoint \\(step 3\\)"):
        trainer.run()
    assert trainer.state == "failed" and events[-1].kind == "error"
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 3


def test_folder_dataset_skips_bad_files_and_refuses_empty(pipe, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        image = Image.new("RGB", (40, 48), "white")
        ImageDraw.Draw(image).ellipse((5, 5, 30, 30), fill="red")
        image.save(folder / f"img{index}.png")
    (folder / "img0.txt").write_text("a red heart on a white background")
    (folder / "broken.png").write_bytes(b"not an image")
    bus = EventBus()
    events = collect(bus)
    trainer = Trainer(config(tmp_path, dataset=str(folder), instance_prompt="a red heart", steps=1), pipe, bus=bus)
    trainer.run()
    assert sorted(trainer.pool.captions) == ["a red heart", "a red heart", "a red heart on a white background"]
    assert any("skipped broken.png" in e.message for e in events if e.kind == "warning")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="dataset: no usable images"):
        Trainer(config(tmp_path / "x", dataset=str(empty)), pipe).run()


def test_full_run_exports_a_loadable_model(pipe, tmp_path, make_config):
    output = Trainer(config(tmp_path, method="full", train_text_encoder=True, ema_decay=0.9, steps=2), pipe).run()
    assert (output / "model_index.json").exists()
    result = Engine(make_config()).run(GenerationRequest(model=str(output), prompt="a star", steps=2, seed=1))
    assert result.images[0].size == (32, 32)


@pytest.mark.parametrize("fields, message", [
    ({"canny_thresholds": (200, 100)}, "canny_thresholds: need 0 <= low <= high <= 255"),
    ({"warmup_steps": 10, "steps": 10}, "warmup_steps: must be smaller than steps"),
    ({"method": "controlnet", "train_text_encoder": True}, "train_text_encoder: not with method 'controlnet'"),
    ({"resolution": 60}, "multiple of 8"),
    ({"learning_rate": 0}, "greater than 0"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**fields)


def test_controlnet_training_exports_a_usable_controlnet(pipe, tmp_path, make_config, sd_folder):
    from diffusers import ControlNetModel

    from diffusion_studio.engine.control import canny
    from diffusion_studio.training.data import control_maps

    trainer = Trainer(config(tmp_path, method="controlnet", ema_decay=0.9, steps=3, sample_every=3, sample_steps=2,
                             canny_thresholds=(30, 60)), pipe)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    output = trainer.run()
    assert output.name == "controlnet" and (output / "config.json").exists()
    # the control maps are made with the configured thresholds (which, on this pool, differ from canny's usual)
    images = trainer.pool.images
    assert torch.equal(trainer.pool.conditions, control_maps(images, lambda image: canny(image, 30, 60)))
    assert not torch.equal(trainer.pool.conditions, control_maps(images, canny))
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # the base stays frozen
    assert trainer.pool.conditions.shape[1:] == (3, 32, 32) and 0 <= trainer.pool.conditions.min()
    ControlNetModel.from_pretrained(output)
    engine = Engine(make_config())
    result = engine.run(GenerationRequest(model=str(sd_folder), mode="controlnet", controlnet=str(output),
                                          control_image=Image.new("RGB", (32, 32), "white"), steps=2, seed=1))
    assert result.images[0].size == (32, 32)


def test_inpainting_controlnet_learns_from_holes_and_inpaints(pipe, tmp_path, make_config, sd_folder):
    bus = EventBus()
    events = collect(bus)
    trainer = Trainer(config(tmp_path, method="controlnet", control_type="inpaint", steps=2, sample_every=2,
                             sample_steps=2), pipe, bus=bus)
    output = trainer.run()
    conditions = trainer.pool.conditions
    holes = (conditions == -1).all(dim=1)
    assert holes.any(dim=(1, 2)).all()  # every pool image has a hole, and outside it the image in [0, 1]
    assert conditions.permute(1, 0, 2, 3)[:, ~holes].min() >= 0
    samples = [e for e in events if e.kind == "sample"]
    assert samples[0].data["prompts"] == trainer.pool.captions[:1]  # the sampled image's own caption
    engine = Engine(make_config())
    source, mask = Image.new("RGB", (32, 32), "white"), Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    result = engine.run(GenerationRequest(model=str(sd_folder), mode="inpaint", controlnet=str(output),
                                          init_image=source, mask_image=mask, mask_blur=0, steps=2, seed=1))
    assert np.array_equal(np.asarray(result.images[0])[np.asarray(mask) == 0],
                          np.asarray(source)[np.asarray(mask) == 0])


def test_sdxl_full_training_with_both_text_encoders(tmp_path, make_config):
    from diffusion_studio.builtin.architectures import TinySize, build_sdxl_pipeline

    pipe = build_sdxl_pipeline(seed=3, size=TinySize(image_px=32))
    second_encoder = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    trainer = Trainer(config(tmp_path, method="full", train_text_encoder=True, steps=2, sample_every=2,
                             sample_steps=2, caption_dropout=0.5), pipe)
    output = trainer.run()
    assert set(trainer.modules) == {"unet", "text_encoder", "text_encoder_2"}
    assert any(not torch.equal(second_encoder[k], v) for k, v in pipe.text_encoder_2.state_dict().items())
    result = Engine(make_config()).run(GenerationRequest(model=str(output), mode="sdxl", prompt="a star", steps=2,
                                                         seed=1))
    assert result.images[0].size == (32, 32)


def test_snr_loss_weights_keep_the_noisiest_steps_in_the_v_loss():
    from diffusion_studio.training.trainer import snr_loss_weight

    snr = torch.tensor([1e-4, 1.0, 4.0, 100.0])
    v = snr_loss_weight(snr, 5.0, "v_prediction")
    assert v[0] == 1.0 and v[1] == 1.0  # clean-image weight snr + 1 (about 1) where only the prompt can help
    assert torch.allclose(v[3], torch.tensor(5.0 / 101.0))  # capped at gamma where the image is nearly clean
    eps = snr_loss_weight(snr, 5.0, "epsilon")
    assert eps[0] == 1.0 and torch.allclose(eps[3], torch.tensor(0.05))


def test_inpainting_masks_hide_the_object_a_rectangle_or_everything():
    images, _ = ShapesWorld(seed=3).batch(200)
    rng = random.Random(0)
    masks = [np.asarray(inpainting_mask(image, rng)) > 127 for image in images]
    assert all(mask.any() for mask in masks)
    everything = [mask.all() for mask in masks]
    covers_object = [not mask.all() and (mask >= blob_mask(image)).all() for image, mask in zip(images, masks)]
    assert 0.05 <= np.mean(everything) <= 0.15
    assert np.mean(covers_object) >= 0.4  # the object-box masks, and rectangles that happen to cover it
    assert np.mean([not (e or c) for e, c in zip(everything, covers_object)]) >= 0.2  # partial holes too
    rng_again = random.Random(0)  # the same seed, the same holes: a resumed run rebuilds the same pool
    assert all(((np.asarray(inpainting_mask(image, rng_again)) > 127) == mask).all()
               for image, mask in zip(images[:10], masks))
