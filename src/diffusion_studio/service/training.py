"""TrainingService: LoRA training runs started from the UI (or the CLI), one at a time, in a background thread.

It keeps every event of the current run (for plots that a page opened mid-run can draw from the start), exposes
pause / resume / stop, and installs a finished LoRA as `<data_dir>/loras/<name>.safetensors`, where generation
looks LoRAs up by name, so it is usable at once without a restart.

With auth on, a trained LoRA belongs to whoever trained it: `<name>.owner.json` beside it records the user, and
the Studio lets only that user (and admins) list and use it. A LoRA without that record (trained with auth off,
or put there by hand) is everyone's. A user who is not an admin trains on a listed base model only, on the shapes
world or images uploaded into `<data_dir>/datasets`, and never over another user's LoRA.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import StudioConfig
from ..engine import import_libraries
from ..engine.pipelines import LOADING, pick_device
from ..engine.library import library_for
from ..engine.sources import ANY_NAME, NamePolicy, resolve
from ..requests import RequestError
from ..training.config import TrainConfig
from ..training.events import EventBus, JsonlLog, TrainingEvent
from .outcomes import scrub

if TYPE_CHECKING:  # the trainer imports diffusers (seconds): only a run imports it, not the studio's start
    from ..training.trainer import Trainer

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
OWNER_SUFFIX = ".owner.json"  # beside a trained LoRA: who trained it
SHAPES = "shapes"  # the dataset that is no folder


def lora_trainer(config: StudioConfig, train: TrainConfig, bus: EventBus,
                 policy: NamePolicy = ANY_NAME) -> Trainer:
    """A LoRA trainer on an SD-family base (built-in or diffusers folder); `policy`: which base names the caller
    may use (sources.py)."""
    import_libraries()  # one importer at a time (engine/__init__.py)
    from diffusers import StableDiffusionPipeline

    from ..training.trainer import Trainer

    source = resolve(train.base, config, "base", policy)
    if source.role != "base" or source.family != "sd" or source.kind in ("hub", "single_file"):
        raise RequestError("base", "LoRA training takes an SD-family diffusers folder or built-in for now")
    with LOADING:  # not beside a job's load (see engine/pipelines.LOADING)
        pipeline = StableDiffusionPipeline.from_pretrained(source.location)
    return Trainer(train, pipeline, bus=bus, device=pick_device(config.device))


def trained_lora(config: StudioConfig, name: str) -> Path:
    return Path(config.data_dir) / "loras" / f"{name}.safetensors"


def install_lora(config: StudioConfig, output: Path, name: str, owner: str | None = None) -> Path:
    """Copy a finished LoRA to `<data_dir>/loras/<name>.safetensors`; `owner`: the user it belongs to (None:
    everyone's, and an earlier owner's record goes)."""
    target = trained_lora(config, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(output, target)
    record = target.with_name(name + OWNER_SUFFIX)
    if owner is None:
        record.unlink(missing_ok=True)
    else:
        record.write_text(json.dumps({"owner": owner}))
    return target


def lora_owners(config: StudioConfig) -> dict[str, str]:
    """Trained LoRA name -> the user who trained it, for those that record one (the others are everyone's)."""
    owners = {}
    for record in sorted((Path(config.data_dir) / "loras").glob("*" + OWNER_SUFFIX)):
        try:
            owner = json.loads(record.read_text()).get("owner")
        except (OSError, ValueError, AttributeError):
            log.warning("unreadable LoRA owner record %s: the LoRA is kept from everyone but admins", record.name)
            owner = ""  # nobody's: an unreadable record must not open the LoRA to every user
        owners[record.name.removesuffix(OWNER_SUFFIX)] = owner if isinstance(owner, str) else ""
    return owners


def check_dataset(config: StudioConfig, dataset: str) -> None:
    """For a user who is not an admin: the shapes world or a folder under `<data_dir>/datasets` (where the UI puts
    uploaded images). Any other folder is refused with one message, whether or not it exists."""
    if dataset == SHAPES:
        return
    allowed = (Path(config.data_dir) / "datasets").absolute()
    try:
        inside = Path(dataset).absolute().resolve().is_relative_to(allowed.resolve())
    except (OSError, ValueError, RuntimeError):
        inside = False
    if not inside:
        raise RequestError("dataset", "must be 'shapes' or images uploaded to the studio; a folder on the server is "
                                      "for admins")


@dataclass
class TrainingRun:
    name: str
    config: TrainConfig
    owner: str | None = None  # who started it (None: auth off); the LoRA it makes is theirs
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

    def check_start(self, name: str, owner: str | None = None, listed_only: bool = False) -> None:
        """Refuse, before anything is written, a run that `start` would refuse for its name: not a usable LoRA
        name, another run still going, or (`listed_only`: a user who is not an admin) a LoRA of that name that
        is not `owner`'s."""
        if not NAME.match(name):
            raise RequestError("name", "use 1-48 letters, digits, '-' or '_' (it becomes the LoRA's name)")
        if self.current is not None and not self.current.finished:
            raise RequestError("name", f"'{self.current.name}' is still training; stop it first")
        if listed_only:
            # Trained LoRAs are found before the models folders' ones: a run named like a shared LoRA would hide
            # it from everyone else and swap its weights under them.
            trained = trained_lora(self.config, name).exists()
            yours = trained and lora_owners(self.config).get(name) == owner
            if not yours and (trained or library_for(self.config).find("lora", name) is not None):
                raise RequestError("name", f"a LoRA called '{name}' exists and is not yours; choose another name")

    def start(self, name: str, train: TrainConfig, owner: str | None = None,
              policy: NamePolicy = ANY_NAME) -> TrainingRun:
        """Start a LoRA run named `name` in a background thread; refused while another run is going. `owner`: the
        user the LoRA will belong to (None: everyone's). `policy.listed_only` (a user who is not an admin): a
        listed base, the shapes world or an uploaded dataset, and not another user's LoRA name."""
        if train.method != "lora":
            raise RequestError("method", "the studio trains LoRAs; built-ins are trained with the CLI")
        if policy.listed_only:
            check_dataset(self.config, train.dataset)
        with self._lock:
            self.check_start(name, owner, policy.listed_only)
            run = TrainingRun(name, train, owner)
            bus = EventBus()
            bus.subscribe(lambda event: self._record(run, event))
            run.trainer = lora_trainer(self.config, train, bus, policy)  # a bad base fails here, in the caller
            bus.subscribe(JsonlLog(Path(train.output_dir) / "log.jsonl"))  # its folder made once the base is known
            self.current = run
        threading.Thread(target=self._train, args=(run,), name=f"training-{name}", daemon=True).start()
        return run

    def visible(self, run: TrainingRun, user: str | None, admin: bool) -> bool:
        """Whether `user` may see a run's figures and samples: its owner, an admin, or anyone for a run of
        nobody's (auth off)."""
        return admin or run.owner is None or run.owner == user

    def pause(self, user: str | None = None, admin: bool = True) -> None:
        if (run := self._steerable(user, admin)) is not None:
            run.trainer.pause()

    def resume(self, user: str | None = None, admin: bool = True) -> None:
        if (run := self._steerable(user, admin)) is not None:
            run.trainer.resume()

    def stop(self, user: str | None = None, admin: bool = True) -> None:
        if (run := self._steerable(user, admin)) is not None:
            run.trainer.stop()

    def _steerable(self, user: str | None, admin: bool) -> TrainingRun | None:
        """The run going now, if `user` may pause, resume or stop it (None: none is going)."""
        run = self.current
        if run is None or run.trainer is None or run.finished:
            return None
        if not self.visible(run, user, admin):
            raise RequestError("run", "another user's run is training: only its owner or an admin may pause, "
                                      "resume or stop it")
        return run

    def _train(self, run: TrainingRun) -> None:
        try:
            output = run.trainer.run()
            if run.trainer.state == "done":
                run.lora_path = str(install_lora(self.config, output, run.name, run.owner))
        except Exception as exc:  # reported on the run, never lost in a thread
            log.exception("training run %s failed", run.name)
            run.messages.append(scrub(f"{type(exc).__name__}: {exc}"))  # shown in the UI: no server paths
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
            run.messages.append(scrub(event.message))
