"""The System tab's live charts: the service's ring buffer of the last hour (service/metrics.MetricsHistory) keeps one
sample per interval, records real jobs as they end and the gauges the server's sampler reads; the tab's refresh
returns one DataFrame per chart with the columns its plot reads, and the charts draw in the browser. No GPU here:
no GPU chart, and the tab says so."""

import time

import httpx
import pandas as pd
import pytest
import torch
from gradio_client import Client

from diffusion_studio.service.metrics import MetricsHistory
from diffusion_studio.ui.tabs.system import CHARTS, chart_frames

COLUMNS = {"jobs": ["time", "outcome", "jobs_per_minute"], "speed": ["time", "it_per_s"],
           "queue": ["time", "series", "jobs"], "wait": ["time", "queue_wait_s"], "memory": ["time", "series", "gib"],
           "gpu": ["time", "gpu_percent"]}


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_history_keeps_one_sample_per_interval_for_an_hour():
    clock = Clock(1_000_000.0)
    history = MetricsHistory(every_s=10, window_s=3600, clock=clock)
    for status, wait, speed in [("done", 0.5, 20.0), ("done", 1.5, 10.0), ("failed", 2.0, None)]:
        history.record_job(status, wait, speed, 3 * 2**30 if speed else None)
    history.record_gauges(queue_length=4, running=1, rss_bytes=2**31, gpu_memory_bytes=None, gpu_percent=None)
    history.record_gauges(queue_length=2, running=1, rss_bytes=2**30, gpu_memory_bytes=None, gpu_percent=None)
    frames = history.frames()
    assert {name: list(frame.columns) for name, frame in frames.items()} == COLUMNS
    [speed] = frames["speed"].itertuples()
    assert speed.it_per_s == 15.0  # the mean of the interval's jobs
    assert frames["wait"]["queue_wait_s"].tolist() == [pytest.approx(4.0 / 3)]
    assert frames["queue"].set_index("series")["jobs"].to_dict() == {"waiting": 4, "running": 1}  # the most seen
    assert frames["memory"].set_index("series")["gib"].to_dict() == {"process RSS": 1.0, "job peak": 3.0}  # last
    assert frames["gpu"].empty

    clock.now += 35  # the jobs are still in the minute up to now ...
    jobs = history.frames()["jobs"].pivot(index="time", columns="outcome", values="jobs_per_minute")
    assert len(jobs) == 4 and jobs["done"].tolist() == [2, 2, 2, 2] and jobs["failed"].tolist() == [1, 1, 1, 1]
    clock.now += 30  # ... and not any more: every interval since the start is on the chart, the empty ones at 0
    jobs = history.frames()["jobs"].pivot(index="time", columns="outcome", values="jobs_per_minute")
    assert len(jobs) == 7 and jobs["done"].iloc[-1] == 0 and jobs["done"].iloc[-2] == 2
    assert (jobs.index[1:] - jobs.index[:-1] == pd.Timedelta(seconds=10)).all()

    for _ in range(400):  # more than an hour of samples: only the last hour's are kept
        clock.now += 10
        history.record_gauges(queue_length=0, running=0, rss_bytes=2**30, gpu_memory_bytes=None, gpu_percent=None)
    kept = history.samples()
    assert len(kept) == 361  # one per 10 s interval that overlaps the last hour, the current one included
    assert kept[0].at + 10 > clock.now - 3600 and kept[-1].at <= clock.now
    assert len(history._samples) <= 361  # the ring buffer itself is bounded, read or not
    frames = history.frames()
    assert frames["speed"].empty and frames["wait"].empty  # the jobs were more than an hour ago
    assert len(frames["jobs"]) == 2 * 361 and frames["jobs"]["jobs_per_minute"].sum() == 0


