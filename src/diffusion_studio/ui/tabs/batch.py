"""Batch tab: many prompts with shared parameters, submitted together (so the job service can batch them),
with progress per prompt and overall, one gallery, and a zip of everything."""

from __future__ import annotations

import csv
import io
import time
import zipfile
from pathlib import Path

import gradio as gr

from ...studio import Studio
from ..panels import Hires, Params, hires_panel, named_inputs, params_panel, run_buttons, sized, upscale_panel
from ..runs import user_error

EXAMPLE = "a red circle on a white background\na blue star on a black background\na green square on a gray background"


def read_prompts(text: str, upload: str | None) -> list[str]:
    """Prompts, one per line, from the box and from an uploaded .txt (a line each) or .csv (first column, or the
    column named 'prompt')."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if upload:
        content = Path(upload).read_text(encoding="utf-8", errors="replace")
        if upload.lower().endswith(".csv"):
            rows = list(csv.reader(io.StringIO(content)))
            column = rows[0].index("prompt") if rows and "prompt" in rows[0] else 0
            prompts += [row[column].strip() for row in rows[1 if rows and "prompt" in rows[0] else 0:]
                        if len(row) > column and row[column].strip()]
        else:
            prompts += [line.strip() for line in content.splitlines() if line.strip()]
    return prompts


def zip_images(paths: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"batch-{time.strftime('%Y%m%d-%H%M%S')}.zip"
    with zipfile.ZipFile(target, "w") as archive:
        for path in paths:
            archive.write(path, path.name)
    return target


def build(studio: Studio) -> None:
    with gr.Tab("Batch", id="batch", elem_id="tab-batch"):
        with gr.Row():
            with gr.Column(scale=2):
                prompts = gr.Textbox(label="Prompts, one per line", lines=6, value=EXAMPLE)
                upload = gr.File(label="…or a .txt / .csv of prompts", file_types=[".txt", ".csv"], type="filepath")
                negative = gr.Textbox(label="Negative prompt (all)", lines=1)
                params = params_panel(studio)
                hires = hires_panel(studio)
                run, cancel = run_buttons("Run batch")
            with gr.Column(scale=3):
                overall = gr.Markdown()
                table = gr.Dataframe(headers=["#", "prompt", "state"], datatype=["number", "str", "str"],
                                     interactive=False, label="Progress per prompt")
                gallery = gr.Gallery(label="Results", columns=4, height=320, format="png", preview=False,
                                     interactive=False, elem_classes=["ds-results"])
                upscale_panel(studio, gallery)
                archive = gr.File(label="Download all (zip)", interactive=False)

        gr.Examples([[EXAMPLE], ["a red star on a white background at the top left\na red star on a white background "
                                 "at the bottom right\na red star on a white background in the center"]], [prompts])

        async def run_batch(request: gr.Request, progress=gr.Progress(), *, prompts, upload, negative, **panel):
            lines = read_prompts(prompts, upload)
            if not lines:
                raise gr.Error("prompts: give at least one prompt (a line each, or a file)", title="Invalid input")
            try:
                shared = {"mode": "txt2img", "negative_prompt": negative, **Params.fields(panel), **Hires.fields(panel)}
                requests = [studio.validate({**shared, "prompt": line}) for line in lines]
            except Exception as exc:
                raise user_error(exc) from None
            states = {index: "queued" for index in range(len(lines))}
            index_of, images = {}, {}

            def table_rows():
                return [[i + 1, lines[i], states[i]] for i in range(len(lines))]

            done = 0
            try:
                async for event in studio.jobs.follow_many(requests, request.username or "local"):
                    if event.job_id not in index_of:
                        index_of[event.job_id] = len(index_of)
                    index = index_of[event.job_id]
                    if event.kind == "step":
                        states[index] = f"step {event.data['step']}/{event.data['total']}"
                    elif event.kind == "position":
                        states[index] = f"queued #{event.data['position']}"
                    elif event.final:
                        done += 1
                        outcome = event.outcome
                        states[index] = outcome.status if outcome.error is None else \
                            f"{outcome.status}: {outcome.error.text()}"
                        if outcome.ok:
                            images[index] = studio.image_paths(outcome.result["image_ids"])
                    progress((done, len(lines)), desc="Batch")
                    paths = sized([p for i in sorted(images) for p in images[i]])
                    yield f"**{done}/{len(lines)}** prompts finished", table_rows(), paths, gr.skip()
            except Exception as exc:
                raise user_error(exc) from None
            all_paths = [p for i in sorted(images) for p in images[i]]
            archive_path = zip_images(all_paths, studio.outputs_dir / "batches") if all_paths else None
            yield (f"**{done}/{len(lines)}** prompts finished · {len(all_paths)} images", table_rows(),
                   sized(all_paths), str(archive_path) if archive_path else None)

        inputs = named_inputs({"prompts": prompts, "upload": upload, "negative": negative}, params, hires)
        event = run.click(run_batch, inputs_kwargs=inputs, outputs=[overall, table, gallery, archive],
                          api_name="batch")
        cancel.click(None, None, None, cancels=[event])
