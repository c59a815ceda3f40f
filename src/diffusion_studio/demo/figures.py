"""The training figure: losses, gradient norms, learning rates and stability scores in a 2x2 grid, as one image.

Drawn on matplotlib's Agg canvas directly (a Figure of its own, no pyplot state), so it is safe in any thread and
needs no display; the pixels come from `canvas.buffer_rgba()` (the seed's `tostring_rgb` is gone from matplotlib).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

# (the seed's dict-of-lists key, a training step event's key, panel title, y label)
SERIES = (
    ("losses", "loss", "Training Loss", "Loss"),
    ("grad_norms", "grad_norm", "Gradient Norm", "Norm"),
    ("learning_rates", "lr", "Learning Rate", "LR"),
    ("stability_scores", "stability", "Stability Score", "Score"),
)
STEPS_KEY = "steps"
FIGURE_SIZE = (12, 8)  # inches at 100 dpi: a 1200x800 image, as the seed's
DPI = 100
LINE_COLOR = "#1f77b4"  # matplotlib's C0

Series = dict[str, tuple[list[float], list[float]]]  # seed key -> (steps, values)


def training_series(stats: Any) -> Series:
    """Each series as (steps, values), from either shape:
    - a dict of lists, the seed's: `losses`, `grad_norms`, `learning_rates`, `stability_scores` (the step events'
      names `loss`, `grad_norm`, `lr`, `stability` work too), and optionally `steps` for the x axis;
    - a list of per-step records, the studio's training events (`TrainingRun.events`, a run's log.jsonl lines, or
      TrainingEvent objects): `step`, `loss`, `grad_norm`, `lr`, `stability`; records of another `kind` than
      "step" (samples, checkpoints, messages) are skipped, and so is a missing or None value.
    Raises ValueError naming the keys it reads when there is nothing to draw."""
    if isinstance(stats, Mapping):
        series = _from_lists(stats)
    elif isinstance(stats, Sequence) and not isinstance(stats, (str, bytes)):
        series = _from_records(stats)
    else:
        raise TypeError(f"stats: give a dict of lists or a list of per-step dicts (got {type(stats).__name__})")
    if not any(values for _, values in series.values()):
        accepted = ", ".join(f"{seed} / {event}" for seed, event, _, _ in SERIES)
        raise ValueError(f"stats: no values to draw; it reads {accepted} (and {STEPS_KEY} or step for the x axis)")
    return series


def _from_lists(stats: Mapping) -> Series:
    series: Series = {}
    for seed_key, event_key, _, _ in SERIES:
        key = seed_key if seed_key in stats else event_key
        values = [_number(value, key) for value in _listed(stats.get(key))]
        steps = _listed(stats.get(STEPS_KEY, stats.get("step")))
        xs = [float(step) for step in steps] if len(steps) == len(values) else list(range(len(values)))
        kept = [(x, y) for x, y in zip(xs, values) if y is not None]
        series[seed_key] = ([x for x, _ in kept], [y for _, y in kept])
    return series


def _from_records(records: Sequence) -> Series:
    series: Series = {seed_key: ([], []) for seed_key, _, _, _ in SERIES}
    for index, record in enumerate(records):
        if dataclasses.is_dataclass(record) and not isinstance(record, type):
            record = dataclasses.asdict(record)
        if not isinstance(record, Mapping):
            raise TypeError(f"stats[{index}]: each record must be a dict (got {type(record).__name__})")
        if record.get("kind", "step") != "step":
            continue
        step = float(record.get("step", index))
        for seed_key, event_key, _, _ in SERIES:
            value = _number(record.get(event_key), event_key)
            if value is not None:
                series[seed_key][0].append(step)
                series[seed_key][1].append(value)
    return series


def _listed(values: Any) -> list:
    return [] if values is None else list(values)  # lists, tuples, numpy arrays, tensors


def _number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"stats: {key} values must be numbers (got {value!r})") from None
    return number if math.isfinite(number) else None


def training_figure(series: Series) -> Image.Image:
    """The 2x2 figure as an RGB image; a panel without values says so rather than staying blank."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    for axes, (seed_key, _, title, label) in zip(figure.subplots(2, 2).flat, SERIES):
        steps, values = series.get(seed_key, ([], []))
        axes.set_title(title)
        axes.set_xlabel("Step")
        axes.set_ylabel(label)
        if values:
            axes.plot(steps, values, color=LINE_COLOR, marker="." if len(values) < 30 else None)
            positive = [value for value in values if value > 0]
            if len(positive) == len(values) and max(values) / min(values) > 100:
                axes.set_yscale("log")  # learning-rate warmups and decays span decades
        else:
            axes.text(0.5, 0.5, f"no {title.lower()} recorded", ha="center", va="center", color="gray",
                      transform=axes.transAxes)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
