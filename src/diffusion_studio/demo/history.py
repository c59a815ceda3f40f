"""generation_history's entries: the seed's shape (prompt, negative_prompt, parameters, generation_time,
timestamp), then ours, from a job record of the studio's history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from ..service.store import JobRecord


def history_entry(record: JobRecord, images: list[Path]) -> dict[str, Any]:
    """One job as the seed recorded a generation: parameters {steps, guidance_scale, height, width, seed} (the
    size the image has when the request left it to the model, the seed it ran with when it asked for a random
    one), generation_time (seconds it ran), timestamp (when it finished); and ours: id, status, mode, model,
    seeds, images (paths), error, created_at."""
    request, seeds = record.request, record.result.get("seeds", [])
    width, height = request.get("width"), request.get("height")
    if images and (width is None or height is None):  # the model's native size: the image says which
        with Image.open(images[0]) as image:
            width, height = image.size
    ran = record.finished_at - record.started_at if record.finished_at and record.started_at else None
    return {
        "prompt": request.get("prompt"), "negative_prompt": request.get("negative_prompt"),
        "parameters": {"steps": request.get("steps"), "guidance_scale": request.get("guidance"),
                       "height": height, "width": width, "seed": seeds[0] if seeds else request.get("seed")},
        "generation_time": ran, "timestamp": record.finished_at or record.created_at,
        "id": record.id, "status": record.status.value, "mode": request.get("mode"), "model": request.get("model"),
        "seeds": seeds, "images": [str(path) for path in images],
        "error": record.error.text() if record.error else None, "created_at": record.created_at,
    }
