"""System tab: the device, the workers (device, node, loaded models, current jobs: they join and leave with the
Ray executor), loaded models and their memory (unload), the queue, throughput, error rate, worker deaths, GPU
utilisation where available, live charts of the last hour (the service's MetricsHistory, redrawn by a timer while
the tab has been opened), recent errors, and the Models panel (ui/tabs/models.py)."""

from __future__ import annotations

import time
from typing import Callable

import gradio as gr
import psutil

from ...requests import RequestError
from ...service.store import JobStatus
from ...studio import Studio
from . import models


def device_text(studio: Studio) -> str:
    import torch
    device = torch.device(studio.device)
    memory = psutil.virtual_memory()
    lines = [f"**Device:** {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
             f"**RAM:** {memory.used / 2**30:.1f} / {memory.total / 2**30:.1f} GiB used · "
             f"**studio process:** {psutil.Process().memory_info().rss / 2**30:.2f} GiB"]
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        lines.append(f"**GPU memory:** {(total - free) / 2**30:.1f} / {total / 2**30:.1f} GiB used")
    gpu = studio.jobs.metrics.gpu_utilisation()
    lines.append(f"**GPU utilisation:** {gpu:.0f}%" if gpu is not None else "**GPU utilisation:** n/a (no NVIDIA GPU)")
    return "  \n".join(lines)


def service_text(studio: Studio, window_s: float = 3600) -> str:
    status = studio.jobs.status()
    counts = studio.recent_counts(window_s)
    done, failed = counts.get(JobStatus.done.value, 0), counts.get(JobStatus.failed.value, 0)
    finished = sum(count for state, count in counts.items() if JobStatus(state).finished)
    rate = failed / finished if finished else 0.0
    deaths = studio.jobs.metrics.worker_deaths._value.get()
    return (f"**Queue:** {status['queued']} waiting · {status['running']} running · "
            f"{'paused' if status['paused'] else 'running'} · {status['workers']} worker(s) "
            f"({status['executor']} executor) · {deaths:.0f} lost since start · batches up to "
            f"{status['batch_images']} images  \n"
            f"**Last hour:** {done} done ({done / (window_s / 60):.2f} jobs/min) · {failed} failed · "
            f"error rate {rate:.1%}")


def worker_rows(studio: Studio, user: str | None = None) -> list[list]:
    """One row per worker now: where it runs, what it holds, what it runs."""
    return [[worker["id"], worker["device"], worker["node"], ", ".join(worker["models"]) or "none",
             ", ".join(worker["jobs"]) or "idle", worker["batches"]]
            for worker in studio.queue_status(user)["worker_list"]]


# chart -> (y column, colour column or None, title, y axis title). Jobs' own measurements (speed, queue wait) exist
# only in the intervals where jobs ended, so they are points (a line needs two neighbours to show anything); rates
# and gauges, read every interval, are lines.
CHARTS = {"jobs": ("jobs_per_minute", "outcome", "Jobs per minute", "jobs/min"),
          "speed": ("it_per_s", None, "Speed (jobs done)", "it/s"),
          "queue": ("jobs", "series", "Queue", "jobs"),
          "wait": ("queue_wait_s", None, "Queue wait (jobs ended)", "s"),
          "memory": ("gib", "series", "Memory", "GiB"),
          "gpu": ("gpu_percent", None, "GPU utilisation", "%")}
POINTS = {"speed", "wait"}


def chart_frames(studio: Studio) -> dict:
    """The charts' DataFrames; no "gpu" where nvidia-ml-py finds no GPU (no chart rather than a line at zero)."""
    metrics = studio.jobs.metrics
    frames = metrics.history.frames()
    return frames if metrics.has_gpu else {name: frame for name, frame in frames.items() if name != "gpu"}


def build_charts(studio: Studio) -> dict[str, gr.LinePlot]:
    plots, names = {}, list(CHARTS)
    for row in (names[:3], names[3:]):
        with gr.Row():
            for name in row:
                if name == "gpu" and not studio.jobs.metrics.has_gpu:
                    gr.Markdown("**GPU utilisation:** no chart: nvidia-ml-py finds no NVIDIA GPU on this machine.",
                                elem_id="system-chart-gpu")
                    continue
                y, color, title, y_title = CHARTS[name]
                plot = gr.ScatterPlot if name in POINTS else gr.LinePlot
                plots[name] = plot(x="time", y=y, color=color, title=title, x_title="time", y_title=y_title,
                                   y_lim=[0, 100] if name == "gpu" else [0, None], height=220,
                                   elem_id=f"system-chart-{name}")
    return plots


PERFORMANCE_HELP = ("The fast path's load options, for every model loaded from now on (idle loaded models are "
                    "unloaded and reload with them; bench/speed.py measures each). Step caching is per request: "
                    "the generation tabs' *Step cache* slider.")