def wait_done(base, job_id, timeout=120):
    deadline = time.time() + timeout
    while (job := httpx.get(f"{base}/api/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.05)
    return job


def test_the_sampler_records_real_jobs_and_the_server_keeps_sampling(server):
    base, studio = server
    history = studio.jobs.metrics.history
    assert history.samples() and history.samples()[0].rss_bytes > 0  # the server's sampler read the gauges at start
    before = sum(sum(s.ended.values()) for s in history.samples())
    assert httpx.post(f"{base}/api/v1/queue/pause").status_code == 200
    ids = [httpx.post(f"{base}/api/v1/jobs", json={"prompt": f"chart {seed}", "steps": 2, "seed": seed,
                                                   "width": 32, "height": 32}).json()["id"] for seed in (1, 2)]
    studio.jobs.metrics.sample()  # the reading the sampler takes every interval, now that two jobs wait
    time.sleep(0.3)
    assert httpx.post(f"{base}/api/v1/queue/resume").status_code == 200
    jobs = [wait_done(base, job_id) for job_id in ids]
    assert [job["status"] for job in jobs] == ["done", "done"]
    records = [studio.store.get(job_id) for job_id in ids]

    samples = history.samples()
    assert sum(sum(s.ended.values()) for s in samples) == before + 2
    assert max(s.queue_length for s in samples if s.queue_length is not None) >= 2
    waits = [wait for s in samples for wait in s.waits_s]
    for record in records:  # each job's real queue wait (it waited out the pause) and speed, as the store has them
        waited = record.started_at - record.created_at
        assert waited >= 0.3 and any(abs(wait - waited) < 1e-6 for wait in waits)
        assert record.result["timings"]["it_per_s"] in [speed for s in samples for speed in s.it_per_s]
    peaks = [s.peak_memory_bytes for s in samples if s.peak_memory_bytes]
    assert max(peaks) >= max(record.result["peak_memory_bytes"] for record in records) > 0

    frames = chart_frames(studio)
    assert frames["jobs"].query("outcome == 'done'")["jobs_per_minute"].iloc[-1] >= 2  # both in the last minute
    assert frames["speed"]["it_per_s"].iloc[-1] > 0 and frames["wait"]["queue_wait_s"].max() >= 0.3
    assert "process RSS" in set(frames["memory"]["series"]) and frames["memory"]["gib"].max() > 0.05
    if not torch.cuda.is_available():
        assert "gpu" not in frames and not studio.jobs.metrics.has_gpu  # no chart rather than made-up numbers


def test_the_tab_refresh_returns_each_charts_data(server):
    base, studio = server
    plots = Client(base, download_files=False, verbose=False).predict(api_name="/system_charts")
    names = [name for name in CHARTS if name != "gpu" or studio.jobs.metrics.has_gpu]
    assert len(plots) == len(names)
    for name, plot in zip(names, plots):
        value = plot["value"] if "value" in plot else plot
        assert value["columns"] == COLUMNS[name], name
        assert value["datatypes"]["time"] == "temporal" and value["datatypes"][CHARTS[name][0]] == "quantitative"
        if CHARTS[name][1]:
            assert value["datatypes"][CHARTS[name][1]] == "nominal"
    memory = dict(zip(names, plots))["memory"]
    assert memory["value"]["data"] if "value" in memory else memory["data"]  # the sampler's readings, served
    config = httpx.get(f"{base}/config").json()
    texts = [c["props"].get("value") for c in config["components"] if c["props"].get("elem_id") == "system-chart-gpu"]
    if not studio.jobs.metrics.has_gpu:
        assert texts and "no NVIDIA GPU" in texts[0]


def test_the_charts_draw_in_the_browser(server):
    from browser import CHROMIUM, FLAGS, playwright  # skips where there is no Chromium

    base, studio = server
    names = [name for name in CHARTS if name != "gpu" or studio.jobs.metrics.has_gpu]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(base + "/")
        page.get_by_role("tab", name="System", exact=True).click()
        for name in names:  # selecting the tab draws every chart (the timer redraws them from then on)
            page.locator(f"#system-chart-{name} .vega-embed svg, #system-chart-{name} .vega-embed canvas").first.wait_for()
        if not studio.jobs.metrics.has_gpu:
            playwright.expect(page.locator("#system-chart-gpu")).to_contain_text("no NVIDIA GPU")
        browser.close()
