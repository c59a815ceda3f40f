"""A cold start stays cheap: the CLI quiets diffusers and transformers without importing them (seconds `serve`
does not need before a model loads) and the quieting still applies when they arrive; Gradio rewrites no type stubs
under `serve` and builds the whole page's app only twice; bench/startup.py times the real `serve` to the port and
to the first 200 of `/`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import startup  # noqa: E402  (bench/startup.py)

def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **startup.ENV}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_libraries_are_quieted_when_they_arrive():
    """_quiet_libraries imports neither library; whichever imports one first gets it quiet: errors only, no
    progress bars (as when the CLI imported both to quiet them)."""
    code = """
import logging, sys
import diffusion_studio.cli as cli
cli._quiet_libraries()
cli._quiet_libraries()  # twice (main() runs again in one process): still one hook per library
print("diffusers" in sys.modules, "transformers" in sys.modules,
      sum(isinstance(finder, cli._AfterImport) for finder in sys.meta_path))
import diffusers, transformers
print(diffusers.utils.logging.get_verbosity() == logging.ERROR, diffusers.utils.logging.is_progress_bar_enabled(),
      transformers.utils.logging.get_verbosity() == logging.ERROR, transformers.utils.logging.is_progress_bar_enabled(),
      sum(isinstance(finder, cli._AfterImport) for finder in sys.meta_path))
import inspect
print(bool(inspect.getsource(diffusers.utils.logging.set_verbosity_error)))  # the real loader still answers
"""
    before, after, source = run_python(code).splitlines()[-3:]
    assert before == "False False 2"
    assert after == "True False True False 0"
    assert source == "True"


COMPONENT_MODULE = """
import gradio as gr


class Dial(gr.components.Component):
    EVENTS = ["change"]

    def preprocess(self, payload):
        return payload

    def postprocess(self, value):
        return value

    def example_payload(self):
        return 1

    def example_value(self):
        return 1

    def api_info(self):
        return {"type": "number"}
"""


def test_gradio_writes_no_type_stubs_under_serve(tmp_path):
    """Gradio derives a .pyi stub for each component class as it is defined (half of `import gradio`); after
    _skip_gradio_stub_files it writes none (a component defined in a fresh module gets no stub beside it, where
    plain Gradio writes one), the component still works, and Gradio's own files are left as they are."""
    code = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import diffusion_studio.cli as cli
if sys.argv[2] == "skip":
    cli._skip_gradio_stub_files()
    cli._skip_gradio_stub_files()  # twice (main() runs again in one process): still one hook
    print(sum(isinstance(finder, cli._AfterImport) and finder.name == "gradio.component_meta"
              for finder in sys.meta_path))
else:
    print(1)
import gradio, dial
print(Path(sys.argv[1], "dial.pyi").exists(), dial.Dial(value=3).value, gradio.Textbox("hi").get_config()["value"])
"""
    rows = {}
    for mode in ("plain", "skip"):
        folder = tmp_path / mode
        folder.mkdir()
        (folder / "dial.py").write_text(COMPONENT_MODULE)
        result = subprocess.run([sys.executable, "-c", code, str(folder), mode], capture_output=True, text=True,
                                timeout=300, env={**os.environ, **startup.ENV}, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        rows[mode] = result.stdout.splitlines()[-2:]
    assert rows["plain"] == ["1", "True 3 hi"]  # what the hook prevents: plain Gradio writes the stub
    assert rows["skip"] == ["1", "False 3 hi"]


def test_bench_times_the_real_serve_to_the_port_and_the_page(tmp_path):
    """One start of the console script: the port accepts no later than `/` answers 200, and serve used some CPU
    time until then; a history data dir the bench makes is one the studio lists."""
    timing = startup.start_once(tmp_path / "fresh")
    assert 0 < timing["port_s"] <= timing["page_s"] < startup.LAUNCH_TIMEOUT_S
    if sys.platform == "linux":  # read from /proc
        assert 0 < timing["cpu_s"] < startup.LAUNCH_TIMEOUT_S * (os.cpu_count() or 1)
    startup.make_history(tmp_path / "history", 3)
    from diffusion_studio.service.store import JobStatus, JobStore

    jobs = JobStore(tmp_path / "history" / "studio.db").find(user="local")
    assert [job.status for job in jobs] == [JobStatus.done] * 3
    assert all(Path(path).is_file() for path in (tmp_path / "history" / "outputs").glob("*/*.png"))
    assert len(list((tmp_path / "history" / "outputs").glob("*/*.png"))) == 3


def test_the_engine_libraries_are_imported_in_the_background_after_start(tmp_path, monkeypatch):
    """The server imports the engine's libraries once, IMPORT_LIBRARIES_AFTER_S after its start, in a thread of its
    own; a server stopped sooner never does."""
    import threading
    import time

    from fastapi.testclient import TestClient

    from diffusion_studio import server
    from diffusion_studio.config import StudioConfig

    calls = []
    monkeypatch.setattr(server, "import_libraries",
                        lambda: calls.append((threading.current_thread().name, time.monotonic())))
    monkeypatch.setattr(server, "IMPORT_LIBRARIES_AFTER_S", 1.0)
    app = server.build_app(StudioConfig(data_dir=tmp_path, models_dir=tmp_path / "models"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        serving = time.monotonic()
        assert client.get("/").status_code == 200
        deadline = time.monotonic() + 30
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(calls) == 1 and calls[0][0] != threading.main_thread().name
    assert calls[0][1] - serving >= 0.9  # not before the delay
    monkeypatch.setattr(server, "IMPORT_LIBRARIES_AFTER_S", 2.0)
    with TestClient(server.build_app(StudioConfig(data_dir=tmp_path, models_dir=tmp_path / "models"))):
        started = time.monotonic()
    stopped = time.monotonic() - started
    time.sleep(3.0)
    assert stopped < 2.0 and len(calls) == 1  # stopped before its time: it never ran


def test_import_libraries_imports_what_a_first_job_needs():
    code = """
