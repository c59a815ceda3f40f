"""Which torch ./studio installs (tools/torch_plan.sh): the CPU build without an NVIDIA GPU, PyPI's CUDA build with
one. The GPU probe is faked (an nvidia-smi first on PATH, an empty or filled driver folder) and pip's real resolver
turns each plan into what pip would install (--dry-run --report): nothing is installed anywhere.

The dry runs use a current pip (pip 23.2, the .venv's, downloads every wheel even for a dry run) with fast-deps: this
machine's PyPI proxy leaves out the wheels' PEP 658 metadata, so pip reads it with HTTP range requests (a few MB in
all) instead of downloading torch and the nvidia-* wheels (several GB). That is also why the CUDA plan takes ~40 s
here; it runs in the background from the module's first test on, while the others run.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "tools" / "torch_plan.sh"
RESOLVER_PIP = "pip==26.3"  # any pip >= 23.3 skips the downloads in a dry run; this one was checked
CUDA_PACKAGES = ("nvidia-", "cuda-", "triton")


def fake_bin(folder: Path, gpus: int, os_name: str = "Linux") -> Path:
    """A PATH folder whose nvidia-smi lists `gpus` GPUs (none: the driver's answer without one) and whose uname
    names `os_name`."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = "".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i:08d})'\n" for i in range(gpus))
    smi = listing if gpus else "echo 'No devices were found'; exit 6\n"
    (folder / "nvidia-smi").write_text("#!/bin/sh\n" + smi)
    (folder / "uname").write_text(f"#!/bin/sh\necho {os_name}\n")
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def plan_env(tmp_path: Path, gpus: int = 0, os_name: str = "Linux", driver_gpus: int = 0, **env: str) -> dict:
    """The environment of one torch plan: a faked GPU probe, and no STUDIO_* setting from the caller's shell."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_")}
    driver = tmp_path / "driver-gpus"
    driver.mkdir(exist_ok=True)
    for i in range(driver_gpus):
        (driver / f"0000:0{i}:00.0").mkdir(exist_ok=True)
    bin_dir = fake_bin(tmp_path / f"bin-{gpus}-{os_name}", gpus, os_name)
    return base | {"PATH": f"{bin_dir}{os.pathsep}{base['PATH']}", "STUDIO_NVIDIA_GPUS_DIR": str(driver),
                   "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"} | env


def run_plan(env: dict) -> tuple[list[str], str, float]:
    """Runs the decision code itself; returns pip's arguments, its explanation and how long it took."""
    start = time.monotonic()
    done = subprocess.run(["bash", str(PLAN)], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[:-1], done.stderr, time.monotonic() - start


def dry_run_command(pip_wheel: Path, args: list[str], report: Path) -> list[str]:
    """pip's resolver on the plan, for this Python (the .venv's), ignoring what it already has: installs nothing."""
    return [sys.executable, str(pip_wheel / "pip"), "install", "--dry-run", "--ignore-installed", "--quiet",
            "--use-feature=fast-deps", "--timeout", "30", "--retries", "2", "--report", str(report), *args]


def planned(report: Path) -> dict[str, dict]:
    """What pip would install, by package name: its version and where it would come from."""
    data = json.loads(report.read_text())
    return {item["metadata"]["name"].lower(): {"version": item["metadata"]["version"],
                                               "url": item["download_info"]["url"]} for item in data["install"]}


@pytest.fixture(scope="module")
def pip_wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resolver-pip")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--timeout", "10",
                           "--retries", "1", "--dest", str(folder), RESOLVER_PIP],
                          check=False, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:  # the one thing that can't run without a package index: say so, don't fail
        pytest.skip(f"pip's index can't be reached for {RESOLVER_PIP} (the resolver): {done.stderr.strip()[-300:]}")
    return next(folder.glob("pip-*.whl"))


