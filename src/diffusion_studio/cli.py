"""diffusion-studio serve | generate | models"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import logging
import os
import sys
from pathlib import Path


from .requests import Mode, RequestError, default_of


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `then(module)` once the module `name` has been imported, by whoever imports it first: a library is
    configured when it arrives, never imported just to be configured (diffusers and transformers take seconds to
    import, and `serve` needs neither until a model loads)."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and the search below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            loader, then = spec.loader, self.then

            class Configured(importlib.abc.Loader):
                def create_module(self, spec):
                    return loader.create_module(spec)

                def exec_module(self, module):
                    loader.exec_module(module)
                    then(module)

                def __getattr__(self, attribute):  # get_source, get_resource_reader, ...: the real loader's
                    return getattr(loader, attribute)

            spec.loader = Configured()
        return spec


def _quiet_library(logging_module) -> None:
    logging_module.set_verbosity_error()
    logging_module.disable_progress_bar()


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        if name in sys.modules:
            _quiet_library(sys.modules[name])
        elif not any(isinstance(finder, _AfterImport) and finder.name == name for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(name, _quiet_library))


def _no_stub_files(component_meta) -> None:
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None


def _skip_gradio_stub_files() -> None:
    """Gradio's component classes, as each is defined, re-derive their type stubs: read their own source, parse it,
    render the stub from a template, compare it with the .pyi beside them and rewrite it if it differs. That is an
    aid for Gradio's own developers (and it writes into the installed package); the classes are the same without
    it, and it is half of `import gradio` (about 2.5 s of a 5 s import on this 2-core machine). Once Gradio's
    component_meta arrives, its stub writer does nothing (no file of Gradio's is changed)."""
    name = "gradio.component_meta"
    if name in sys.modules:
        _no_stub_files(sys.modules[name])
    elif not any(isinstance(finder, _AfterImport) and finder.name == name for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, _no_stub_files))


def _config(args, **more):
    """The config from the common flags (and `more` settings given by a command's own flags; None: unset)."""
    from .config import StudioConfig

    if args.config:
        if not Path(args.config).is_file():
            raise RequestError("config", f"config file '{args.config}' does not exist")
        os.environ["DS_CONFIG_FILE"] = args.config

    models_dirs = args.models_dir or []  # the first is the studio's own (imports land there), the rest are scanned
    overrides = {key: value for key, value in (("data_dir", args.data_dir), ("models_dir", models_dirs[:1]),
                                               ("models_dirs", models_dirs[1:]), ("device", args.device),
                                               ("dtype", args.dtype)) if value}
    if "models_dir" in overrides:
        overrides["models_dir"] = overrides["models_dir"][0]
    return StudioConfig(**overrides, **{key: value for key, value in more.items() if value is not None})


def _parse_lora(text: str) -> dict:
    name, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return {"name": name, "weight": float(weight)}
    except ValueError:
        return {"name": text, "weight": 1.0}


def _parse_outpaint(text: str | None) -> dict | None:
    """--outpaint LEFT,RIGHT,TOP,BOTTOM (pixels, multiples of 8)."""
    if not text:
        return None
    parts = text.split(",")
    try:
        left, right, top, bottom = (int(part) for part in parts)
    except ValueError:
        raise RequestError("outpaint", f"write LEFT,RIGHT,TOP,BOTTOM in pixels, e.g. 0,64,0,0 (got '{text}')") from None
    return {"left": left, "right": right, "top": top, "bottom": bottom}