import sys
from diffusion_studio.engine import import_libraries
print(sorted(name for name in ("diffusers", "compel", "transformers") if name in sys.modules))
import_libraries()
print(sorted(name for name in ("diffusers", "compel", "transformers", "diffusers.pipelines.stable_diffusion")
             if name in sys.modules))
"""
    before, after = run_python(code).splitlines()[-2:]
    assert before == "[]"
    assert after == "['compel', 'diffusers', 'diffusers.pipelines.stable_diffusion', 'transformers']"


ENGINE_ONLY = ("torch", "diffusers", "transformers", "peft", "scipy", "ray", "cv2")


def test_serving_builds_the_app_without_the_engine_libraries(tmp_path):
    """What `serve` does before it listens (the CLI's set-up, build_app on a fresh data dir) imports none of
    ENGINE_ONLY; the page is still there and a model still loads and runs on first use."""
    code = f"""
import sys
from pathlib import Path
import diffusion_studio.cli as cli
cli._quiet_libraries()
cli._skip_gradio_stub_files()
from diffusion_studio.config import StudioConfig
from diffusion_studio.server import build_app
from fastapi.testclient import TestClient
data = Path({str(tmp_path)!r})
app = build_app(StudioConfig(data_dir=data, models_dir=data / "models"))
with TestClient(app, base_url="http://127.0.0.1") as client:
    assert client.get("/").status_code == 200
    print(sorted(name for name in {ENGINE_ONLY!r} if name in sys.modules))
    studio = app.state.studio
    result = studio.generate(studio.validate({{"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}}))
    print(len(result.images), "diffusers" in sys.modules)
"""
    imported, generated = run_python(code).splitlines()[-2:]
    assert imported == "[]"
    assert generated == "1 True"


def test_gradio_builds_the_whole_page_only_as_it_closes_and_mounts(tmp_path, monkeypatch):
    """Gradio rebuilds its app (the page's whole config, its routes) at each queue() and as the Blocks closes and
    is mounted: the studio's queue is set up before the first component, so only the close and the mount build
    the whole page; the queue keeps its settings (max size, default concurrency) and the page is served."""
    from fastapi.testclient import TestClient
    from gradio.routes import App

    from diffusion_studio import server
    from diffusion_studio.config import StudioConfig
    from diffusion_studio.ui import app as ui_app

    built = []  # the Blocks' event count at each build of Gradio's app
    create_app = App.create_app

    def counting(blocks, *args, **kwargs):
        built.append(len(blocks.fns))
        return create_app(blocks, *args, **kwargs)

    monkeypatch.setattr(App, "create_app", staticmethod(counting))
    blocks = []
    build_blocks = ui_app.build_blocks
    monkeypatch.setattr(server, "build_blocks", lambda *args: blocks.append(build_blocks(*args)) or blocks[-1])
    app = server.build_app(StudioConfig(data_dir=tmp_path, models_dir=tmp_path / "models"))
    assert len([events for events in built if events]) == 2 and built[-1] > 100
    assert (blocks[0]._queue.max_size, blocks[0]._queue.default_concurrency_limit) == (64, 4)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/").status_code == 200


def test_a_module_still_importing_is_not_loaded(monkeypatch):
    """libraries.loaded: what the service reads torch through. A module the background import is still running
    is in sys.modules half made; reading torch.cuda from it would raise, so it counts as not loaded."""
    import importlib.machinery
    import types

    from diffusion_studio.libraries import loaded

    module = types.ModuleType("halfway")
    module.__spec__ = importlib.machinery.ModuleSpec("halfway", None)
    module.__spec__._initializing = True
    monkeypatch.setitem(sys.modules, "halfway", module)
    assert loaded("halfway") is None and loaded("no_such_module_here") is None
    module.__spec__._initializing = False
    assert loaded("halfway") is module
