"""schemathesis (from PyPI, its own CLI in its own process) against the served /openapi.json: a fixed seed, a bounded
number of examples per operation, and no 5xx or response that contradicts the schema (status codes, content types,
bodies). The server runs with small limits so that the valid requests it generates finish in a moment on CPU."""

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from diffusion_studio.config import Limits, StudioConfig
from diffusion_studio.server import build_app
from servers import serving

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def fuzz_config(data_dir, models_dir) -> StudioConfig:
    """Tiny jobs, and limits high enough that most cases reach the handlers rather than a 429."""
    return StudioConfig(data_dir=data_dir, models_dir=models_dir, preview_interval=0, job_time_limit_s=20,
                        limits=Limits(max_width=64, max_height=64, max_steps=2, max_batch_size=2,
                                      max_images_per_request=2),
                        rate_per_minute=100_000, rate_burst=100_000, max_active_jobs=1000, max_queue=1000)


def run_schemathesis(url: str, workdir: Path, max_examples: int = 10, seed: int = 42) -> tuple[int, str]:
    command = [str(Path(sys.executable).with_name("st")), "run", f"{url}/openapi.json", "--seed", str(seed),
               "--max-examples", str(max_examples), "--checks", CHECKS, "--phases", "examples,coverage,fuzzing",
               "--workers", "1", "--no-color"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                             cwd=workdir)  # it keeps a .schemathesis folder where it runs
    return process.returncode, process.stdout + process.stderr


def cases_of(output: str) -> tuple[int, int]:
    """(generated, passed) from schemathesis' summary line."""
    generated = re.search(r"(\d+) generated", output)
    passed = re.search(r"(\d+) passed", output.split("Test cases:")[-1])
    return int(generated.group(1)) if generated else 0, int(passed.group(1)) if passed else 0


@pytest.fixture(scope="module")
def fuzz_server(data_dir, tmp_path_factory):
    # its own data dir: the fuzzer posts A1111 options, which are kept per user there
    config = fuzz_config(tmp_path_factory.mktemp("fuzz-data"), tmp_path_factory.mktemp("fuzz-models"))
    with serving(build_app(config)) as url:
        yield url


def test_schemathesis_finds_no_server_error_and_no_schema_violation(fuzz_server, tmp_path):
    code, output = run_schemathesis(fuzz_server, tmp_path)
    generated, passed = cases_of(output)
    assert code == 0, output[-6000:]
    assert generated >= 300 and passed == generated, output[-3000:]
    assert httpx.get(f"{fuzz_server}/health").json()["status"] == "ok"  # and the studio is still well


def test_the_schema_declares_bodies_and_errors(fuzz_server):
    schema = httpx.get(f"{fuzz_server}/openapi.json").json()
    paths = schema["paths"]
    for path in ("/api/v1/jobs", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert body.rsplit("/", 1)[-1] in schema["components"]["schemas"]
        assert {"422", "429", "500", "503"} <= set(paths[path]["post"]["responses"])
    assert set(paths["/api/v1/png-info"]["post"]["requestBody"]["content"]) == {"application/json",
                                                                                "multipart/form-data"}
    assert "GenerationRequest" in paths["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["$ref"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {CONTENT_TYPE_LATEST}
    request = schema["components"]["schemas"]["GenerationRequest"]["properties"]
    assert request["steps"]["maximum"] == 2 and request["width"]["anyOf"][0]["maximum"] == 64  # this studio's limits
    assert "image/png" in paths["/api/v1/images/{image_id}"]["get"]["responses"]["200"]["content"]
    assert "application/zip" in paths["/api/v1/history/export"]["get"]["responses"]["200"]["content"]
