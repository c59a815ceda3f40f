"""Training events: one stream of plain records that any number of listeners (UI, API, a log file) subscribe to.

Stability score (0-100, higher is steadier), over the last `window` steps:
    100 * exp(-cv) * (1 - spikes)
where cv is the loss's coefficient of variation (std / mean) and spikes the fraction of steps whose gradient norm
exceeds 3x the window's median. A run whose loss swings or whose gradients spike scores low before it diverges.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

log = logging.getLogger(__name__)

EventKind = Literal["step", "sample", "checkpoint", "state", "warning", "error", "done"]


@dataclass(frozen=True)
class TrainingEvent:
    kind: EventKind
    step: int
    total: int
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    stability: float | None = None
    eta_s: float | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # e.g. sample image paths, adherence, checkpoint path

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", {})}


class EventBus:
    """Thread-safe fan-out. A failing listener is logged and dropped, never allowed to stop training."""

    def __init__(self):
        self._listeners: list[Callable[[TrainingEvent], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Callable[[TrainingEvent], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)
        return lambda: self.unsubscribe(listener)

    def unsubscribe(self, listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def publish(self, event: TrainingEvent) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("training event listener failed; unsubscribing it")
                self.unsubscribe(listener)


class JsonlLog:
    """A listener appending every event as one JSON line (the run's log)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: TrainingEvent) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(event.as_json()) + "\n")


class StabilityMeter:
    def __init__(self, window: int = 50):
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)

    def update(self, loss: float, grad_norm: float) -> float:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        count = len(self.losses)
        mean = sum(self.losses) / count
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / count)
        cv = std / mean if mean > 0 else 0.0
        median = sorted(self.grad_norms)[count // 2]
        spikes = sum(g > 3 * median for g in self.grad_norms) / count if median > 0 else 0.0
        return 100.0 * math.exp(-cv) * (1.0 - spikes)