def cmd_generate(args) -> int:
    from .studio import Studio

    studio = Studio(_config(args))
    fields = {"mode": args.mode, "model": args.model or studio.config.default_model, "prompt": args.prompt,
              "negative_prompt": args.negative_prompt, "steps": args.steps, "guidance": args.guidance,
              "width": args.width, "height": args.height, "seed": args.seed, "scheduler": args.scheduler,
              "batch_size": args.batch_size, "strength": args.strength, "controlnet": args.controlnet,
              "control_type": args.control_type, "loras": [_parse_lora(item) for item in args.lora],
              "clip_skip": args.clip_skip, "vae": args.vae, "mask_invert": args.mask_invert or None,
              "inpaint_area": args.inpaint_area, "inpaint_padding": args.inpaint_padding,
              "inpaint_fill": args.inpaint_fill, "outpaint": _parse_outpaint(args.outpaint)}
    if args.hires_scale or args.hires_upscaler:
        fields["hires"] = {k: v for k, v in {"scale": args.hires_scale, "upscaler": args.hires_upscaler,
                                             "steps": args.hires_steps,
                                             "denoising_strength": args.hires_denoise}.items() if v is not None}
    for field, path in (("init_image", args.init_image), ("mask_image", args.mask),
                        ("control_image", args.control_image)):
        if path:
            try:
                fields[field] = Path(path).read_bytes()
            except OSError as exc:
                raise RequestError(field, f"can't read '{path}': {exc.strerror}") from None
    request = studio.validate({k: v for k, v in fields.items() if v is not None})

    def show(event):
        print(f"\rstep {event.step}/{event.total}  eta {event.eta_s:.1f}s", end="", file=sys.stderr, flush=True)

    result = studio.generate(request, on_step=show)
    print(file=sys.stderr)
    for path in studio.save(result, Path(args.out)):
        print(path)
    t = result.timings
    print(f"{len(result.images)} image(s), seed {result.seed}, {t.total_s:.2f}s (load {t.load_s:.2f}s, "
          f"{t.it_per_s:.1f} it/s), peak memory {result.peak_memory_bytes / 2**20:.0f} MiB on {result.device}",
          file=sys.stderr)
    return 0


def _print_training_event(event) -> None:
    if event.kind == "step" and (event.step % 50 == 0 or event.step == event.total):
        parts = [f"{event.message or 'train'} step {event.step}/{event.total}", f"loss {event.loss:.4f}"]
        if event.grad_norm is not None:
            parts += [f"grad {event.grad_norm:.3f}", f"lr {event.lr:.2e}", f"stability {event.stability:.0f}"]
        if event.eta_s is not None:
            parts.append(f"eta {event.eta_s / 60:.1f} min")
        print("  ".join(parts), file=sys.stderr, flush=True)
    elif event.kind == "sample":
        adherence = event.data.get("adherence")
        print(f"samples at step {event.step}" + (f": checker adherence {adherence:.0%}" if adherence is not None
                                                  else ""), file=sys.stderr, flush=True)
    elif event.kind in ("warning", "error", "done", "state"):
        print(f"{event.kind}: {event.message}", file=sys.stderr, flush=True)


def cmd_train_builtin(args) -> int:
    from .workshop.recipes import TRAINERS, train_builtin
    from .engine.pipelines import pick_device
    from .training.events import EventBus

    if args.name not in TRAINERS:
        raise RequestError("name", f"no training recipe for '{args.name}' yet; recipes: {', '.join(TRAINERS)}")
    bus = EventBus()
    bus.subscribe(_print_training_event)
    work = Path(args.work or Path("data/training") / args.name)
    output = train_builtin(args.name, work, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                           batch_size=args.batch_size, install=not args.no_install, bus=bus, snapshot=args.snapshot,
                           from_scratch=args.from_scratch, device=pick_device(args.device or "auto"),
                           pool_size=args.pool_size)
    print(output)
    return 0


def cmd_train_lora(args) -> int:
    from .service.training import install_lora, lora_trainer
    from .training.config import TrainConfig
    from .training.events import EventBus, JsonlLog

    config = _config(args)
    train = TrainConfig(base=args.base, method="lora", dataset=args.dataset, instance_prompt=args.instance_prompt,
                        resolution=args.resolution, steps=args.steps, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, lora_rank=args.rank, lora_alpha=args.rank,
                        train_text_encoder=args.train_text_encoder, seed=args.seed,
                        output_dir=Path(config.data_dir) / "training" / f"lora-{args.name}",
                        **({"lora_layers": args.lora_layers.split(",")} if args.lora_layers else {}))
    bus = EventBus()
    bus.subscribe(_print_training_event)
    bus.subscribe(JsonlLog(train.output_dir / "log.jsonl"))
    output = lora_trainer(config, train, bus).run()
    print(install_lora(config, output, args.name))  # where generation looks LoRAs up by name
    return 0


def cmd_models(args) -> int:
    from .studio import Studio

    for row in Studio(_config(args)).models(args.kind):
        if row["usable"]:
            where = f"{row['origin']}: {row['path']}" if row["path"] else row["origin"]
            status = f"ok ({where})" if row["path"] else where
        else:
            status = f"unusable ({row['path']}): {row['reason']}"
        print(f"{row['name']:<32} {row['kind']:<10} {row['family'] or '?':<5} {status}")
    return 0


SHUTDOWN_GRACE_S = 2
KEEP_ALIVE_S = 75


