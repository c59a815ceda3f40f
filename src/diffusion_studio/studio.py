"""The one place where the studio's services are built from config and wired together.

UI tabs, the API and the CLI receive a `Studio` and call its methods; none of them builds an engine itself.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from datetime import datetime
from pathlib import Path

from PIL import Image

from .config import StudioConfig
from .engine.hashes import Hasher
from .engine.metadata import HashLookup, image_request, save_png
from .engine.resources import collect_hashes, hash_lookup, queue_hashes, queue_listed, run_files
from .engine.runner import CancelFlag, Engine, StepCallback, WorkItem
from .engine.library import LibraryEntry, import_model, library_for
from .engine.pipelines import device_label
from .engine.sources import ANY_NAME, NamePolicy, list_loras, list_models, list_vaes, resolve
from .engine.upscale import list_upscalers, upscale_image
from .requests import GenerationRequest, GenerationResult, RequestError
from .service.executor import Executor, LocalDevice, LocalExecutor
from .service.jobs import JobNotFound, JobService
from .service.limits import UserLimits
from .service.auth import Users
from .service.outcomes import ErrorKind, JobError, StudioError, scrub
from .service.retention import Retention
from .service.store import JobRecord, JobStore
from .service.training import TrainingRun, TrainingService, lora_owners
from .training.config import TrainConfig

log = logging.getLogger(__name__)

STORAGE_PROBE_BYTES = 64 * 1024
HASH_WAIT_S = 30.0  # how long saving a PNG waits for its files' hashes (a 2 GB file hashes in a few seconds)


def shown_model_name(name: str) -> str:
    """A loaded model's name for users who are not admins: one loaded by path (a VAE is loaded as `vae:<path>`) by
    the path's last part only."""
    return "vae:" + scrub(name[4:]) if name.startswith("vae:") else scrub(name)