@pytest.fixture(scope="module", autouse=True)
def cuda_dry_run(tmp_path_factory, pip_wheel):
    """The CUDA plan's dry run, started before the module's first test (it waits on PyPI ~40 s here)."""
    tmp_path = tmp_path_factory.mktemp("cuda-plan")
    args, explanation, _ = run_plan(plan_env(tmp_path, gpus=1))
    report = tmp_path / "report.json"
    process = subprocess.Popen(dry_run_command(pip_wheel, args, report), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    yield args, explanation, report, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_without_a_gpu_the_plan_is_the_cpu_build_and_no_nvidia_package(tmp_path, pip_wheel):
    # The real probe of PyTorch's CPU index: unreachable here (so the local +cpu wheel), reachable elsewhere.
    args, explanation, seconds = run_plan(plan_env(tmp_path, gpus=0))
    assert args[-1] == "torch==2.13.0+cpu" and "no NVIDIA GPU found" in explanation
    assert seconds < 10  # the index probe gives up after 5 s
    report = tmp_path / "report.json"
    done = subprocess.run(dry_run_command(pip_wheel, args, report), check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    packages = planned(report)
    assert packages["torch"]["version"] == "2.13.0+cpu", packages["torch"]
    assert not [name for name in packages if name.startswith(CUDA_PACKAGES)], sorted(packages)
    assert {"sympy", "filelock", "jinja2"} <= set(packages)  # torch's own dependencies are in the plan


@pytest.mark.parametrize("driver_gpus, override, build", [
    (1, None, "cuda"),   # the driver lists a GPU though nvidia-smi doesn't (a container without the tool)
    (0, "cuda", "cuda"),  # the user's choice beats the probe, either way
    (2, "cpu", "cpu"),
])
def test_driver_folder_and_user_override(tmp_path, driver_gpus, override, build):
    env = plan_env(tmp_path, driver_gpus=driver_gpus, STUDIO_TORCH_CPU_INDEX="http://127.0.0.1:9/whl/cpu",
                   **({"STUDIO_TORCH": override} if override else {}))
    args, explanation, _ = run_plan(env)
    assert args[-1] == {"cuda": "torch===2.13.0", "cpu": "torch==2.13.0+cpu"}[build]
    assert f"torch: {build}: " in explanation
    if override:
        assert f"STUDIO_TORCH={override}" in explanation


def test_a_wrong_override_stops_with_one_line(tmp_path):
    done = subprocess.run(["bash", str(PLAN)], check=False, env=plan_env(tmp_path, STUDIO_TORCH="gpu"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "STUDIO_TORCH=gpu: use auto, cpu or cuda\n"


def test_macos_gets_pypis_build_which_is_cpu_there(tmp_path):
    args, explanation, _ = run_plan(plan_env(tmp_path, gpus=0, os_name="Darwin"))
    assert args == ["torch==2.13.0"] and "PyPI's build for Darwin" in explanation


class _Index(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_cpu_index_that_answers_is_added_for_pip(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/whl/cpu"
        args, explanation, _ = run_plan(plan_env(tmp_path, STUDIO_TORCH_CPU_INDEX=url))
    finally:
        server.shutdown()
    assert args == ["--extra-index-url", url, "torch==2.13.0+cpu"], args
    assert f"from pip's own sources or {url}" in explanation


def _silent(listener: socket.socket, stop: threading.Event) -> None:
    """Accepts nothing: connections wait in the backlog, as with a firewall that drops the replies."""
    stop.wait()


def _trickling(listener: socket.socket, stop: threading.Event) -> None:
    """Answers a byte at a time, forever: each read returns in time, so only an overall limit ends the wait."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            connection, _ = listener.accept()
        except OSError:
            continue
        with connection:
            connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not stop.wait(0.3):
                try:
                    connection.sendall(b"a")
                except OSError:
                    break


@pytest.mark.parametrize("behaviour", [_silent, _trickling], ids=["silent", "trickling"])
def test_an_index_that_hangs_is_given_up_within_the_probe_timeout(tmp_path, behaviour):
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    stop = threading.Event()
    thread = threading.Thread(target=behaviour, args=(listener, stop), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/whl/cpu"
        env = plan_env(tmp_path, STUDIO_TORCH_CPU_INDEX=url, STUDIO_TORCH_PROBE_TIMEOUT="1.5")
        args, explanation, seconds = run_plan(env)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert args == ["torch==2.13.0+cpu"] and f"{url} does not answer" in explanation
    assert 1.4 < seconds < 4, seconds


def test_studio_stops_with_one_line_when_no_cpu_build_is_in_reach(tmp_path):
    # ./studio itself, in a copy: pip's configuration dropped (no find-links, no local indexes: only PyPI, which
    # has no +cpu build) and PyTorch's index out of reach. It must stop, not fall back to PyPI's CUDA build.
    for name in ("studio", "tools/torch_plan.sh", "pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    env = {k: v for k, v in plan_env(tmp_path, gpus=0, STUDIO_TORCH_CPU_INDEX="http://127.0.0.1:9/whl/cpu",
                                     STUDIO_TORCH_PROBE_TIMEOUT="2").items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "20"}
    done = subprocess.run([str(tmp_path / "studio"), "models"], check=False, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "[studio install] 2/4 torch 2.13.0, the CPU build (no NVIDIA GPU found; " in done.stderr
    assert "No matching distribution found for torch==2.13.0+cpu" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("torch 2.13.0+cpu (the CPU build) is in none of pip's sources and ") and \
        "STUDIO_TORCH=cuda" in last, done.stderr
    assert "3/4" not in done.stderr
    installed = [p.name for p in (tmp_path / ".venv" / "lib").glob("python*/site-packages/*")]
    assert not [name for name in installed if name.startswith(("torch", "nvidia"))], installed


# Last in the file: its dry run started with the module's first test and had the others' time to finish.
def test_with_a_gpu_the_plan_is_pypis_cuda_build_even_with_a_cpu_wheel_in_reach(cuda_dry_run):
    args, explanation, report, process = cuda_dry_run
    assert args == ["torch===2.13.0"] and "nvidia-smi lists 1 NVIDIA GPU(s)" in explanation
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    packages = planned(report)
    # Not +cpu although pip's find-links on this machine hold torch-2.13.0+cpu, which "==2.13.0" would pick.
    assert packages["torch"]["version"] == "2.13.0", packages["torch"]
    nvidia = sorted(name for name in packages if name.startswith("nvidia-"))
    assert {"nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= set(nvidia), sorted(packages)