def cmd_serve(args) -> int:
    import uvicorn

    from .server import build_app

    devices = [device.strip() for device in args.devices.split(",")] if args.devices else None
    config = _config(args, executor=args.executor, devices=devices, ray_address=args.ray_address,
                     ray_workers=args.ray_workers).model_copy(update={"host": args.host, "port": args.port})
    app = build_app(config)  # refuses a network address without users to authenticate
    print(f"Diffusion Studio on http://{config.host}:{config.port}/  (API docs: /docs)", file=sys.stderr)
    # Open browser tabs, SSE streams and WebSockets never end by themselves: after a stop signal, give them
    # SHUTDOWN_GRACE_S, then close them, so SIGTERM / Ctrl-C stop the server within seconds.
    # An idle keep-alive connection is kept longer than clients keep theirs (httpx 5 s, aiohttp 15 s; nginx's
    # default is 75 s): with uvicorn's 5 s, a client reusing one as the server closes it got a dropped request.
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S, timeout_keep_alive=KEEP_ALIVE_S)
    return 0


def cmd_users(args) -> int:
    from .service.auth import Users

    config = _config(args)
    users = Users(config.users_path())
    try:
        if args.action == "add":
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else args.password
            if not password:
                raise ValueError("password: give --password or --password-stdin")
            users.add(args.name, password, admin=args.admin)
            print(f"{'admin' if args.admin else 'user'} '{args.name}' saved in {config.users_path()}")
        elif args.action == "token":
            print(users.create_token(args.name, args.label or ""))
        else:
            print("\n".join(users.names()))
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise RequestError(field, message) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-studio", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (also DS_CONFIG_FILE); see README for the keys")
    common.add_argument("--data-dir", help="history, outputs, built-in stand-ins (default: ./data)")
    common.add_argument("--models-dir", action="append", metavar="FOLDER",
                        help="models folder: the studio's own, or an A1111/Forge or ComfyUI install (default: "
                             "./models); give it again for more folders, scanned in order (the first is where "
                             "imports land; a name in an earlier folder wins)")
    common.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    common.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="start the studio (UI + API)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--executor", choices=["local", "ray"], help="where jobs run (default local: this process)")
    serve.add_argument("--devices", metavar="DEV,DEV", help="local executor: one worker per device, e.g. "
                                                            "cuda:0,cuda:1 (default: the one --device)")
    serve.add_argument("--ray-address", metavar="HOST:PORT", help="ray executor: the cluster to join (default: start "
                                                                  "Ray on this machine)")
    serve.add_argument("--ray-workers", type=int, help="ray executor: engine actors (default: one per GPU, or one "
                                                       "CPU actor)")
    serve.set_defaults(func=cmd_serve)

    generate = sub.add_parser("generate", parents=[common], help="generate images into a folder")
    generate.add_argument("--model")
    generate.add_argument("--mode", default="txt2img", choices=[*(m.value for m in Mode), "sdxl"],
                          help="sdxl: an alias of txt2img (the model's family picks the SD or SDXL pipeline)")
    generate.add_argument("--prompt", default="")
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--steps", type=int, default=default_of("steps"))
    generate.add_argument("--guidance", type=float, default=default_of("guidance"))
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--scheduler", default="Euler")
    generate.add_argument("--batch-size", type=int, default=1)
    generate.add_argument("--clip-skip", type=int, help="A1111's CLIP skip: 1 = the last layer (default), 2 = the "
                                                         "one before, ...")
    generate.add_argument("--vae", help="a VAE file or folder (by name in the models folders, or a path); default: "
                                        "the model's own")
    generate.add_argument("--init-image")
    generate.add_argument("--mask")
    generate.add_argument("--control-image")
    generate.add_argument("--control-type", default="canny")
    generate.add_argument("--strength", type=float)
    generate.add_argument("--controlnet", help="default: the base's matching built-in ControlNet")
    generate.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]")
    generate.add_argument("--hires-scale", type=float, help="hires fix: the final size over the base size (1-4)")
    generate.add_argument("--hires-upscaler", help="hires fix's upscaler (default Latent; see `models --kind "
                                                   "upscaler` for model files)")
    generate.add_argument("--hires-steps", type=int, help="hires fix's second pass steps (default: --steps)")
    generate.add_argument("--hires-denoise", type=float, help="hires fix's denoising strength (default 0.7)")
    generate.add_argument("--inpaint-area", choices=["whole", "masked"], help="masked: A1111's 'only masked'")
    generate.add_argument("--inpaint-padding", type=int, help="pixels around the mask's box (inpaint area masked)")
    generate.add_argument("--inpaint-fill", choices=["original", "fill", "latent noise", "latent nothing"])
    generate.add_argument("--mask-invert", action="store_true", help="repaint the black area of the mask")
    generate.add_argument("--outpaint", metavar="LEFT,RIGHT,TOP,BOTTOM", help="inpaint mode: extend the canvas")
    generate.add_argument("--out", default="outputs")
    generate.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="train the built-in models or a LoRA")
    train_sub = train.add_subparsers(dest="what", required=True)
    builtin = train_sub.add_parser("builtin", parents=[common], help="rebuild a built-in model from scratch")
    builtin.add_argument("--name", required=True,
                         help="built-in to train: shapes, then shapes-canny, shapes-inpaint, shapes-xl")
    builtin.add_argument("--work", help="checkpoints and logs (default: data/training/<name>); resumes from it")
    builtin.add_argument("--vae-steps", type=int, default=1500)
    builtin.add_argument("--unet-steps", type=int, default=30000, help="UNet (or ControlNet) training steps")
    builtin.add_argument("--batch-size", type=int, default=64)
    builtin.add_argument("--pool-size", type=int, help="shapes-world samples encoded once and drawn from "
                                                       "(default: the recipe's, 20000; 8000 for shapes-canny)")
    builtin.add_argument("--no-install", action="store_true", help="don't copy the result into builtin/models")
    builtin.add_argument("--from-scratch", action="store_true",
                         help="new UNet and text encoder even if the built-in is installed (the autoencoder trained "
                              "in --work is kept); without it a run continues from the installed weights")
    builtin.add_argument("--snapshot", action="store_true",
                         help="export the run's latest checkpoint now (EMA weights), without training")
    builtin.set_defaults(func=cmd_train_builtin)
    lora = train_sub.add_parser("lora", parents=[common], help="fine-tune a LoRA on a folder of images")
    lora.add_argument("--name", required=True, help="the LoRA's name in generation (loras=[{name: ...}])")
    lora.add_argument("--base", default="builtin:shapes")
    lora.add_argument("--dataset", required=True, help="folder of images (+ name.txt captions) or 'shapes'")
    lora.add_argument("--instance-prompt")
    lora.add_argument("--resolution", type=int, default=64)
    lora.add_argument("--steps", type=int, default=300)
    lora.add_argument("--batch-size", type=int, default=8)
    lora.add_argument("--learning-rate", type=float, default=1e-3)
    lora.add_argument("--rank", type=int, default=8)
    lora.add_argument("--lora-layers", help="comma-separated UNet modules to adapt (default: all attention "
                                            "projections; attn2.to_k,attn2.to_v disturbs other prompts least)")
    lora.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    lora.add_argument("--seed", type=int, default=0)
    lora.set_defaults(func=cmd_train_lora)

    users = sub.add_parser("users", help="manage users and API tokens (auth)")
    users_sub = users.add_subparsers(dest="action", required=True)
    add = users_sub.add_parser("add", parents=[common], help="add a user or change a password")
    add.add_argument("name")
    add.add_argument("--password")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--admin", action="store_true", help="may pause the queue and unload models")
    token = users_sub.add_parser("token", parents=[common], help="create an API token (printed once)")
    token.add_argument("name")
    token.add_argument("--label")
    users_sub.add_parser("list", parents=[common], help="list users")
    for parser_ in (add, token, users_sub.choices["list"]):
        parser_.set_defaults(func=cmd_users)

    models = sub.add_parser("models", parents=[common], help="list built-in, configured and found models of every "
                                                             "kind, with the reason a file can't be used")
    models.add_argument("--kind", choices=["checkpoint", "controlnet", "lora", "vae", "embedding", "upscaler"])
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command in ("serve", "train") else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    _skip_gradio_stub_files()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, from the same outcome table as every other front end
        from .service.outcomes import ErrorKind, classify
        from .training.data import DatasetError
        from .training.trainer import TrainingError

        if isinstance(exc, (DatasetError, TrainingError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        error = classify(exc)
        if error.kind == ErrorKind.internal:
            logging.getLogger("diffusion_studio").exception("unexpected failure")
        print(f"error: {error.text()}", file=sys.stderr)
        return 2 if error.http_status < 500 else 1


if __name__ == "__main__":
    sys.exit(main())
