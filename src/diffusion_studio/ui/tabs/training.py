"""Training tab: train a LoRA on the shapes world or on uploaded images, watching live plots of loss, gradient
norm, learning rate and stability, with sample images; a finished LoRA is usable in every tab at once."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from ...studio import Studio
from ...training.config import LORA_ATTENTION, LORA_CROSS_ATTENTION_KV, TrainConfig
from ..runs import user_error

LORA_LAYERS = {"all attention": LORA_ATTENTION, "cross-attention keys/values": LORA_CROSS_ATTENTION_KV}
METRICS = {"loss": "Loss", "grad_norm": "Gradient norm", "lr": "Learning rate", "stability": "Stability (0-100)"}


def copy_dataset(files: list[str], folder: Path) -> Path:
    """Uploaded images (and same-named .txt captions) into a fresh dataset folder."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for file in files:
        shutil.copyfile(file, folder / Path(file).name)
    return folder


def build(studio: Studio) -> None:
    with gr.Tab("Training", id="training", elem_id="tab-training"):
        with gr.Row():
            with gr.Column(scale=2):
                base = gr.Dropdown([name for name in studio.base_model_names() if "xl" not in name],
                                   value=studio.config.default_model, label="Base model", allow_custom_value=True)
                name = gr.Textbox(label="LoRA name", value="my-lora", info="letters, digits, - and _")
                dataset = gr.Radio(["shapes world", "uploaded images"], value="shapes world", label="Dataset")
                files = gr.File(label="Images (+ optional .txt captions with the same names)", file_count="multiple",
                                type="filepath", file_types=["image", ".txt"])
                instance_prompt = gr.Textbox(label="Instance prompt", info="caption for images without a .txt",
                                             placeholder="a red heart on a white background")
                with gr.Row():
                    rank = gr.Slider(1, 64, value=8, step=1, label="LoRA rank")
                    steps = gr.Slider(10, 5000, value=200, step=10, label="Steps")
                with gr.Row():
                    learning_rate = gr.Number(1e-3, label="Learning rate")
                    batch = gr.Slider(1, 64, value=8, step=1, label="Batch")
                    sample_every = gr.Slider(0, 1000, value=50, step=10, label="Sample every N steps",
                                             info="0: no samples")
                with gr.Row():
                    layers = gr.Radio(list(LORA_LAYERS), value="all attention", label="LoRA adapts",
                                      info="keys/values of cross-attention: disturbs other prompts least")
                    text_encoder = gr.Checkbox(False, label="Text encoder too",
                                               info="for a new word the base model has never seen")
                with gr.Row():
                    start = gr.Button("Start", variant="primary")
                    pause = gr.Button("Pause")
                    resume = gr.Button("Resume")
                    stop = gr.Button("Stop", variant="stop")
            with gr.Column(scale=3):
                status = gr.Markdown("No training run yet.")
                with gr.Row():
                    plots = {key: gr.LinePlot(x="step", y=key, title=title, height=180, x_title="step",
                                              y_title=title) for key, title in list(METRICS.items())[:2]}
                with gr.Row():
                    plots |= {key: gr.LinePlot(x="step", y=key, title=title, height=180, x_title="step",
                                               y_title=title) for key, title in list(METRICS.items())[2:]}
                samples = gr.Gallery(label="Samples while training", columns=4, height=200, preview=False,
                                     interactive=False)
        timer = gr.Timer(1.0, active=False)
        gr.Examples([["builtin:shapes", "quick-shapes", "shapes world", "", 8, 200, 1e-3, 8, 50, "all attention",
                      False],
                     ["builtin:shapes", "red-hearts", "uploaded images", "a red heart on a white background", 8, 500,
                      1e-3, 8, 50, "cross-attention keys/values", True]],  # the LoRA proof's recipe
                    [base, name, dataset, instance_prompt, rank, steps, learning_rate, batch, sample_every, layers,
                     text_encoder])

        settings = {"base": base, "name": name, "dataset": dataset, "files": files, "instance_prompt": instance_prompt,
                    "rank": rank, "steps": steps, "learning_rate": learning_rate, "batch": batch,
                    "sample_every": sample_every, "layers": layers, "text_encoder": text_encoder}

        def start_run(request: gr.Request, *, base, name, dataset, files, instance_prompt, rank, steps, learning_rate,
                      batch, sample_every, layers, text_encoder):
            user = request.username or "local"
            try:
                # The name becomes a folder below: refused (a bad name, another run going, another user's LoRA)
                # before anything is written there.
                studio.check_training(name, user)
                if dataset == "uploaded images":
                    if not files:
                        raise gr.Error("dataset: upload some images first", title="Invalid input")
                    folder = copy_dataset(files, Path(studio.config.data_dir) / "datasets" / name)
                else:
                    folder = "shapes"
                train = TrainConfig(
                    base=base, method="lora", dataset=str(folder), instance_prompt=instance_prompt or None,
                    steps=int(steps), batch_size=int(batch), learning_rate=float(learning_rate),
                    lora_rank=int(rank), lora_alpha=float(rank), sample_every=int(sample_every),
                    lora_layers=list(LORA_LAYERS[layers]), train_text_encoder=bool(text_encoder),
                    sample_prompts=[instance_prompt or "a red circle on a white background"], sample_steps=10,
                    pool_size=256, checkpoint_every=max(10, int(steps) // 4),
                    output_dir=Path(studio.config.data_dir) / "training" / f"lora-{name}-{int(time.time())}")
                studio.start_training(name, train, user)
            except gr.Error:
                raise
            except Exception as exc:
                raise user_error(exc) from None
            return gr.Timer(active=True), f"Starting **{name}** (building the dataset)…"

        def refresh(request: gr.Request):
            run = studio.training.current
            if run is None:
                return [gr.Timer(active=False), "No training run yet.", *[gr.skip()] * (len(plots) + 1)]
            summary = run.summary()
            user = request.username or "local"
            if not studio.training.visible(run, user, studio.is_admin(user)):  # its name, figures and samples
                text = (f"Another user's LoRA is training (step {summary['step']}/{summary['total']}); the trainer "
                        "is free for a run of yours when it ends." if not run.finished else
                        "No training run of yours yet.")
                return [gr.Timer(active=not run.finished), text, *[None] * len(plots), []]
            frame = pd.DataFrame(run.events or [{"step": 0, **{key: 0.0 for key in METRICS}}])
            eta = f" · about {summary['eta_s']:.0f}s left" if summary["eta_s"] and not run.finished else ""
            loss = f" · loss {summary['loss']:.4f}" if summary["loss"] is not None else ""
            text = f"**{run.name}**: {summary['state']} · step {summary['step']}/{summary['total']}{loss}{eta}"
            if summary["lora"]:
                text += f"\n\n✅ LoRA saved: `{run.name}` is in every tab's LoRA list now."
            if summary["messages"]:
                text += "\n\n" + "\n".join(f"- {message}" for message in summary["messages"])
            plot_values = [frame[["step", key]].dropna() if key in frame else None for key in plots]
            return [gr.Timer(active=not run.finished), text, *plot_values, list(run.samples)]

        start.click(start_run, inputs_kwargs=settings, outputs=[timer, status], api_name="train_start")
        timer.tick(refresh, None, [timer, status, *plots.values(), samples], api_name="train_status",
                   show_progress="hidden")
        def steer(action: str):
            def handler(request: gr.Request) -> None:
                user = request.username or "local"
                try:
                    getattr(studio.training, action)(user, studio.is_admin(user))
                except Exception as exc:
                    raise user_error(exc) from None
            return handler

        pause.click(steer("pause"), None, None, api_name="train_pause")
        resume.click(steer("resume"), None, None, api_name="train_resume")
        stop.click(steer("stop"), None, None, api_name="train_stop")