class Studio:
    def __init__(self, config: StudioConfig):
        self.config = config
        if config.torch_threads and config.executor == "local":  # Ray actors set their own
            import torch

            torch.set_num_threads(config.torch_threads)
        # This process's engine: the first local device's worker, and what resolves names, checks requests and
        # makes control-map previews and upscales whatever the executor is.
        self.engine = Engine(config.model_copy(update={"device": config.worker_devices()[0]}))
        # A1111's hashes of model files, computed once per file in its own thread (see engine/hashes.py).
        self.hasher = Hasher(Path(config.data_dir) / "hashes.json")
        self.outputs_dir = Path(config.data_dir) / "outputs"
        self.store = JobStore(Path(config.data_dir) / "studio.db")
        self.jobs = JobService(self.store, None, self.save, max_queue=config.max_queue, executor=self._executor(),
                               model_of=self.model_name, validate=self.validate, identify=self.weights_identity,
                               cache_entries=config.cache_entries, cache_scope=config.cache_scope,
                               time_limit_s=config.job_time_limit_s,
                               batch_images=config.batch_images,
                               limits=UserLimits(config.rate_per_minute, config.rate_burst, config.max_active_jobs),
                               check_storage=self.check_storage, check=self.check)
        # The history's size on /metrics, and its bound (off unless a retention_* key is set).
        usage = self.jobs.metrics.watch_storage(self.outputs_dir, Path(config.data_dir) / "studio.db")
        self.retention = Retention.from_config(config, self.store, self.outputs_dir, cache=self.jobs.cache,
                                               usage=usage)
        self.training = TrainingService(config)
        # Who may do what: None while auth is off (every caller is the one local user, an admin).
        self.users = Users(config.users_path()) if config.auth_required() else None

    def is_admin(self, user: str | None) -> bool:
        """Admins act on everyone's work and may load models by path; with auth off everyone is."""
        return self.users is None or (user is not None and self.users.is_admin(user))

    def name_policy(self, user: str | None) -> NamePolicy:
        """Which model, LoRA and VAE names `user` may use: admins any (a server path, a hub id too); other users
        only what the studio lists, less the LoRAs other users trained. None: nobody in particular (with auth on,
        only what every user may use)."""
        if self.is_admin(user):
            return ANY_NAME
        hidden = frozenset(name for name, owner in lora_owners(self.config).items() if owner != user)
        return NamePolicy(listed_only=True, hidden_loras=hidden)

    def check(self, request: GenerationRequest, user: str | None = None) -> None:
        """Refuse before queueing what the names and file headers already tell (the job service calls this at
        submit and for each job recovered after a restart): unknown names, and names `user` may not use."""
        self.engine.check(request, self.name_policy(user))

    def validate(self, data: dict) -> GenerationRequest:
        """Build a request against this studio's limits (raises pydantic.ValidationError naming each field)."""
        return GenerationRequest.model_validate(data, context={"limits": self.config.limits})

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 cancel: CancelFlag | None = None) -> GenerationResult:
        self._queue_hashes(request)
        return self.engine.run(request, on_step=on_step, cancel=cancel)

    def _executor(self) -> Executor:
        if self.config.executor == "ray":
            from .service.ray_executor import RayExecutor  # ray is imported only by a studio that uses it

            return RayExecutor(self.config, before_run=self._queue_hashes)
        self.engines = engines = [self.engine, *(Engine(self.config.model_copy(update={"device": device}))
                                                 for device in self.config.worker_devices()[1:])]
        labels = [device_label(device) for device in self.config.worker_devices()]  # a device it lacks: refused now
        return LocalExecutor([LocalDevice(label if len(engines) == 1 else device,
                                          lambda items, engine=engine: self._run_batch(engine, items),
                                          engine.manager.loaded, lambda name, engine=engine: self._preload(engine, name),
                                          engine.manager.unload)
                              for engine, device, label in zip(engines, self.config.worker_devices(), labels)],
                             threads=self.config.workers)

    def _run_batch(self, engine: Engine, items: list[WorkItem]) -> list[GenerationResult]:
        """A local worker's runner (in its thread): the run's files are queued for hashing first, so they hash
        while the model loads, and `save` finds them done."""
        for item in items:
            self._queue_hashes(item.request)
        return engine.run_batch(items)

    @staticmethod
    def _preload(engine: Engine, name: str) -> None:
        with engine.manager.use(name):
            pass

    def model_name(self, request: GenerationRequest) -> str:
        """The base model a request runs on, by its listed name (the job service prefers a worker holding it)."""
        return resolve(request.model, self.config).name

    def _queue_hashes(self, request: GenerationRequest) -> None:
        try:
            queue_hashes(self.hasher, run_files(request, self.config))
        except Exception:  # noqa: BLE001 (hashes only label the PNG: never a reason to fail the run)
            log.warning("could not queue the hashes of a run's files", exc_info=True)

    def save(self, result: GenerationResult, folder: Path | None = None) -> list[Path]:
        """Each image as a PNG carrying the parameters that reproduce it on its own, and the A1111 hashes of the
        files it was made with (waiting up to HASH_WAIT_S for them; runs in a worker thread, never the loop)."""
        try:
            hashes = collect_hashes(self.hasher, run_files(result.request, self.config), HASH_WAIT_S)
        except Exception:  # noqa: BLE001 (the images are worth saving without their files' hashes)
            log.warning("saving without the files' hashes", exc_info=True)
            hashes = None
        folder = Path(folder or self.outputs_dir / datetime.now().strftime("%Y-%m-%d"))
        folder.mkdir(parents=True, exist_ok=True)
        stamp = f"{time.strftime('%H%M%S')}-{secrets.token_hex(3)}"  # jobs batched together share second and seed
        paths = []
        for index, (image, seed) in enumerate(zip(result.images, result.seeds)):
            path = folder / f"{stamp}-{result.request.mode.value}-{seed}-{index}.png"
            paths.append(save_png(path, image, image_request(result.request, seed), seed, result.request.model,
                                  hashes))
        return paths

    def weights_identity(self, request: GenerationRequest) -> str:
        """Which weights a request runs on: a part of its cache key (see `Engine.weights_identity`)."""
        return self.engine.weights_identity(request)

    def delete_job(self, job_id: str, user: str) -> int:
        """Remove one of `user`'s finished jobs from the history, with its image files; returns the file count."""
        job = self.jobs.get(job_id, user)
        if not job.status.finished:
            raise RequestError("job_id", "is still queued or running; cancel it first")
        counts = self.retention.delete_jobs([job_id])  # as retention deletes: cache entry, files, then the rows
        if counts.kept:
            raise StudioError(JobError(ErrorKind.storage, "could not delete this job's images; try again later"))
        return counts.images

    def share_link(self, image_id: str, user: str) -> str:
        """An unguessable path that opens this one image of `user`'s without an account."""
        image = self.store.image(image_id)
        if image is None or image["user"] != user:
            raise JobNotFound(image_id)
        return f"/share/{self.store.share(image_id)}"

    def image_paths(self, image_ids: list[str]) -> list[Path]:
        return [Path(self.store.image(image_id)["path"]) for image_id in image_ids]

    def image_path(self, image_id: str, user: str | None) -> Path:
        """One of `user`'s images (None: a shared image's token stands in for the user)."""
        image = self.store.image(image_id)
        if image is None or image["user"] != user or not Path(image["path"]).is_file():
            raise JobNotFound(image_id)  # another user's image is reported as missing
        return Path(image["path"])

    def shared_image_path(self, token: str) -> Path:
        image = self.store.shared_image(token)
        if image is None or not Path(image["path"]).is_file():
            raise JobNotFound(token)
        return Path(image["path"])

    def history(self, user: str | None, **filters) -> list[JobRecord]:
        """`user`'s jobs (None: everyone's), newest first; filters as JobStore.find."""
        return self.store.find(user=user, **filters)

    def recent_counts(self, window_s: float) -> dict[str, int]:
        """Jobs created in the last `window_s` seconds, by status."""
        return self.store.status_counts(time.time() - window_s)

    def queue_status(self, user: str | None = None) -> dict:
        """The job service's status, its workers' models named for `user` as `loaded_models` names them."""
        status = self.jobs.status()
        if user is None or self.is_admin(user):
            return status
        return {**status, "worker_list": [{**worker, "models": [shown_model_name(name) for name in worker["models"]]}
                                          for worker in status["worker_list"]]}

    def loaded_models(self, user: str | None = None) -> list[dict]:
        """Every worker's loaded models (rows name the worker and its device; blocking). Shown to `user`, a user
        who is not an admin, a model an admin loaded by path (a VAE is loaded as `vae:<path>`) is named by the
        path's last part only."""
        rows = self.jobs.executor.loaded()
        if user is None or self.is_admin(user):
            return rows
        return [{**row, "name": shown_model_name(row["name"])} for row in rows]

    def preload(self, name: str) -> None:
        """Load a base model now (blocking) on the worker that would run it, so the first generation doesn't wait."""
        self.jobs.executor.preload(name)

    def unload_model(self, name: str) -> bool:
        """Free a loaded model on every worker holding it idle (False: not loaded, or jobs are using it)."""
        return self.jobs.executor.unload(name)

    def set_performance(self, fields: dict) -> list[str]:
        """Change the fast path's load options (config `performance.*`) for this process's workers: every model
        then loads with them. Idle loaded models are unloaded now (they reload on their next use); returns the
        names still in use, which keep the old options until they are unloaded. Blocking."""
        from pydantic import ValidationError

        from .config import PerformanceOptions

        if self.config.executor == "ray":
            raise RequestError("performance", "Ray workers take the config when they start: set performance.* in "
                                              "the config file and restart")
        try:
            options = PerformanceOptions(**{**self.config.performance.model_dump(), **fields})
        except ValidationError as exc:
            error = exc.errors()[0]
            raise RequestError(".".join(["performance", *map(str, error["loc"])]), error["msg"]) from None
        engines = getattr(self, "engines", [self.engine])
        for config in {id(c): c for c in (self.config, *(engine.config for engine in engines))}.values():
            config.performance = options
        for name in {row["name"] for row in self.loaded_models() if row["role"] == "base"}:
            self.unload_model(name)  # every device holding it idle
        return sorted({row["name"] for row in self.loaded_models() if row["role"] == "base"})

    def control_preview(self, fields: dict) -> Image.Image:
        """The control map a ControlNet request with these fields would use."""
        return self.engine.control_preview(self.validate(fields))

    @property
    def device(self) -> str:
        return str(self.engine.device)

    def check_storage(self) -> None:
        """Raise while the data dir can't take a new image and a history row (disk full, read-only)."""
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        probe = self.outputs_dir / f".probe-{secrets.token_hex(4)}"
        try:
            with open(probe, "wb") as handle:  # about one image's worth, so a nearly full disk counts as full
                handle.write(b"\0" * STORAGE_PROBE_BYTES)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            probe.unlink(missing_ok=True)
        self.store.probe()

    def models(self, kind: str | None = None, user: str | None = None) -> list[dict]:
        """The models listing as `user` may see it (other users' trained LoRAs left out; None: what every user may
        see); its files not hashed yet are queued behind run-time hashing."""
        hidden = self.name_policy(user).hidden_loras
        rows = [row for row in list_models(self.config, kind)
                if not (row["kind"] == "lora" and row["origin"] == "data dir" and row["name"] in hidden)]
        queue_listed(self.hasher, self.config)
        return rows

    def hash_lookup(self) -> HashLookup:
        """Short hash -> a listed model's name, from known hashes only (for PNG info; call off the event loop)."""
        return hash_lookup(self.hasher, self.config)

    def loras(self, user: str | None = None) -> list[str]:
        """LoRA names `user` may use (None: those every user may use)."""
        return list_loras(self.config, self.name_policy(user))

    def vaes(self) -> list[str]:
        return list_vaes(self.config)

    def upscalers(self) -> list[dict]:
        """Every upscaler name a request (hires.upscaler) or an upscale may use: rows of name, kind (latent |
        pixel | model), scale (a model file's factor once loaded) and path (a model file's, relative)."""
        return list_upscalers(self.config)

    def upscale(self, image: Image.Image, upscaler: str, scale: float = 2.0,
                size: tuple[int, int] | None = None) -> Image.Image:
        """One image upscaled by a pixel upscaler or an upscaler model file (A1111's extra-single-image), to `size`
        or by `scale` (1-8). Blocking, on the engine's device: call it off the event loop. Bad input raises
        RequestError naming `upscaler`, `scale` or `image`."""
        if size is None:
            if not 1.0 <= scale <= 8.0:
                raise RequestError("scale", f"must be between 1 and 8 (got {scale:g})")
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        limit = self.config.limits.max_input_pixels
        if size[0] * size[1] > limit:
            raise RequestError("scale", f"the result would be {size[0]}x{size[1]}, more than the allowed {limit} "
                                        "pixels (limits.max_input_pixels)")
        return upscale_image(image, upscaler, size, self.config, self.engine.device)

    def model_entries(self, kind: str | None = None, user: str | None = None) -> list[LibraryEntry]:
        """The models folders' entries (with their LoRA metadata and embedding details), for the A1111 listings;
        other users' trained LoRAs left out (None: what every user may see)."""
        hidden = self.name_policy(user).hidden_loras
        return [entry for entry in library_for(self.config).entries(kind)
                if not (entry.kind == "lora" and entry.folder < 0 and entry.name in hidden)]

    def check_training(self, name: str, user: str | None = None) -> None:
        """Refuse a LoRA run's name before its dataset is written (see TrainingService.check_start)."""
        self.training.check_start(name, self._owner(user), not self.is_admin(user))

    def start_training(self, name: str, train: TrainConfig, user: str | None = None) -> TrainingRun:
        """A LoRA run for `user`: the LoRA is theirs (with auth on); a user who is not an admin trains on a listed
        base and an uploaded dataset only."""
        return self.training.start(name, train, self._owner(user), self.name_policy(user))

    def _owner(self, user: str | None) -> str | None:
        return user if self.users is not None else None  # auth off: a LoRA is everyone's

    def refresh_models(self) -> None:
        """Read the models folders again (new, removed or changed files), as A1111's refresh buttons do."""
        library_for(self.config).refresh()

    def import_model(self, path: Path, *, file_name: str | None = None, name: str | None = None,
                     kind: str | None = None, replace: bool = False, move: bool = False,
                     field: str = "file") -> dict:
        """Put a model file into the studio's own models folder once its header says what it is; its listing row.
        `move`: `path` is a temporary file of ours (an upload); else it is copied. A loaded model is never replaced
        (ModelConflict, as for a name that exists without `replace`)."""
        entry = import_model(self.config, Path(path), file_name=file_name, name=name, kind=kind,
                             replace_existing=replace, move=move, busy=self._model_busy, field_name=field)
        return next(row for row in self.models(entry.kind) if row["name"] == entry.name and row["usable"])

    def _model_busy(self, path: Path) -> str | None:
        """Why the model file at `path` must not be replaced now: loaded, or in use by a running job."""
        for row in self.loaded_models():
            try:
                location = Path(resolve(row["name"], self.config).location)
            except RequestError:
                continue  # an estimator, or a name no longer found
            if location == Path(path):
                return "in use by a running job" if row["in_use"] else "loaded (unload it first)"
        return None

    def base_model_names(self) -> list[str]:
        names = [row["name"] for row in self.models("checkpoint") if row["role"] == "base" and row["usable"]]
        return names if self.config.default_model in names else [self.config.default_model, *names]
