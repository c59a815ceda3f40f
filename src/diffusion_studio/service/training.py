"""TrainingService: LoRA training runs started from the UI (or the CLI), one at a time, in a background thread.

It keeps every event of the current run (for plots that a page opened mid-run can draw from the start), exposes
pause / resume / stop, and installs a finished LoRA as `<data_dir>/loras/<name>.safetensors`, where generation
looks LoRAs up by name, so it is usable at once without a restart.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..config import StudioConfig
from ..engine.pipelines import LOADING, pick_device
from ..engine.sources import resolve
from ..requests import RequestError
from ..training.config import TrainConfig
from ..training.events import EventBus, JsonlLog, TrainingEvent
from ..training.trainer import Trainer

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")


def lora_trainer(config: StudioConfig, train: TrainConfig, bus: EventBus) -> Trainer:
    """A LoRA trainer on an SD-family base (built-in or diffusers folder)."""
    from diffusers import StableDiffusionPipeline

    source = resolve(train.base, config)
    if source.role != "base" or source.family != "sd" or source.kind in ("hub", "single_file"):
        raise RequestError("base", "LoRA training takes an SD-family diffusers folder or built-in for now")
    with LOADING:  # not beside a job's load (see engine/pipelines.LOADING)
        pipeline = StableDiffusionPipeline.from_pretrained(source.location)
    return Trainer(train, pipeline, bus=bus, device=pick_device(config.device))


def install_lora(config: StudioConfig, output: Path, name: str) -> Path:
    target = Path(config.data_dir) / "loras" / f"{name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(output, target)
    return target


@dataclass
class TrainingRun:
    name: str
    config: TrainConfig
    state: str = "starting"  # starting | running | paused | stopped | done | failed
    events: list[dict] = field(default_factory=list)  # step events (loss, grad norm, lr, stability, eta)
    samples: list[str] = field(default_factory=list)  # sample image paths, newest last
    messages: list[str] = field(default_factory=list)  # warnings and errors, for the UI
    lora_path: str | None = None
    trainer: Trainer | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("stopped", "done", "failed")

    def summary(self) -> dict:
        last = self.events[-1] if self.events else {}
        return {"name": self.name, "state": self.state, "step": last.get("step", 0), "total": self.config.steps,
                "loss": last.get("loss"), "eta_s": last.get("eta_s"), "lora": self.lora_path,
                "messages": self.messages[-5:]}


class TrainingService:
    def __init__(self, config: StudioConfig):
        self.config = config
        self.current: TrainingRun | None = None
        self._lock = threading.Lock()

    def start(self, name: str, train: TrainConfig) -> TrainingRun:
        """Start a LoRA run named `name` in a background thread; refused while another run is going."""
        if not NAME.match(name):
            raise RequestError("name", "use 1-48 letters, digits, '-' or '_' (it becomes the LoRA's name)")
        if train.method != "lora":
            raise RequestError("method", "the studio trains LoRAs; built-ins are trained with the CLI")
        with self._lock:
            if self.current is not None and not self.current.finished:
                raise RequestError("name", f"'{self.current.name}' is still training; stop it first")
            run = TrainingRun(name, train)
            bus = EventBus()
            bus.subscribe(lambda event: self._record(run, event))
            bus.subscribe(JsonlLog(Path(train.output_dir) / "log.jsonl"))
            run.trainer = lora_trainer(self.config, train, bus)  # a bad base fails here, in the caller
            self.current = run
        threading.Thread(target=self._train, args=(run,), name=f"training-{name}", daemon=True).start()
        return run

    def pause(self) -> None:
        if self.current and self.current.trainer and not self.current.finished:
            self.current.trainer.pause()

    def resume(self) -> None:
        if self.current and self.current.trainer and not self.current.finished:
            self.current.trainer.resume()

    def stop(self) -> None:
        if self.current and self.current.trainer and not self.current.finished:
            self.current.trainer.stop()

    def _train(self, run: TrainingRun) -> None:
        try:
            output = run.trainer.run()
            if run.trainer.state == "done":
                run.lora_path = str(install_lora(self.config, output, run.name))
        except Exception as exc:  # reported on the run, never lost in a thread
            log.exception("training run %s failed", run.name)
            run.messages.append(f"{type(exc).__name__}: {exc}")
            run.state = "failed"
            return
        run.state = run.trainer.state

    @staticmethod
    def _record(run: TrainingRun, event: TrainingEvent) -> None:
        if event.kind == "step":
            run.events.append(event.as_json())
        elif event.kind == "state":
            run.state = event.message
        elif event.kind == "sample":
            run.samples += event.data.get("images", [])
        elif event.kind in ("warning", "error"):
            run.messages.append(event.message)
