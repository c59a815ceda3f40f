"""Models panel (in the System tab): every model of every kind the studio finds (name, kind, family, status), a
refresh that reads the models folders again, and for admins an import of a model file into the studio's own
models folder (its header says what it is before anything is written)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gradio as gr

from ...engine.library import KINDS
from ...studio import Studio
from ..runs import user_error

HEADERS = ["name", "kind", "family", "status"]
ANY_KIND = "any kind"


def model_rows(studio: Studio, kind: str | None = None, user: str | None = None) -> list[list[str]]:
    """The table's rows as `user` may see them (other users' trained LoRAs left out)."""
    rows = []
    for row in studio.models(kind, user):
        status = ("ok" if row["usable"] else f"unusable: {row['reason']}") if row["path"] else row["origin"]
        rows.append([row["name"], row["kind"], row["family"] or "?", status])
    return rows


def import_file(studio: Studio, user: str, is_admin: Callable[[str], bool], file: str | None, name: str | None,
                kind: str | None, replace: bool) -> str:
    """The Import button: the outcome as text; a refusal is raised as the studio's error box."""
    if not is_admin(user):
        raise gr.Error("only an admin may import models", title="Not allowed")
    if not file:
        raise gr.Error("file: choose a model file to import", title="Invalid input")
    upload = Path(file)
    # Gradio keeps the upload under its own name in its cache folder: copied, so the studio never moves it.
    try:
        row = studio.import_model(upload, file_name=upload.name, name=(name or "").strip() or None,
                                  kind=None if kind in (None, "", ANY_KIND) else kind, replace=bool(replace))
    except Exception as exc:  # every refusal (422/409 in the API) as the same error box the other tabs show
        raise user_error(exc) from None
    return f"Imported **{row['name']}**: {row['description']} (`{row['path']}`)."


def build(studio: Studio, is_admin: Callable[[str], bool], tab: gr.Tab) -> None:
    """The panel, filled (and its import shown to admins only) whenever `tab` is selected."""
    with gr.Accordion("Models", open=True, elem_id="models-panel"):
        with gr.Row():
            kind = gr.Dropdown([ANY_KIND, *KINDS], value=ANY_KIND, label="Kind", scale=1)
            refresh = gr.Button("Refresh models", scale=1)
        table = gr.Dataframe(headers=HEADERS, interactive=False, label="Models (built-in, configured, models folders)")
        with gr.Group(visible=False) as admin_box:
            gr.Markdown("**Import a model** (admins): a `.safetensors` checkpoint, ControlNet, LoRA, VAE or "
                        "embedding (or a weights-only `.ckpt`/`.pt`); its header says what it is before it lands in "
                        "the studio's own models folder. A file already on the server (or one larger than this "
                        "page may upload): `POST /api/v1/models` with `{\"path\": ...}`.")
            with gr.Row():
                upload = gr.File(label="Model file", file_types=[".safetensors", ".ckpt", ".pt", ".pth", ".bin"],
                                 type="filepath", scale=3)
                with gr.Column(scale=2):
                    name = gr.Textbox(label="Name (optional)", placeholder="default: the file name")
                    import_kind = gr.Dropdown([ANY_KIND, *KINDS], value=ANY_KIND, label="Must be (optional)")
                    replace = gr.Checkbox(label="Replace a model of that name", value=False)
                    do_import = gr.Button("Import", variant="primary")
            outcome = gr.Markdown()

        def listing(request: gr.Request, kind_value):
            return model_rows(studio, None if kind_value == ANY_KIND else kind_value, request.username or "local")

        def refreshed(request: gr.Request, kind_value):
            studio.refresh_models()
            return listing(request, kind_value)

        def imported(request: gr.Request, file, name_value, kind_value, replace_value, shown_kind):
            text = import_file(studio, request.username or "local", is_admin, file, name_value, kind_value,
                               replace_value)
            return text, listing(request, shown_kind)

        def opened(request: gr.Request, kind_value):
            return gr.update(visible=is_admin(request.username or "local")), listing(request, kind_value)

        refresh.click(refreshed, kind, table, api_name="models")
        kind.change(listing, kind, table, api_visibility="private")
        do_import.click(imported, [upload, name, import_kind, replace, kind], [outcome, table],
                        api_visibility="private")
        tab.select(opened, kind, [admin_box, table], api_visibility="private")
