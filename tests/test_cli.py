"""The command line: generate writes PNGs that carry their parameters; models lists what exists."""

from pathlib import Path

from PIL import Image
from safetensors.torch import load_file

from diffusion_studio.cli import main
from diffusion_studio.engine.metadata import request_from_png


def test_generate_each_mode_writes_pngs_with_metadata(data_dir, tmp_path, capsys, shape_image, center_mask):
    shape_image.save(tmp_path / "in.png")
    center_mask.save(tmp_path / "mask.png")
    common = ["--data-dir", str(data_dir), "--models-dir", str(tmp_path / "none"), "--steps", "2"]
    runs = [
        ["--mode", "txt2img", "--prompt", "a red circle", "--seed", "5", "--batch-size", "2"],
        ["--mode", "sdxl", "--model", "builtin:shapes-xl", "--prompt", "a star", "--seed", "6"],
        ["--mode", "img2img", "--init-image", str(tmp_path / "in.png"), "--strength", "0.5", "--seed", "7"],
        ["--mode", "inpaint", "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")],
        ["--mode", "controlnet", "--control-image", str(tmp_path / "in.png"), "--seed", "8"],
    ]
    for arguments in runs:
        out = tmp_path / arguments[1]
        assert main(["generate", *common, "--out", str(out), *arguments]) == 0
        written = sorted(out.glob("*.png"))
        assert written, arguments
        request = request_from_png(Image.open(written[0]))
        assert request.mode.value == {"sdxl": "txt2img"}.get(arguments[1], arguments[1]) and request.steps == 2
    first_batch = [request_from_png(Image.open(p)).seed for p in sorted((tmp_path / "txt2img").glob("*.png"))]
    assert sorted(first_batch) == [5, 6]
    assert "seed 5" in capsys.readouterr().err


def test_generate_errors_are_one_line_naming_the_field(data_dir, tmp_path, capsys):
    assert main(["generate", "--data-dir", str(data_dir), "--width", "61", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: width: must be a multiple of 8 between 8 and 1024 (got 61)"
    assert main(["generate", "--data-dir", str(data_dir), "--mode", "img2img", "--init-image",
                 str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert "error: init_image: can't read" in capsys.readouterr().err


def test_generate_with_hires_fix_and_outpainting(data_dir, tmp_path, capsys, shape_image):
    shape_image.save(tmp_path / "in.png")
    common = ["generate", "--data-dir", str(data_dir), "--models-dir", str(tmp_path / "none"), "--steps", "2"]
    assert main([*common, "--width", "32", "--height", "32", "--hires-scale", "2", "--hires-upscaler", "Lanczos",
                 "--out", str(tmp_path / "hires")]) == 0
    (written,) = (tmp_path / "hires").glob("*.png")
    assert Image.open(written).size == (64, 64)
    assert request_from_png(Image.open(written)).hires.upscaler == "Lanczos"
    assert main([*common, "--mode", "inpaint", "--init-image", str(tmp_path / "in.png"), "--strength", "1",
                 "--outpaint", "16,0,0,8", "--out", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out").glob("*.png")
    assert Image.open(written).size == (80, 72)
    capsys.readouterr()
    assert main([*common, "--mode", "inpaint", "--init-image", str(tmp_path / "in.png"), "--outpaint", "16",
                 "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: outpaint: write LEFT,RIGHT,TOP,BOTTOM in pixels, e.g. "
                                              "0,64,0,0 (got '16')")


def test_models_command(data_dir, capsys):
    assert main(["models", "--data-dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("builtin:shapes ") and "built-in" in lines[0]
    builtins = [line for line in lines if line.startswith("builtin:")]
    assert len(builtins) == 5 and all(line.endswith("built-in") for line in builtins)  # every one trained


def test_serve_refuses_a_network_address_without_users(tmp_path, capsys):
    assert main(["serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "auth: auth is required (host 0.0.0.0, auth=auto) but" in capsys.readouterr().err


def test_serve_refuses_devices_this_machine_lacks_in_one_line(tmp_path, capsys):
    assert main(["serve", "--data-dir", str(tmp_path), "--devices", "cpu,gpu1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: devices: 'gpu1' is not a device: use cpu, mps, cuda or "
                                               "cuda:N")
    assert main(["serve", "--data-dir", str(tmp_path), "--devices", "cpu,cuda:99"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: device: 'cuda:99' was asked for, but this")
    assert main(["serve", "--data-dir", str(tmp_path), "--executor", "ray", "--ray-workers", "0"]) == 2
    assert "ray_workers" in capsys.readouterr().err


def test_users_and_tokens(tmp_path, capsys):
    assert main(["users", "add", "alice", "--password", "short", "--data-dir", str(tmp_path)]) == 2
    assert "password: at least 8 characters" in capsys.readouterr().err
    assert main(["users", "add", "alice", "--password", "correct horse", "--data-dir", str(tmp_path)]) == 0
    assert main(["users", "token", "alice", "--data-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("ds_") and token not in (tmp_path / "users.json").read_text()  # stored hashed
    assert main(["users", "token", "bob", "--data-dir", str(tmp_path)]) == 2
    assert "name: no user 'bob'" in capsys.readouterr().err


def test_train_lora_adapts_the_chosen_layers_and_the_text_encoder(data_dir, tmp_path, sd_folder, capsys):
    common = ["train", "lora", "--data-dir", str(data_dir), "--base", str(sd_folder), "--dataset", "shapes",
              "--resolution", "32", "--steps", "2", "--batch-size", "2"]
    assert main([*common, "--name", "kv", "--lora-layers", "attn2.to_k,attn2.to_v", "--train-text-encoder"]) == 0
    lora = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert lora == data_dir / "loras" / "kv.safetensors"
    unet_modules = {key.split(".lora")[0].rsplit(".", 1)[-1] for key in load_file(lora) if key.startswith("unet.")}
    assert unet_modules == {"to_k", "to_v"}
    assert any(key.startswith("text_encoder.") for key in load_file(lora))
    assert main([*common, "--name", "bad", "--lora-layers", "to_nothing"]) == 2
    assert capsys.readouterr().err.startswith("error: lora_layers: ")