def performance_panel(studio: Studio, is_admin: Callable[[str], bool]) -> None:
    """Admins switch `performance.*` here (the config's values at start); others see what is on."""
    options = studio.config.performance
    with gr.Accordion("Performance", open=False):
        gr.Markdown(PERFORMANCE_HELP)
        with gr.Row():
            fuse_qkv = gr.Checkbox(options.fuse_qkv, label="Fused QKV projections")
            channels_last = gr.Checkbox(options.channels_last, label="Channels-last UNet")
            compile_ = gr.Checkbox(options.compile, label="torch.compile (regional)")
            tile = gr.Checkbox(options.tile_when_needed, label="Tile the decode when it would not fit")
        preview = gr.Radio(["linear", "tiny"], value=options.preview_decoder, label="Preview decoder")
        apply = gr.Button("Apply")
        applied = gr.Markdown()

    def set_performance(request: gr.Request, fuse, last, compiled, tiled, decoder):
        if not is_admin(request.username or "local"):
            raise gr.Error("only an admin may change the performance options for everyone", title="Not allowed")
        try:
            busy = studio.set_performance({"fuse_qkv": fuse, "channels_last": last, "compile": compiled,
                                           "tile_when_needed": tiled, "preview_decoder": decoder})
        except RequestError as exc:
            raise gr.Error(str(exc), title="Invalid input") from None
        return "Applied." + (f" In use, keeping the old options until unloaded: {', '.join(busy)}." if busy else "")

    apply.click(set_performance, [fuse_qkv, channels_last, compile_, tile, preview], applied,
                api_name="set_performance")


def build(studio: Studio, is_admin: Callable[[str], bool]) -> None:
    with gr.Tab("System", id="system", elem_id="tab-system") as tab:
        device = gr.Markdown()
        service = gr.Markdown()
        with gr.Accordion(f"Last hour (one sample per {studio.jobs.metrics.history.every_s:g} s)", open=True):
            plots = build_charts(studio)
        timer = gr.Timer(studio.jobs.metrics.history.every_s, active=False)  # started when the tab is first opened
        workers = gr.Dataframe(headers=["worker", "device", "node", "loaded models", "running jobs", "batches"],
                               interactive=False, label="Workers", elem_id="system-workers")
        loaded = gr.Dataframe(headers=["name", "role", "weights (MB)", "in use", "worker"], interactive=False,
                              label="Loaded models")
        with gr.Row():
            unload_name = gr.Dropdown([], label="Model to unload", allow_custom_value=True, scale=3)
            unload = gr.Button("Unload", scale=1)
            refresh = gr.Button("Refresh", scale=1)
        errors = gr.Dataframe(headers=["when", "prompt", "error"], interactive=False, label="Recent errors")
        performance_panel(studio, is_admin)
        models.build(studio, is_admin, tab)

        def snapshot(request: gr.Request):
            user = request.username or "local"
            models = studio.loaded_models(user)
            rows = [[m["name"], m["role"], round(m["weight_bytes"] / 1e6, 1), m["in_use"], m.get("worker", "")]
                    for m in models]
            failed = studio.history(None if is_admin(user) else user, status=JobStatus.failed, limit=10)
            error_rows = [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.finished_at or job.created_at)),
                           job.request.get("prompt", "")[:50], (job.error.text() if job.error else "")[:120]]
                          for job in failed]
            return (device_text(studio), service_text(studio), rows,
                    gr.Dropdown(choices=sorted({m["name"] for m in models})), error_rows, worker_rows(studio, user))

        def unload_model(request: gr.Request, name):
            if not is_admin(request.username or "local"):
                raise gr.Error("only an admin may unload models for everyone", title="Not allowed")
            if not name:
                raise gr.Error("name: choose a loaded model", title="Invalid input")
            if not studio.unload_model(name):
                gr.Warning(f"'{name}' is not loaded, or a job is using it")
            return snapshot(request)

        def charts():
            history, now = studio.jobs.metrics.history, time.time()
            window = [max(history.started_at, now - history.window_s), now]  # the hour, or since the start
            frames = chart_frames(studio)
            return [type(plot)(frames[name], x_lim=window) for name, plot in plots.items()]

        outputs = [device, service, loaded, unload_name, errors, workers]
        refresh.click(snapshot, None, outputs, api_name="system")
        refresh.click(charts, None, list(plots.values()), api_visibility="private")
        tab.select(snapshot, None, outputs, api_visibility="private")
        tab.select(lambda: gr.Timer(active=True), None, timer, api_visibility="private").then(
            charts, None, list(plots.values()), api_visibility="private")
        timer.tick(charts, None, list(plots.values()), api_name="system_charts", show_progress="hidden")
        unload.click(unload_model, unload_name, outputs, api_visibility="private")
